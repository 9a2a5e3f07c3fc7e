"""Image–text retrieval metrics: Recall@K in both directions, the COCO 1K/5K protocol and the
minimal-pair accuracy of the synthetic benchmark.

Every function takes a score matrix ``scores`` of shape ``[num_images, num_texts]`` (higher means
a better match; MVAM gives embedding dot products, UARDA its cross-attention scores) and
``text_to_image``, a ``[num_texts]`` integer tensor giving the index of each caption's image.
An image may have several captions (5 in Flickr30K and MSCOCO).

Ranks are computed by counting how many other candidates score at least as high as the ground
truth, in row chunks, so the full ``argsort`` of a 5,000 x 25,000 matrix is never built. Ties
therefore count against the query: a collapsed model whose scores are all equal gets no hit
(counting them in its favour would give it a perfect rSum).

This file also defines :class:`RetrievalRecall`, an ``evaluate.Metric``, so it can be loaded with
``evaluate.load("path/to/metrics.py")``. For that reason it imports only third-party packages.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np
import torch

DEFAULT_KS = (1, 5, 10)
# MSCOCO's 5K test set is also reported as the mean over five folds of 1K images.
COCO_NUM_FOLDS = 5
COCO_FOLD_SIZE = 1000
# Upper bound on the number of score entries compared at once (about 64 MB of float32).
_CHUNK_ELEMENTS = 1 << 24
# The attributes of the synthetic benchmark's minimal pairs, in reporting order.
PAIR_ATTRIBUTES = ("colour", "shape", "size", "relation")


def recall_at_k(scores, text_to_image, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K for image→text and text→image retrieval, in percent.

    Image→text: an image query hits at K if any of its captions is ranked in the top K, where the
    rank of the best caption is the number of the other images' texts scoring at least as high.
    Text→image: a caption hits at K if fewer than K other images score at least as high as its own.

    Args:
        scores: ``[num_images, num_texts]`` tensor or array of similarity scores (no NaN).
        text_to_image: ``[num_texts]`` integer image index of every caption; every image needs at
            least one caption.
        ks: the cut-offs K.

    Returns:
        ``{"i2t_R@1": ..., "i2t_R@5": ..., "i2t_R@10": ..., "t2i_R@1": ..., ..., "rsum": ...}``
        with ``rsum`` the sum of all recalls (600 at most for the default ``ks``).

    Raises:
        ValueError: on mismatched shapes, out-of-range indices, an image without captions,
            NaN scores or a non-positive K.
    """
    scores, text_to_image = _validate(scores, text_to_image)
    ks = _validate_ks(ks)
    image_ranks, text_ranks = _ranks(scores, text_to_image)  # [num_images], [num_texts]

    results: dict[str, float] = {}
    for direction, ranks in (("i2t", image_ranks), ("t2i", text_ranks)):
        for k in ks:
            results[f"{direction}_R@{k}"] = (ranks < k).double().mean().item() * 100.0
    results["rsum"] = sum(results.values())
    return results


def retrieval_metrics(
    scores,
    text_to_image,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    coco_num_folds: int = COCO_NUM_FOLDS,
    coco_fold_size: int = COCO_FOLD_SIZE,
) -> dict[str, float]:
    """Recall@K on the whole set, plus the COCO 1K protocol when there are 5,000 images.

    When ``num_images == coco_num_folds * coco_fold_size`` (5,000 by default) the images are also
    cut into consecutive folds (images 0-999 with their captions, 1000-1999, ...), Recall@K is
    computed inside each fold and averaged; these keys are prefixed ``coco1k_``. The plain keys
    are then the 5K numbers.

    Args:
        scores: ``[num_images, num_texts]`` similarity scores.
        text_to_image: ``[num_texts]`` image index of every caption.
        ks: the cut-offs K.
        coco_num_folds, coco_fold_size: the fold layout (change only for tests).

    Returns:
        the :func:`recall_at_k` keys, and for 5,000 images also ``coco1k_i2t_R@1``, ...,
        ``coco1k_rsum``.
    """
    scores, text_to_image = _validate(scores, text_to_image)
    results = recall_at_k(scores, text_to_image, ks)
    if scores.shape[0] != coco_num_folds * coco_fold_size:
        return results

    fold_results = []
    for fold in range(coco_num_folds):
        first, last = fold * coco_fold_size, (fold + 1) * coco_fold_size
        fold_texts = torch.nonzero((text_to_image >= first) & (text_to_image < last)).squeeze(1)
        fold_scores = scores[first:last, fold_texts]  # [fold_size, fold_num_texts]
        fold_results.append(recall_at_k(fold_scores, text_to_image[fold_texts] - first, ks))
    for key in fold_results[0]:
        results[f"coco1k_{key}"] = sum(fold[key] for fold in fold_results) / coco_num_folds
    return results


def minimal_pair_accuracy(scores, text_to_image, variant_of, changed) -> dict[str, float]:
    """Accuracy on minimal pairs of images, in percent, per changed attribute, in both directions.

    Image ``a`` is a minimal-pair variant of image ``b = variant_of[a]`` differing only in the
    attribute ``changed[a]``; caption ``k`` of ``a`` and caption ``k`` of ``b`` are twins that
    describe the two scenes alike but for that difference (as the synthetic benchmark phrases
    them). A tie counts as wrong.

    - Text→image (``t2i_pair_acc/*``): each caption ``c`` of ``a`` is correct when
      ``scores[a, c] > scores[b, c]``, and each caption of ``b`` when ``scores[b, c] > scores[a, c]``.
    - Image→text (``i2t_pair_acc/*``), as SugarCrepe and ARO test it: image ``a`` is correct on
      twin ``k`` when its own caption outscores the twin, ``scores[a, a_k] > scores[a, b_k]``,
      and image ``b`` likewise with the roles swapped (twins up to the smaller caption count).

    Args:
        scores: ``[num_images, num_texts]`` similarity scores.
        text_to_image: ``[num_texts]`` image index of every caption.
        variant_of: ``[num_images]`` integers, the image each image is a variant of, -1 if none.
        changed: ``num_images`` attribute names (e.g. "colour", "shape", "size", "relation");
            entries of images that are not variants are ignored.

    Returns:
        ``{"t2i_pair_acc/colour": ..., ..., "t2i_pair_acc/all": ..., "i2t_pair_acc/colour": ...,
        ..., "i2t_pair_acc/all": ...}`` with one key per attribute present.

    Raises:
        ValueError: on invalid inputs or when no image is a variant of another.
    """
    scores, text_to_image = _validate(scores, text_to_image)
    num_images = scores.shape[0]
    variant_of = torch.as_tensor(np.asarray(variant_of), dtype=torch.long).flatten()  # [num_images]
    variant_of = variant_of.to(scores.device)
    changed = list(changed)
    if variant_of.shape[0] != num_images or len(changed) != num_images:
        raise ValueError(
            f"variant_of ({variant_of.shape[0]}) and changed ({len(changed)}) need one entry per "
            f"image ({num_images})"
        )
    bad = ((variant_of < -1) | (variant_of >= num_images)).nonzero().flatten().tolist()
    self_variant = variant_of == torch.arange(num_images, device=scores.device)  # [num_images]
    bad += self_variant.nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"variant_of must be -1 or the index of another image; image {bad[0]} has "
            f"{variant_of[bad[0]].item()}"
        )
    pair_a = (variant_of >= 0).nonzero().flatten()  # [num_pairs]
    if pair_a.numel() == 0:
        raise ValueError("no minimal pairs: every entry of variant_of is -1")
    pair_b = variant_of[pair_a]  # [num_pairs]

    # Text→image: captions of a, judged against b, then captions of b, judged against a.
    owner_pair_a, captions_a = _captions_of(pair_a, text_to_image)  # [n_a], [n_a]
    owner_pair_b, captions_b = _captions_of(pair_b, text_to_image)  # [n_b], [n_b]
    t2i_pair = torch.cat([owner_pair_a, owner_pair_b])  # [n_items]
    t2i_caption = torch.cat([captions_a, captions_b])  # [n_items]
    t2i_own = torch.cat([pair_a[owner_pair_a], pair_b[owner_pair_b]])  # [n_items]
    t2i_other = torch.cat([pair_b[owner_pair_a], pair_a[owner_pair_b]])  # [n_items]
    t2i_correct = scores[t2i_own, t2i_caption] > scores[t2i_other, t2i_caption]  # [n_items]

    # Image→text: twin k of each pair, judged by image a, then by image b.
    twin_pair, twin_a, twin_b = _twin_captions(pair_a, pair_b, text_to_image)  # [m] each
    i2t_pair = torch.cat([twin_pair, twin_pair])  # [2m]
    i2t_image = torch.cat([pair_a[twin_pair], pair_b[twin_pair]])  # [2m]
    i2t_own = torch.cat([twin_a, twin_b])  # [2m]
    i2t_twin = torch.cat([twin_b, twin_a])  # [2m]
    i2t_correct = scores[i2t_image, i2t_own] > scores[i2t_image, i2t_twin]  # [2m]

    pair_attribute = [str(changed[a]) for a in pair_a.tolist()]
    present = set(pair_attribute)
    ordered = [name for name in PAIR_ATTRIBUTES if name in present]
    ordered += sorted(present - set(PAIR_ATTRIBUTES))
    results = {}
    for direction, correct, item_pair in (("t2i", t2i_correct, t2i_pair), ("i2t", i2t_correct, i2t_pair)):
        for name in ordered:
            in_group = torch.tensor(
                [attribute == name for attribute in pair_attribute], device=scores.device
            )  # [num_pairs]
            results[f"{direction}_pair_acc/{name}"] = correct[in_group[item_pair]].double().mean().item() * 100.0
        results[f"{direction}_pair_acc/all"] = correct.double().mean().item() * 100.0
    return results


def summary_table(results: dict[str, float], wall_time_s: float | None = None) -> str:
    """A plain-text table of Recall@K, rSum, minimal-pair accuracies and the wall time."""
    rows = [("", "R@1", "R@5", "R@10")]
    for name, prefix in (("image→text", "i2t"), ("text→image", "t2i")):
        rows.append((name, *(f"{results[f'{prefix}_R@{k}']:.2f}" for k in (1, 5, 10))))
    width = max(len(row[0]) for row in rows)
    lines = ["  ".join(f"{cell:>{width if i == 0 else 6}}" for i, cell in enumerate(row)) for row in rows]
    lines.append(f"{'rSum':>{width}}  {results['rsum']:.2f}")
    if "coco1k_rsum" in results:
        lines.append(f"{'rSum 1K':>{width}}  {results['coco1k_rsum']:.2f} (COCO 5-fold 1K)")
    for direction, name in (("t2i", "text→image"), ("i2t", "image→text")):
        pairs = {key.split("/", 1)[1]: value for key, value in results.items() if key.startswith(f"{direction}_pair_acc/")}
        if pairs:
            lines.append(f"minimal-pair accuracy ({name}): " + ", ".join(f"{k} {v:.1f}%" for k, v in pairs.items()))
    if wall_time_s is not None:
        minutes, seconds = divmod(int(round(wall_time_s)), 60)
        lines.append(f"wall time: {minutes} min {seconds:02d} s")
    return "\n".join(lines)


class RetrievalRecall(evaluate.Metric):
    """Recall@K for image–text retrieval as an ``evaluate`` metric.

    Each prediction is one caption's row of scores over all images (the same images, in the same
    order, for every caption); its reference is the index of the caption's image.

    Example::

        recall = evaluate.load("path/to/hf_mvam/metrics.py")
        recall.compute(predictions=scores.T.tolist(), references=text_to_image.tolist())
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Recall@K (percent) for image→text and text→image retrieval, and rsum.",
            citation="",
            inputs_description=(
                "predictions: per caption, its scores for every image (num_images floats, higher "
                "is better). references: per caption, the index of its image. Optional ks: the "
                "cut-offs (default 1, 5, 10)."
            ),
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
        lengths = {len(row) for row in predictions}
        if len(lengths) > 1:
            raise ValueError(f"every prediction needs one score per image; got lengths {lengths}")
        text_scores = torch.as_tensor(np.asarray(predictions, dtype=np.float32))  # [T, I]
        return recall_at_k(text_scores.T, torch.as_tensor(np.asarray(references)), ks)


def _validate(scores, text_to_image) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the inputs and return them as a floating ``[I, T]`` and a long ``[T]`` tensor."""
    scores = torch.as_tensor(scores)
    if not torch.is_floating_point(scores):
        scores = scores.float()
    text_to_image = torch.as_tensor(text_to_image)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [num_images, num_texts]; got shape {tuple(scores.shape)}")
    num_images, num_texts = scores.shape
    if text_to_image.dim() != 1 or text_to_image.shape[0] != num_texts:
        raise ValueError(
            f"text_to_image must have one entry per text ({num_texts}, the second dimension of "
            f"scores); got shape {tuple(text_to_image.shape)}"
        )
    if torch.is_floating_point(text_to_image) or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integers; got {text_to_image.dtype}")
    text_to_image = text_to_image.long().to(scores.device)
    if num_texts == 0:
        raise ValueError("scores has no texts")
    out_of_range = ((text_to_image < 0) | (text_to_image >= num_images)).nonzero().flatten()
    if out_of_range.numel():
        text = out_of_range[0].item()
        raise ValueError(
            f"text_to_image[{text}] = {text_to_image[text].item()} is not an image index "
            f"(num_images = {num_images})"
        )
    captions_per_image = torch.bincount(text_to_image, minlength=num_images)  # [num_images]
    without_caption = (captions_per_image == 0).nonzero().flatten().tolist()
    if without_caption:
        shown = ", ".join(map(str, without_caption[:10]))
        more = f" and {len(without_caption) - 10} more" if len(without_caption) > 10 else ""
        raise ValueError(f"image(s) {shown}{more} have no caption in text_to_image")
    if torch.isnan(scores).any():
        where = torch.isnan(scores).nonzero()[0].tolist()
        raise ValueError(f"scores contain NaN (first at image {where[0]}, text {where[1]})")
    return scores, text_to_image


def _validate_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers; got {ks}")
    return ks


def _ranks(scores: torch.Tensor, text_to_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based rank of each image's best caption and of each caption's image, by counting.

    Returns:
        ``image_ranks`` ``[num_images]``: other images' texts scoring at least as high as the
        image's best caption; ``text_ranks`` ``[num_texts]``: other images scoring at least as high
        as the caption's own image (ties count against the query).
    """
    num_images, num_texts = scores.shape
    # Score of every caption with its own image.
    device = scores.device
    own_scores = scores[text_to_image, torch.arange(num_texts, device=device)]  # [num_texts]
    image_ranks = torch.empty(num_images, dtype=torch.long, device=device)  # [num_images]
    text_ranks = torch.zeros(num_texts, dtype=torch.long, device=device)  # [num_texts]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // num_texts)
    for first in range(0, num_images, rows_per_chunk):
        chunk = scores[first : first + rows_per_chunk]  # [rows, num_texts]
        rows = torch.arange(first, first + chunk.shape[0], device=device)  # [rows]
        is_own = text_to_image.unsqueeze(0) == rows.unsqueeze(1)  # [rows, num_texts]
        best = chunk.masked_fill(~is_own, float("-inf")).amax(dim=1)  # [rows]
        image_ranks[first : first + chunk.shape[0]] = ((chunk >= best.unsqueeze(1)) & ~is_own).sum(dim=1)
        text_ranks += ((chunk >= own_scores.unsqueeze(0)) & ~is_own).sum(dim=0)
    return image_ranks, text_ranks


def _captions_of(
    images: torch.Tensor, text_to_image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All captions of each image in ``images``, flattened.

    Args:
        images: ``[n]`` image indices (may repeat).
        text_to_image: ``[num_texts]`` image index of every caption.

    Returns:
        ``owner`` ``[m]``: position in ``images`` of each listed caption's image, and
        ``captions`` ``[m]``: the caption indices.
    """
    device = text_to_image.device
    order = torch.argsort(text_to_image, stable=True)  # [num_texts] captions grouped by image
    counts = torch.bincount(text_to_image, minlength=int(images.max()) + 1)  # [>= num_images]
    starts = torch.cumsum(counts, 0) - counts  # [>= num_images] first slot of each image in order
    per_image = counts[images]  # [n]
    owner = torch.repeat_interleave(torch.arange(images.shape[0], device=device), per_image)  # [m]
    # Position of each listed caption among its image's captions: 0, 1, ..., count - 1.
    offset_in_image = torch.arange(owner.shape[0], device=device) - torch.repeat_interleave(
        torch.cumsum(per_image, 0) - per_image, per_image
    )  # [m]
    captions = order[starts[images[owner]] + offset_in_image]  # [m]
    return owner, captions


def _twin_captions(
    pair_a: torch.Tensor, pair_b: torch.Tensor, text_to_image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caption ``k`` of image ``pair_a[p]`` beside caption ``k`` of image ``pair_b[p]``, for every
    pair ``p`` and ``k`` below the smaller of the two images' caption counts (captions numbered in
    their order in ``text_to_image``).

    Returns:
        ``pair`` ``[m]`` (the pair of each twin), ``caption_a`` ``[m]`` and ``caption_b`` ``[m]``.
    """
    device = text_to_image.device
    order = torch.argsort(text_to_image, stable=True)  # [num_texts] captions grouped by image
    counts = torch.bincount(text_to_image, minlength=int(max(pair_a.max(), pair_b.max())) + 1)
    starts = torch.cumsum(counts, 0) - counts  # first slot of each image in order
    per_pair = torch.minimum(counts[pair_a], counts[pair_b])  # [num_pairs] twins of each pair
    pair = torch.repeat_interleave(torch.arange(pair_a.shape[0], device=device), per_pair)  # [m]
    # k of each twin within its pair: 0, 1, ..., per_pair - 1
    k = torch.arange(pair.shape[0], device=device) - torch.repeat_interleave(torch.cumsum(per_pair, 0) - per_pair, per_pair)
    return pair, order[starts[pair_a[pair]] + k], order[starts[pair_b[pair]] + k]
