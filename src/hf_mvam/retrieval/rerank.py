"""The second stage of two-stage search: UARDA's cross-attention scores of given (image, caption)
pairs only, vectorised over all pairs.

``UARDAModel.score`` scores every image against every caption: a [captions, images] block per
chunk. A shortlist needs a sparse set of pairs instead (each query with its own k candidates), for
which that block would compute mostly unwanted pairs. :func:`pair_scores` groups the pairs by
image, so that each image's regions are read once (from RAM or from a memory-mapped cache) and meet
the captions paired with it in one batched product::

    words [groups, slots·L, D]  x  regions [groups, D, R]  ->  similarities [groups, slots, L, R]

and then applies the same formulas as ``hf_mvam.cross_attention.cross_attention_scores`` in its
retrieval form (``skip_irrelevant_queries=True``, what ``UARDAModel.score`` does in eval mode),
pair by pair: SCAN's attention (scan mode) or the negative–positive branches around the learned
threshold (uarda mode), in the model's direction(s), pooled as the model pools. The test suite
checks every configuration against ``UARDAModel.score`` (they agree to float32 rounding).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# The scorer's similarity product: oneDNN's fp32 GEMM where PyTorch exposes it, else torch.matmul.
# On the AMD EPYC these benchmarks ran on it was 4-7x faster than torch.matmul / bmm (MKL) for
# [slots*L, D] x [D, R] products (1 thread: 1.8 ms against 7.7-12.5 ms).
from ..cross_attention import NAAF_LAMBDA_SOFTMAX, SCAN_LAMBDA_LSE, SCAN_LAMBDA_SOFTMAX, _similarity

__all__ = ["pair_scores", "take"]

# Elements of one [groups, slots, L, R] similarity block (2 MB in float32, as the scorer's: its
# elementwise passes then run from the CPU caches); a few buffers of this size are alive at once.
_BLOCK_ELEMENTS = 1 << 17
_EPS = 1e-8  # cross_attention_scores' default eps, which UARDAModel.score uses
_MAX_LAMBDA_UNSHIFTED_EXP = 20.0


def take(array, indices: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """``array[indices, :length]`` as a contiguous torch tensor, for a tensor or a numpy array /
    memmap (whose rows are then read from disk: only the requested ones)."""
    cut = slice(None) if length is None else slice(0, length)
    if isinstance(array, torch.Tensor):
        return array[:, cut].index_select(0, indices.to(array.device))
    return torch.from_numpy(np.ascontiguousarray(array[indices.cpu().numpy(), cut]))


@torch.no_grad()
def pair_scores(
    model,
    image_fragments,
    text_fragments,
    text_mask,
    pair_images: torch.Tensor,
    pair_texts: torch.Tensor,
    block_elements: int = _BLOCK_ELEMENTS,
) -> torch.Tensor:
    """UARDA scores of the pairs ``(pair_images[p], pair_texts[p])``: ``[P]`` float32 on the CPU,
    equal to ``model.eval().score(...)[pair_images, pair_texts]`` up to float32 rounding.

    Args:
        model: a ``UARDAModel`` (its config and relevance threshold are read; it is not run).
        image_fragments: ``[N_i, R, D]`` region fragments (``UARDAImageEncoding.image_fragments``),
            a tensor or a numpy array (e.g. a memmap: only the images of the pairs are read).
        text_fragments: ``[N_t, L, D]`` word fragments, a tensor or numpy array.
        text_mask: ``[N_t, L]`` real-word mask.
        pair_images, pair_texts: ``[P]`` indices of each pair's image and caption.
        block_elements: size of one similarity block (bounds the working memory).
    """
    pair_images = torch.as_tensor(pair_images, dtype=torch.long).flatten()
    pair_texts = torch.as_tensor(pair_texts, dtype=torch.long).flatten()
    if pair_images.shape != pair_texts.shape:
        raise ValueError(f"pair_images and pair_texts differ in length: {pair_images.numel()} and {pair_texts.numel()}")
    scores = torch.empty(pair_images.numel(), dtype=torch.float32)
    if pair_images.numel() == 0:
        return scores
    n_images, n_regions, dim = image_fragments.shape
    n_texts, n_words = text_mask.shape[:2]
    for name, index, size in (("pair_images", pair_images, n_images), ("pair_texts", pair_texts, n_texts)):
        if int(index.min()) < 0 or int(index.max()) >= size:
            raise ValueError(f"{name} holds indices outside [0, {size})")
    config = model.config
    device = next(model.parameters()).device
    dtype = model.region_projection.weight.dtype
    options = _scoring_options(config, float(model.relevance_threshold.threshold))

    # Pairs grouped by image, each image's pairs cut into groups of at most `slots_cap` (so that a
    # popular image never needs a block of its own beyond the budget).
    slots_cap = max(1, block_elements // (n_words * n_regions))
    order = torch.argsort(pair_images, stable=True)  # [P]
    images_sorted = pair_images[order]
    _, run_length = torch.unique_consecutive(images_sorted, return_counts=True)  # [runs]
    run_start = torch.cumsum(run_length, 0) - run_length  # [runs]
    run_of_pair = torch.repeat_interleave(torch.arange(run_length.numel()), run_length)  # [P]
    position = torch.arange(order.numel()) - run_start[run_of_pair]  # [P] position within its image
    group_key = run_of_pair * (order.numel() // slots_cap + 1) + position // slots_cap  # [P] sorted
    _, group_size = torch.unique_consecutive(group_key, return_counts=True)  # [G]
    group_start = torch.cumsum(group_size, 0) - group_size  # [G] into `order`
    # Largest groups first: consecutive groups have similar sizes, so the slot padding stays small.
    by_size = torch.argsort(group_size, descending=True, stable=True)  # [G]
    sizes = group_size[by_size].tolist()

    # Word norms of every caption involved, read once (not once per pair): [U, L]
    texts_used, text_slot = torch.unique(pair_texts, return_inverse=True)  # [U], [P]
    word_norm = torch.cat([
        take(text_fragments, texts_used[a : a + 4096]).to(dtype).norm(dim=-1) for a in range(0, texts_used.numel(), 4096)
    ])
    first = 0
    while first < len(sizes):
        slots = sizes[first]
        count = max(1, min(len(sizes) - first, block_elements // (slots * n_words * n_regions)))
        groups = by_size[first : first + count]  # [ci]
        first += count
        # [ci, slots] positions into `order` (padding slots repeat the group's first pair)
        offsets = torch.arange(slots)
        valid = offsets[None, :] < group_size[groups][:, None]  # [ci, slots]
        slot = group_start[groups][:, None] + torch.where(valid, offsets[None, :], 0)  # [ci, slots]
        slot_pairs = order[slot]  # [ci, slots] pair indices
        texts = pair_texts[slot_pairs].flatten()  # [ci*slots]
        mask = take(text_mask, texts).cpu().bool()  # [ci*slots, L]
        length = int((mask * torch.arange(1, n_words + 1)).amax())  # trim to the longest caption
        words = take(text_fragments, texts, length).to(device=device, dtype=dtype)  # [ci*slots, Lc, D]
        regions = take(image_fragments, pair_images[slot_pairs[:, 0]]).to(device=device, dtype=dtype)  # [ci, R, D]
        block = _block_scores(
            regions,
            words.view(count, slots, length, dim),
            mask[:, :length].to(device).view(count, slots, length),
            word_norm[text_slot[slot_pairs.flatten()], :length].to(device).view(count, slots, length),
            options,
        )  # [ci, slots]
        scores[slot_pairs[valid]] = block[valid.to(block.device)].float().cpu()
    return scores


def _scoring_options(config, threshold: float) -> dict:
    """The scorer's settings, resolved as ``cross_attention_scores`` resolves them."""
    uarda = config.threshold_mode == "uarda"
    lambda_softmax = dict(NAAF_LAMBDA_SOFTMAX if uarda else SCAN_LAMBDA_SOFTMAX)
    if config.lambda_softmax is not None:
        lambda_softmax = {"t2i": float(config.lambda_softmax), "i2t": float(config.lambda_softmax)}
    lambda_lse = dict(SCAN_LAMBDA_LSE)
    if config.lambda_lse is not None:
        lambda_lse = {"t2i": float(config.lambda_lse), "i2t": float(config.lambda_lse)}
    if uarda and not math.isfinite(threshold):
        raise ValueError(f"the model's relevance threshold is not finite: {threshold}")
    return {
        "directions": ("t2i", "i2t") if config.direction == "both" else (config.direction,),
        "uarda": uarda,
        "threshold": threshold,
        "aggregation": config.aggregation,
        "lambda_softmax": lambda_softmax,
        "lambda_lse": lambda_lse,
    }


def _block_scores(regions, words, mask, word_norm, options) -> torch.Tensor:
    """Scores ``[ci, slots]`` of image ``g``'s regions ``regions[g]`` ([R, D]) against each of its
    slots' captions ``words[g, s]`` ([L, D], real words marked by ``mask[g, s]``, norms
    ``word_norm[g, s]``)."""
    ci, slots, n_words, dim = words.shape
    # per image: [slots*L, D] x [D, R] -> [slots*L, R]; stacked: [ci, slots, L, R]
    sim = torch.stack([_similarity(words[g].view(slots * n_words, dim), regions[g]) for g in range(ci)]).view(ci, slots, n_words, -1)
    # padding words get similarity 0 and norm 0, as the scorer's zeroed padding vectors
    sim.mul_(mask.unsqueeze(-1))
    word_norm = word_norm * mask
    total = 0.0
    for direction in options["directions"]:
        lam, lam_lse = options["lambda_softmax"][direction], options["lambda_lse"][direction]
        if direction == "t2i":
            relevance = _t2i_relevance(sim, mask, word_norm, regions, lam, options)  # [ci, slots, L]
            total = total + _pool(relevance, mask, options["aggregation"], lam_lse, dim=-1)
        else:
            relevance = _i2t_relevance(sim, mask, words, regions, lam, options)  # [ci, slots, R]
            total = total + _pool(relevance, None, options["aggregation"], lam_lse, dim=-1)
    return total


def _scan_norm(x, dim):
    """SCAN's L2 norm ``sqrt(Σ x²) + eps`` over ``dim`` (kept)."""
    return (x * x).sum(dim=dim, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny).sqrt() + _EPS


def _cosine(numerator, query_norm, quad):
    """``q · c / (|q| |c|)`` with SCAN's clamps, from ``q · c``, ``|q|`` and ``|c|² = quad``."""
    return numerator / (query_norm * quad.clamp_min(_EPS * _EPS).sqrt()).clamp_min(_EPS)


def _unshifted_exp_ok(lam, dtype):
    """Whether a softmax of ``λ x`` with ``|x| <= 1`` may skip its max subtraction (as the scorer
    decides: exp(±20) stays far from float32's limits)."""
    return lam <= _MAX_LAMBDA_UNSHIFTED_EXP and dtype in (torch.float32, torch.float64)


def _t2i_relevance(sim, mask, word_norm, regions, lam, options):
    """Relevance ``[ci, slots, L]`` of each word (query) against its pair's regions."""
    ci, slots, n_words, n_regions = sim.shape
    gram = torch.bmm(regions, regions.transpose(1, 2))  # [ci, R, R]
    x = F.leaky_relu(sim, 0.1)
    scale = lam / _scan_norm(x, 2)  # [ci, slots, 1, R] SCAN's normalisation over the words
    if not options["uarda"]:
        weights, total = _scan_weights(x.mul_(scale), lam)  # [ci, slots, L, R], [ci, slots, L]
        rows = weights.view(ci, slots * n_words, n_regions)
        quad = torch.linalg.vecdot(torch.bmm(rows, gram), rows).view(ci, slots, n_words)
        numerator = torch.linalg.vecdot(weights, sim)  # [ci, slots, L]
        return _cosine(numerator / total, word_norm, quad / total.square())
    # uarda mode, retrieval form: only the live words (a region above the threshold) are attended;
    # the others score best - t. Their rows are gathered, image-major: [ci, slots, L] -> 3 x [M]
    t = options["threshold"]
    best = sim.amax(dim=-1)  # [ci, slots, L]
    live = (best > t) & mask
    relevance = torch.where(live, 0.0, best - t)
    image, slot, word = live.nonzero(as_tuple=True)
    if image.numel() == 0:
        return relevance
    pair = image * slots + slot  # [M] into [ci*slots]
    row = pair * n_words + word  # [M] into [ci*slots*L]
    s_rows = sim.view(-1, n_regions).index_select(0, row)  # [M, R]
    # positive branch: softmax of λ(s - t) over the relevant regions, shifted by the row's best
    weights = (s_rows - best.view(-1).index_select(0, row).unsqueeze(-1)).mul_(lam).clamp_max_(0.0).exp_()
    weights.mul_((s_rows - t).gt_(0.0))  # [M, R] zero on the irrelevant regions
    total = weights.sum(-1)  # [M]
    quad = _grouped_quad(weights, image, gram) / total.square()
    positive = _cosine(torch.linalg.vecdot(weights, s_rows) / total, word_norm.view(-1).index_select(0, row), quad)
    # relevance-score branch: SCAN's attention (normalised over all real words) times the similarities
    x_rows = F.leaky_relu(s_rows, 0.1).mul_(scale.view(-1, n_regions).index_select(0, pair))
    scan_weights, scan_total = _scan_weights(x_rows, lam)
    relevance_score = torch.linalg.vecdot(scan_weights, s_rows) / scan_total
    return relevance.view(-1).index_add(0, row, positive + relevance_score).view(ci, slots, n_words)


def _scan_weights(logits, lam):
    """Unnormalised softmax weights over the last dimension and their sum, from ``logits = λ x̂``
    (``|x̂| <= 1``); ``logits`` is overwritten."""
    if _unshifted_exp_ok(lam, logits.dtype):
        weights = logits.exp_()
    else:
        weights = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return weights, weights.sum(-1)


def _grouped_quad(weights, group, gram):
    """``w_mᵀ G_{group[m]} w_m`` for rows ``weights [M, R]`` sorted by ``group`` (one ``bmm``: the
    rows are scattered into a zero-padded ``[G, rows per group, R]`` tensor)."""
    n_groups, n_regions = gram.shape[0], gram.shape[-1]
    counts = torch.bincount(group, minlength=n_groups)  # [G]
    position = torch.arange(group.numel(), device=group.device) - (counts.cumsum(0) - counts).index_select(0, group)
    width = int(counts.max())
    flat = group * width + position  # [M] into [G*width]
    padded = weights.new_zeros(n_groups * width, n_regions).index_copy_(0, flat, weights)
    product = torch.bmm(padded.view(n_groups, width, n_regions), gram).view(-1, n_regions).index_select(0, flat)
    return torch.linalg.vecdot(product, weights)  # [M]


def _i2t_relevance(sim, mask, words, regions, lam, options):
    """Relevance ``[ci, slots, R]`` of each region (query) against its pair's real words."""
    ci, slots, n_words, n_regions = sim.shape
    region_norm = regions.norm(dim=-1).unsqueeze(1)  # [ci, 1, R]
    flat_words = words.view(ci * slots, n_words, -1)
    # [P, L, L]; padding words are never attended, so their rows and columns contribute nothing
    word_gram = torch.bmm(flat_words, flat_words.transpose(1, 2))
    real = mask.unsqueeze(-1)  # [ci, slots, L, 1]
    x = F.leaky_relu(sim, 0.1)
    # SCAN's attention over the real words, its normalisation over the regions for each word
    scan_attention = torch.softmax(x.mul_(lam / _scan_norm(x, 3)).masked_fill_(~real, float("-inf")), dim=2)
    if not options["uarda"]:
        return _cosine(
            (scan_attention * sim).sum(2), region_norm, _word_quad(scan_attention, word_gram)
        )
    t = options["threshold"]
    best = sim.masked_fill(~real, float("-inf")).amax(dim=2)  # [ci, slots, R] best real word
    live = best > t
    # positive branch: softmax of λ(s - t) over the relevant real words, shifted by the best
    weights = (sim - best.unsqueeze(2)).mul_(lam).clamp_max_(0.0).exp_()
    weights.mul_((sim > t) & real)
    total = weights.sum(2)  # [ci, slots, R]
    quad = _word_quad(weights, word_gram) / total.square()
    positive = _cosine((weights * sim).sum(2) / total, region_norm, quad)
    relevance_score = (scan_attention * sim).sum(2)
    return torch.where(live, positive + relevance_score, best - t)


def _word_quad(attention, word_gram):
    """``|Σ_i a_i w_i|²`` for every (slot, region) column of ``attention [ci, slots, L, R]``,
    through each caption's word Gram matrix: [P, L, L] x [P, L, R]."""
    ci, slots, n_words, n_regions = attention.shape
    columns = attention.reshape(ci * slots, n_words, n_regions)
    return (torch.bmm(word_gram, columns) * columns).sum(1).view(ci, slots, n_regions)  # [ci, slots, R]


def _pool(relevance, query_mask, aggregation, lam_lse, dim):
    """Pool query relevances into pair scores (LogSumExp or mean over the real queries)."""
    if aggregation == "lse":
        logits = relevance * lam_lse
        if query_mask is not None:
            logits = logits.masked_fill(~query_mask, float("-inf"))
        return torch.logsumexp(logits, dim=dim) / lam_lse
    if query_mask is None:
        return relevance.mean(dim=dim)
    weights = query_mask.to(relevance.dtype)
    return (relevance * weights).sum(dim=dim) / weights.sum(dim=dim)
