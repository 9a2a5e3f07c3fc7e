"""Recall@K of MVAM alone, UARDA scoring the whole gallery, and two-stage search (MVAM's top-k
shortlist reranked by UARDA), on one split, under the protocol of :mod:`hf_mvam.metrics`.

Two-stage search scores only the shortlist: for each caption its ``k`` most similar images by
MVAM (text→image), for each image its ``k`` most similar captions (image→text), reranked by
UARDA's cross attention (:func:`~hf_mvam.retrieval.rerank.pair_scores`), BLIP's protocol
(its ``k_test``). Items outside a query's shortlist are not retrieved at all: a query whose match
is not in the shortlist misses at every K. With ``k`` at least the gallery's size, two-stage
search is UARDA on the whole gallery.

The shortlists come from the exact MVAM score matrix (what a flat faiss index returns), so the
numbers measure the method, not an approximate index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..evaluation import _process_group, encode_split, gather_blocks, score_split
from ..metrics import DEFAULT_KS, _validate_ks, retrieval_metrics
from .rerank import pair_scores

__all__ = ["DEFAULT_SHORTLIST_SIZES", "evaluate", "shortlist_recall"]

DEFAULT_SHORTLIST_SIZES = (16, 64, 256)
# Pairs scored per distributed work item (a fixed size: the same items whatever the number of
# processes, so W processes compute exactly what one computes).
_PAIRS_PER_ITEM = 1 << 16


def shortlist_recall(
    t2i_candidates: torch.Tensor,
    t2i_scores: torch.Tensor,
    i2t_candidates: torch.Tensor,
    i2t_scores: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Recall@K (percent) when each query ranks only its shortlist, as
    :func:`hf_mvam.metrics.recall_at_k` ranks the whole gallery (ties count against the query).

    Args:
        t2i_candidates: ``[N_t, k]`` image indices shortlisted for each caption.
        t2i_scores: ``[N_t, k]`` their scores.
        i2t_candidates: ``[N_i, k']`` caption indices shortlisted for each image.
        i2t_scores: ``[N_i, k']`` their scores.
        text_to_image: ``[N_t]`` image of every caption.
        ks: the cut-offs.

    Returns:
        ``i2t_R@K`` and ``t2i_R@K`` for every K, and ``rsum``.
    """
    ks = _validate_ks(ks)
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    num_texts, num_images = t2i_candidates.shape[0], i2t_candidates.shape[0]
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image has {text_to_image.numel()} entries for {num_texts} captions")
    if t2i_scores.shape != t2i_candidates.shape or i2t_scores.shape != i2t_candidates.shape:
        raise ValueError("every shortlist needs one score per candidate")
    miss = torch.iinfo(torch.long).max
    # text→image: rank = other shortlisted images scoring at least the caption's own image
    own = t2i_candidates == text_to_image[:, None]  # [N_t, k]
    own_score = t2i_scores.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # [N_t, 1]
    text_ranks = ((t2i_scores >= own_score) & ~own).sum(dim=1)
    text_ranks = torch.where(own.any(dim=1), text_ranks, miss)
    # image→text: rank of the best own caption = shortlisted captions of other images scoring at least it
    own = text_to_image[i2t_candidates] == torch.arange(num_images)[:, None]  # [N_i, k']
    best = i2t_scores.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # [N_i, 1]
    image_ranks = ((i2t_scores >= best) & ~own).sum(dim=1)
    image_ranks = torch.where(own.any(dim=1), image_ranks, miss)
    results = {}
    for direction, ranks in (("i2t", image_ranks), ("t2i", text_ranks)):
        for k in ks:
            results[f"{direction}_R@{k}"] = (ranks < k).double().mean().item() * 100.0
    results["rsum"] = sum(results.values())
    return results


@torch.no_grad()
def evaluate(
    mvam_model,
    mvam_processor,
    split,
    uarda_model=None,
    uarda_processor=None,
    shortlist_sizes: Sequence[int] = DEFAULT_SHORTLIST_SIZES,
    full_uarda: bool = True,
    batch_size: int = 256,
    progress: bool = False,
    distributed: bool = False,
) -> dict[str, float]:
    """Recall@K of MVAM, of UARDA on the whole gallery and of two-stage search, as one flat dict.

    Args:
        mvam_model, mvam_processor: the first stage (an MVAM model and its processor).
        split: a ``datasets.Dataset`` with ``captions`` and ``image`` or ``image_features``.
        uarda_model, uarda_processor: the reranker; without them only MVAM is measured.
        shortlist_sizes: the ``k`` of two-stage search (each clamped to the gallery's size).
        full_uarda: also score the whole gallery with UARDA (the cost two-stage search avoids).
        batch_size: images or captions per forward pass.
        distributed: every process of the ``torch.distributed`` group calls this with the same
            arguments; encoding, scoring and reranking are split across them and all return the
            same results, equal to one process's.

    Returns:
        ``mvam/i2t_R@1`` ... ``mvam/rsum``, ``uarda/...`` and ``two_stage@<k>/...`` (percent; the
        keys of :func:`hf_mvam.metrics.recall_at_k` under each prefix), fit for
        ``eval_results.json``.
    """
    mvam = encode_split(mvam_model, mvam_processor, split, batch_size, progress, distributed)
    mvam_scores = score_split(mvam_model, mvam, progress, distributed)  # [N_i, N_t]
    text_to_image = mvam.text_to_image
    results = {f"mvam/{key}": value for key, value in _recall(mvam_scores, text_to_image).items()}
    if uarda_model is None:
        return results
    uarda = encode_split(uarda_model, uarda_processor, split, batch_size, progress, distributed)
    if full_uarda:
        uarda_scores = score_split(uarda_model, uarda, progress, distributed)
        results.update({f"uarda/{key}": value for key, value in _recall(uarda_scores, text_to_image).items()})

    num_images, num_texts = mvam_scores.shape
    sizes = sorted({int(k) for k in shortlist_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"shortlist_sizes must be positive integers, got {tuple(shortlist_sizes)}")
    # The largest shortlists hold every smaller one (top-k is sorted): score them once.
    t2i_candidates = mvam_scores.topk(min(sizes[-1], num_images), dim=0).indices.T  # [N_t, k_max]
    i2t_candidates = mvam_scores.topk(min(sizes[-1], num_texts), dim=1).indices  # [N_i, k_max']
    t2i_candidates = t2i_candidates.contiguous()
    t2i_keys = t2i_candidates * num_texts + torch.arange(num_texts)[:, None]  # pair key: image * N_t + text
    i2t_keys = torch.arange(num_images)[:, None] * num_texts + i2t_candidates
    keys = torch.unique(torch.cat([t2i_keys.flatten(), i2t_keys.flatten()]))  # sorted: grouped by image
    values = _score_pairs(uarda_model, uarda, keys // num_texts, keys % num_texts, progress, distributed)
    t2i_scores = values[torch.searchsorted(keys, t2i_keys)]  # [N_t, k_max]
    i2t_scores = values[torch.searchsorted(keys, i2t_keys)]  # [N_i, k_max']
    for k in shortlist_sizes:
        k_t2i, k_i2t = min(int(k), num_images), min(int(k), num_texts)
        recall = shortlist_recall(t2i_candidates[:, :k_t2i], t2i_scores[:, :k_t2i], i2t_candidates[:, :k_i2t],
                                  i2t_scores[:, :k_i2t], text_to_image)
        results.update({f"two_stage@{k}/{key}": value for key, value in recall.items()})
    return results


def _recall(scores: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
    """Recall@K and rSum on the whole split (no COCO 1K folds: the prefixes keep one set)."""
    return {key: value for key, value in retrieval_metrics(scores, text_to_image).items() if not key.startswith("coco1k_")}


def _score_pairs(model, encoded, pair_images, pair_texts, progress: bool, distributed: bool) -> torch.Tensor:
    """UARDA scores of the pairs, split into fixed work items that the processes share."""
    rank, world = _process_group(distributed)
    starts = range(0, pair_images.numel(), _PAIRS_PER_ITEM)
    blocks = {}
    images, texts = encoded.images.image_fragments, encoded.texts
    was_training = model.training
    model.eval()
    try:
        for index in tqdm(range(rank, len(starts), world), desc="reranking", unit="item", disable=not progress):
            part = slice(starts[index], starts[index] + _PAIRS_PER_ITEM)
            blocks[index] = pair_scores(model, images, texts.text_fragments, texts.text_mask,
                                        pair_images[part], pair_texts[part])
    finally:
        model.train(was_training)
    blocks = gather_blocks(blocks, distributed)
    return torch.cat([blocks[i] for i in range(len(starts))])
