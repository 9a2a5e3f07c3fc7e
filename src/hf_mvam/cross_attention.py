"""Word–region cross-attention scoring (SCAN) and UARDA's learned relevance threshold.

This is a *remote-code* file: it is copied flat into saved model folders, so it imports only
``torch`` and the standard library (``tqdm`` optionally, for progress bars).

Contents, top to bottom
-----------------------
``cross_attention_scores``
    The full image × caption score matrix of stacked cross attention (SCAN, Lee et al., ECCV
    2018), vectorised over all pairs, chunked under a memory budget, and differentiable, so a
    model's training forward and its retrieval scorer are the very same function. Two threshold
    modes: ``"scan"`` (SCAN's LeakyReLU + L2 normalisation) and ``"uarda"`` (a relevance
    threshold ``t`` decides which fragments take part in the attention, and queries with no
    relevant fragment are skipped; formula below).
``word_region_attention``
    The attention of one pair (what each word looks at), for visualisation.
``gaussian_boundary``
    Where the relevant and irrelevant similarity Gaussians cross (NAAF's closed form).
``relevance_samples``
    Relevant / irrelevant similarity samples of one training batch.
``RelevanceThreshold``
    An ``nn.Module`` holding the learned threshold and its statistics as buffers (saved with
    the model), updated from the samples during training with momentum.

Notation
--------
``N_i`` images with ``R`` regions, ``N_t`` captions with ``L`` word slots (a mask marks the real
words), dimension ``D``. Fragments are L2-normalised, so ``s = w · v`` is a cosine similarity.
All blocks use the layout ``[ci, ct, L, R]``: image, caption, word, region.

How a pair is scored without materialising the attended vectors
---------------------------------------------------------------
SCAN's relevance of query word ``w`` is ``cos(w, c)`` with the attended vector
``c = Σ_j a_j v_j``. With ``s_j = w · v_j`` and the image's region Gram matrix ``G = V Vᵀ``
(``R × R``, computed once per image)::

    w · c = Σ_j a_j s_j            |c|² = aᵀ G a

so, after one large matrix multiply for all similarities, each (pair, word) costs ``O(R²)``
instead of the ``O(R·D)`` of forming ``c``. Image-to-text uses the caption's word Gram
``H = W Wᵀ`` (``L × L``) in the same way. The result equals SCAN's ``func_attention`` +
``cosine_similarity`` + LogSumExp up to floating-point rounding (the tests check it against a
per-pair loop, the benchmark against SCAN's sharded evaluation loop).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # tqdm is optional: without it progress bars are silently disabled.
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency of the package
    _tqdm = None

__all__ = [
    "SCAN_LAMBDA_SOFTMAX",
    "SCAN_LAMBDA_LSE",
    "cross_attention_scores",
    "word_region_attention",
    "gaussian_boundary",
    "relevance_samples",
    "RelevanceThreshold",
]

#: SCAN's inverse softmax temperature λ per direction (paper, Flickr30K/COCO settings).
SCAN_LAMBDA_SOFTMAX = {"t2i": 9.0, "i2t": 4.0}
#: SCAN's LogSumExp pooling factor λ_lse per direction.
SCAN_LAMBDA_LSE = {"t2i": 6.0, "i2t": 5.0}

_DIRECTIONS = ("t2i", "i2t", "both")
_AGGREGATIONS = ("lse", "mean")
_THRESHOLD_MODES = ("scan", "uarda")

# Number of [ci, ct, L, R]-sized float buffers alive at the peak of one chunk (similarities,
# activations, logits, attention, products, ...). Used to turn a memory budget into a chunk size.
_LIVE_BUFFERS_PER_CHUNK = 8
# Upper bound on one chunk's similarity block (elements), whatever the budget: blocks of a few
# million elements stay in the CPU's last-level cache and keep the elementwise work fast.
_MAX_FAST_CHUNK_ELEMENTS = 1 << 22

LambdaArg = Union[None, float, Sequence[float], Dict[str, float]]


# --------------------------------------------------------------------------------------------
# Public scoring function
# --------------------------------------------------------------------------------------------
def cross_attention_scores(
    image_fragments: torch.Tensor,
    text_fragments: torch.Tensor,
    text_mask: Optional[torch.Tensor] = None,
    *,
    direction: str = "t2i",
    aggregation: str = "lse",
    lambda_softmax: LambdaArg = None,
    lambda_lse: LambdaArg = None,
    threshold_mode: str = "scan",
    threshold: Union[float, torch.Tensor] = 0.0,
    chunk_size: Optional[Tuple[int, int]] = None,
    memory_budget_mb: float = 512.0,
    progress: bool = False,
    return_stats: bool = False,
    eps: float = 1e-8,
):
    r"""Image × caption cross-attention scores, SCAN-style, for every pair.

    Args:
        image_fragments: ``[N_i, R, D]`` region features, L2-normalised per region.
        text_fragments: ``[N_t, L, D]`` word features, L2-normalised per word.
        text_mask: ``[N_t, L]``, 1 (or True) for a real word, 0 for padding. ``None``: all real.
            Only real words count anywhere (normalisation, softmax, pooling), as SCAN truncates
            each caption to its length.
        direction: ``"t2i"`` (words attend to regions), ``"i2t"`` (regions attend to words) or
            ``"both"`` (the sum of the two scores).
        aggregation: ``"lse"`` — ``(1/λ_lse) log Σ_q exp(λ_lse r_q)`` over the queries — or
            ``"mean"`` over the queries.
        lambda_softmax: inverse softmax temperature λ. ``None``: SCAN's 9 (t2i) / 4 (i2t); a
            float for both directions; a pair ``(t2i, i2t)`` or a dict ``{"t2i": .., "i2t": ..}``.
        lambda_lse: LogSumExp factor, same forms. ``None``: SCAN's 6 (t2i) / 5 (i2t).
        threshold_mode: ``"scan"`` or ``"uarda"`` (see below).
        threshold: relevance threshold ``t`` (float or 0-d tensor; used in uarda mode only). It is
            read as a plain number: no gradient flows into it.
        chunk_size: ``(images, captions)`` per chunk. ``None``: chosen from the budget.
        memory_budget_mb: bound on the working memory of one chunk (all of its
            ``[images, captions, L, R]`` intermediates together, about 8 of them at 4 bytes
            per element for float32). With autograd recording, every chunk's intermediates are
            kept for the backward pass, so the budget then bounds each chunk, not the total.
        progress: show a tqdm bar over the chunks.
        return_stats: also return a dict with the number of queries and of attended (not
            skipped) queries per direction.
        eps: SCAN's epsilon in L2 normalisation and in the cosine denominator.

    Returns:
        ``[N_i, N_t]`` scores (and the stats dict if ``return_stats``).

    **scan mode** (SCAN, text-to-image; words ``w_i`` are the queries, regions ``v_j`` the
    context)::

        s_ij = w_i · v_j
        x_ij = LeakyReLU_0.1(s_ij)
        x̂_ij = x_ij / (sqrt(Σ_{i' real} x_i'j²) + eps)         # over the WORD axis, per region
        a_ij = softmax_j(λ x̂_ij)                                # over the regions
        r_i  = cos(w_i, Σ_j a_ij v_j) = Σ_j a_ij s_ij / max(|w_i| sqrt(a_iᵀ G a_i), eps)
        score = (1/λ_lse) log Σ_{i real} exp(λ_lse r_i)         # or the mean over real words

    Image-to-text swaps the roles: regions are the queries, the softmax runs over the real words
    only, the normalisation over the regions, and the pooling over the regions.

    **uarda mode** (our reading of UARDA's abstract; the threshold ``t`` replaces the zero of
    SCAN's (Leaky)ReLU). For a query ``q`` and context fragments ``k`` of one pair::

        K_q  = {k : s_qk > t}                                   # relevant fragments
        z_qk = max(s_qk - t, 0)
        ẑ_qk = z_qk / (sqrt(Σ_{q' real} z_q'k²) + eps)           # SCAN's normalisation, on z
        a_qk = exp(λ ẑ_qk) / Σ_{k' ∈ K_q} exp(λ ẑ_qk')  if k ∈ K_q, else 0   # masked softmax
        r_q  = cos(q, Σ_k a_qk v_k)                 if K_q is not empty
        r_q  = max_k s_qk   (< t: the best, insufficient evidence)   if K_q is empty ("skipped")
        score = (1/λ_lse) log Σ_q exp(λ_lse r_q)                # or the mean, over real queries

    Irrelevant fragments therefore take no part in the attention, and a skipped query costs
    only its similarity row: the attention, normalisation and Gram work is done on the compacted
    (pair, query) rows that have a relevant fragment. For ``t ≥ 0`` an attended query always
    scores above ``t`` (``cos(q, c) ≥ q·c = Σ a_k s_qk > t`` since ``|c| ≤ 1``) and a skipped one
    below it, so the two cases stay ordered. Both cases are exact and differentiable (the
    gradient of a skipped query flows through its best similarity).
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {_AGGREGATIONS}, got {aggregation!r}")
    if threshold_mode not in _THRESHOLD_MODES:
        raise ValueError(
            f"threshold_mode must be one of {_THRESHOLD_MODES}, got {threshold_mode!r}"
        )
    word_mask = _validate_fragments(image_fragments, text_fragments, text_mask)
    lam_softmax = _per_direction(lambda_softmax, SCAN_LAMBDA_SOFTMAX, "lambda_softmax")
    lam_lse = _per_direction(lambda_lse, SCAN_LAMBDA_LSE, "lambda_lse")
    t = float(threshold)
    if threshold_mode == "uarda" and not math.isfinite(t):
        raise ValueError(f"threshold must be finite, got {t}")
    directions = ("t2i", "i2t") if direction == "both" else (direction,)

    n_img, n_reg, _ = image_fragments.shape
    n_txt, n_word, _ = text_fragments.shape
    img_chunk, txt_chunk = _plan_chunks(
        n_img, n_txt, n_reg, n_word, chunk_size, memory_budget_mb, image_fragments.element_size()
    )

    # Per-fragment quantities computed once for all chunks.
    image_gram = torch.matmul(image_fragments, image_fragments.transpose(1, 2))  # [N_i, R, R]
    region_norm = image_fragments.norm(dim=-1)  # [N_i, R]
    word_gram = torch.matmul(text_fragments, text_fragments.transpose(1, 2))  # [N_t, L, L]
    word_norm = text_fragments.norm(dim=-1)  # [N_t, L]

    scores = image_fragments.new_zeros(n_img, n_txt)  # [N_i, N_t]
    stats = {f"{d}_{k}": 0 for d in directions for k in ("queries", "attended")}
    n_chunks = -(-n_img // img_chunk) * -(-n_txt // txt_chunk)
    bar = _tqdm(total=n_chunks, desc="cross-attention", unit="chunk") if (
        progress and _tqdm is not None
    ) else None

    for t0 in range(0, n_txt, txt_chunk):
        t1 = min(t0 + txt_chunk, n_txt)
        words = text_fragments[t0:t1]  # [ct, L, D]
        words_flat = words.reshape(-1, words.shape[-1])  # [ct*L, D]
        mask = word_mask[t0:t1]  # [ct, L]
        for i0 in range(0, n_img, img_chunk):
            i1 = min(i0 + img_chunk, n_img)
            regions = image_fragments[i0:i1]  # [ci, R, D]
            # One batched matrix multiply gives every word–region similarity of the chunk:
            # [ct*L, D] x [ci, D, R] -> [ci, ct*L, R] -> [ci, ct, L, R]
            sim = torch.matmul(words_flat, regions.transpose(1, 2))
            sim = sim.view(i1 - i0, t1 - t0, n_word, n_reg)  # [ci, ct, L, R]
            block = None
            for d in directions:
                if d == "t2i":
                    rel, qmask, n_q, n_att = _t2i_relevance(
                        sim, mask, word_norm[t0:t1], image_gram[i0:i1],
                        lam_softmax["t2i"], threshold_mode, t, eps,
                    )  # rel, qmask: [ci, ct, L]
                else:
                    rel, qmask, n_q, n_att = _i2t_relevance(
                        sim, mask, region_norm[i0:i1], word_gram[t0:t1],
                        lam_softmax["i2t"], threshold_mode, t, eps,
                    )  # rel: [ci, ct, R]; qmask None (all regions are real)
                pooled = _pool(rel, qmask, aggregation, lam_lse[d])  # [ci, ct]
                block = pooled if block is None else block + pooled
                stats[f"{d}_queries"] += n_q
                stats[f"{d}_attended"] += n_att
            scores[i0:i1, t0:t1] = block  # autograd records this slice copy
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    if return_stats:
        for d in directions:
            q = stats[f"{d}_queries"]
            stats[f"{d}_skipped_fraction"] = 1.0 - stats[f"{d}_attended"] / q if q else 0.0
        stats["chunk_size"] = (img_chunk, txt_chunk)
        return scores, stats
    return scores


@torch.no_grad()
def word_region_attention(
    image_fragments: torch.Tensor,
    text_fragments: torch.Tensor,
    text_mask: Optional[torch.Tensor] = None,
    *,
    lambda_softmax: LambdaArg = None,
    threshold_mode: str = "scan",
    threshold: Union[float, torch.Tensor] = 0.0,
    eps: float = 1e-8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Text-to-image attention of ONE pair, for visualisation: what each word looks at.

    Args:
        image_fragments: ``[R, D]`` regions of one image.
        text_fragments: ``[L, D]`` words of one caption.
        text_mask: ``[L]`` real-word mask, or ``None``.
        lambda_softmax, threshold_mode, threshold, eps: as in :func:`cross_attention_scores`
            (the t2i λ is used).

    Returns:
        ``(attention [L, R], relevant [L, R])``: the attention weights ``a_ij`` that
        :func:`cross_attention_scores` uses in the t2i direction, and the mask of relevant
        fragments (``s_ij > t``; all True in scan mode). Rows of padding words, and in uarda
        mode of skipped words (no relevant region), are all zero.
    """
    if image_fragments.dim() != 2 or text_fragments.dim() != 2:
        raise ValueError(
            "word_region_attention takes one pair: image [R, D] and text [L, D], got "
            f"{tuple(image_fragments.shape)} and {tuple(text_fragments.shape)}"
        )
    if threshold_mode not in _THRESHOLD_MODES:
        raise ValueError(
            f"threshold_mode must be one of {_THRESHOLD_MODES}, got {threshold_mode!r}"
        )
    mask = None if text_mask is None else text_mask.reshape(1, -1)
    real = _validate_fragments(image_fragments[None], text_fragments[None], mask)[0]  # [L]
    lam = _per_direction(lambda_softmax, SCAN_LAMBDA_SOFTMAX, "lambda_softmax")["t2i"]
    sim = text_fragments @ image_fragments.T  # [L, R]
    keep = real.unsqueeze(1).to(sim.dtype)  # [L, 1]
    if threshold_mode == "scan":
        x = F.leaky_relu(sim, 0.1) * keep  # [L, R]
        relevant = torch.ones_like(sim, dtype=torch.bool)
    else:
        t = float(threshold)
        relevant = sim > t  # [L, R]
        x = (sim - t).clamp_min(0.0) * keep  # [L, R]
    norm = _sqrt_plus_eps(x.square().sum(dim=0, keepdim=True), eps)  # [1, R] over the words
    logits = (x * (lam / norm)).masked_fill(~relevant, float("-inf"))  # [L, R]
    attended = relevant.any(dim=1, keepdim=True) & real.unsqueeze(1)  # [L, 1]
    logits = logits.masked_fill(~attended, 0.0)  # rows with no relevant region: finite
    attention = torch.softmax(logits, dim=-1) * attended.to(sim.dtype)  # [L, R]
    return attention, relevant & real.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Per-chunk relevance of every query
# --------------------------------------------------------------------------------------------
def _t2i_relevance(sim, word_mask, word_norm, image_gram, lam, mode, t, eps):
    """Relevance ``r`` of every word of every (image, caption) pair of a chunk.

    Args:
        sim: ``[ci, ct, L, R]`` word–region similarities.
        word_mask: ``[ct, L]`` bool, real words.
        word_norm: ``[ct, L]`` word norms (1 for normalised input; kept for SCAN's cosine).
        image_gram: ``[ci, R, R]`` region Gram matrices.

    Returns:
        ``(r [ci, ct, L], query_mask [1, ct, L], n_queries, n_attended)``.
    """
    ci, ct, n_word, n_reg = sim.shape
    real = word_mask.unsqueeze(0)  # [1, ct, L]
    n_queries = ci * int(word_mask.sum())
    if mode == "scan":
        # LeakyReLU, then L2 normalisation over the real words for each region.
        x = F.leaky_relu(sim, 0.1) * real.unsqueeze(-1).to(sim.dtype)  # [ci, ct, L, R]
        norm = _sqrt_plus_eps(x.square().sum(dim=2, keepdim=True), eps)  # [ci, ct, 1, R]
        attn = torch.softmax(x * (lam / norm), dim=-1)  # [ci, ct, L, R], softmax over regions
        numerator = (attn * sim).sum(dim=-1)  # [ci, ct, L]  = w · c
        # |c|² = aᵀ G a, batched per image: [ci, ct*L, R] x [ci, R, R] -> [ci, ct*L, R]
        attn_rows = attn.view(ci, ct * n_word, n_reg)
        quad = (torch.bmm(attn_rows, image_gram) * attn_rows).sum(dim=-1)  # [ci, ct*L]
        quad = quad.view(ci, ct, n_word)  # [ci, ct, L]
        rel = numerator / (word_norm * quad.clamp_min(eps * eps).sqrt()).clamp_min(eps)
        return rel, real, n_queries, n_queries

    # ---- uarda mode -------------------------------------------------------------------------
    best = sim.amax(dim=-1)  # [ci, ct, L]  max_j s_ij: the contribution of a skipped word
    live = (best > t) & real  # [ci, ct, L]  real words with at least one relevant region
    rows = live.reshape(-1).nonzero().squeeze(1)  # [M] flat (image, caption, word) indices
    if rows.numel() == 0:
        return best, real, n_queries, 0
    s_rows = sim.reshape(-1, n_reg).index_select(0, rows)  # [M, R] similarities of live rows
    z = (s_rows - t).clamp_min(0.0)  # [M, R]  relu(s - t)
    # Normalisation over the words, per (pair, region): skipped and padding words have z = 0,
    # so summing over the live rows only is exact.
    pair = torch.div(rows, n_word, rounding_mode="floor")  # [M] flat (image, caption) index
    sq_sum = z.new_zeros(ci * ct, n_reg).index_add_(0, pair, z.square())  # [ci*ct, R]
    norm = _sqrt_plus_eps(sq_sum, eps).index_select(0, pair)  # [M, R]
    logits = (z * (lam / norm)).masked_fill(s_rows <= t, float("-inf"))  # [M, R]
    attn = torch.softmax(logits, dim=-1)  # [M, R]  masked softmax over relevant regions
    numerator = (attn * s_rows).sum(dim=-1)  # [M]
    image = torch.div(rows, ct * n_word, rounding_mode="floor")  # [M] image of each row (sorted)
    quad = _grouped_quadratic_form(attn, image, image_gram)  # [M]
    word = rows % (ct * n_word)  # [M] flat (caption, word) index
    denom = word_norm.reshape(-1).index_select(0, word) * quad.clamp_min(eps * eps).sqrt()
    rel_live = numerator / denom.clamp_min(eps)  # [M]
    rel = best.reshape(-1).index_put((rows,), rel_live).view(ci, ct, n_word)  # [ci, ct, L]
    return rel, real, n_queries, int(rows.numel())


def _i2t_relevance(sim, word_mask, region_norm, word_gram, lam, mode, t, eps):
    """Relevance ``r`` of every region of every (image, caption) pair of a chunk.

    Args:
        sim: ``[ci, ct, L, R]`` word–region similarities.
        word_mask: ``[ct, L]`` bool, real words (the context; padding is never attended).
        region_norm: ``[ci, R]`` region norms.
        word_gram: ``[ct, L, L]`` word Gram matrices of the captions.

    Returns:
        ``(r [ci, ct, R], None, n_queries, n_attended)``; all regions are real queries.
    """
    ci, ct, n_word, n_reg = sim.shape
    pad = ~word_mask.view(1, ct, n_word, 1)  # [1, ct, L, 1]
    n_queries = ci * ct * n_reg
    if mode == "scan":
        # LeakyReLU, then L2 normalisation over the regions for each word.
        x = F.leaky_relu(sim, 0.1)  # [ci, ct, L, R]
        norm = _sqrt_plus_eps(x.square().sum(dim=-1, keepdim=True), eps)  # [ci, ct, L, 1]
        logits = (x * (lam / norm)).masked_fill(pad, float("-inf"))  # [ci, ct, L, R]
        attn = torch.softmax(logits, dim=2)  # [ci, ct, L, R], softmax over the real words
        numerator = (attn * sim).sum(dim=2)  # [ci, ct, R]  = v · c
        # |c|² = aᵀ H a with the caption's word Gram, batched per caption:
        # [ci, ct, L, R] -> [ct, L, ci, R] -> [ct, L, ci*R]
        attn_t = attn.permute(1, 2, 0, 3).reshape(ct, n_word, ci * n_reg)
        quad = (torch.bmm(word_gram, attn_t) * attn_t).sum(dim=1)  # [ct, ci*R]
        quad = quad.view(ct, ci, n_reg).transpose(0, 1)  # [ci, ct, R]
        denom = region_norm.unsqueeze(1) * quad.clamp_min(eps * eps).sqrt()  # [ci, ct, R]
        rel = numerator / denom.clamp_min(eps)
        return rel, None, n_queries, n_queries

    # ---- uarda mode -------------------------------------------------------------------------
    best = sim.masked_fill(pad, float("-inf")).amax(dim=2)  # [ci, ct, R] best real word
    # Live (pair, region) rows in caption-major order, so rows of one caption are contiguous
    # for the grouped word-Gram product: [ci, ct, R] -> [ct, ci, R]
    live = (best > t).transpose(0, 1)  # [ct, ci, R]
    rows = live.reshape(-1).nonzero().squeeze(1)  # [M] flat (caption, image, region) indices
    if rows.numel() == 0:
        return best, None, n_queries, 0
    caption = torch.div(rows, ci * n_reg, rounding_mode="floor")  # [M] (sorted)
    image = torch.div(rows, n_reg, rounding_mode="floor") % ci  # [M]
    region = rows % n_reg  # [M]
    # Similarities of the live rows against all word slots: [ci, ct, R, L] gathered -> [M, L]
    s_rows = sim.permute(0, 1, 3, 2)[image, caption, region]
    relevant = (s_rows > t) & word_mask.index_select(0, caption)  # [M, L]
    z = (s_rows - t).clamp_min(0.0) * relevant.to(s_rows.dtype)  # [M, L]
    # Normalisation over the regions, per (pair, word): non-live regions have z = 0.
    pair = image * ct + caption  # [M] flat (image, caption) index
    sq_sum = z.new_zeros(ci * ct, n_word).index_add_(0, pair, z.square())  # [ci*ct, L]
    norm = _sqrt_plus_eps(sq_sum, eps).index_select(0, pair)  # [M, L]
    logits = (z * (lam / norm)).masked_fill(~relevant, float("-inf"))  # [M, L]
    attn = torch.softmax(logits, dim=-1)  # [M, L]  masked softmax over relevant real words
    numerator = (attn * s_rows).sum(dim=-1)  # [M]
    quad = _grouped_quadratic_form(attn, caption, word_gram)  # [M]
    denom = region_norm[image, region] * quad.clamp_min(eps * eps).sqrt()  # [M]
    rel_live = numerator / denom.clamp_min(eps)  # [M]
    flat = pair * n_reg + region  # [M] index into [ci, ct, R]
    rel = best.reshape(-1).index_put((flat,), rel_live).view(ci, ct, n_reg)  # [ci, ct, R]
    return rel, None, n_queries, int(rows.numel())


def _sqrt_plus_eps(square_sum, eps):
    """SCAN's L2 norm ``sqrt(Σ x²) + eps``, with a zero (not NaN) gradient where ``Σ x² = 0``.

    An all-zero column (a padding word, or a fragment no query finds relevant) has norm
    ``eps``; clamping at the dtype's smallest normal number before the square root changes no
    value that matters (``sqrt(tiny) ≪ eps``) and keeps ``0 · ∞`` out of the backward pass.
    """
    return square_sum.clamp_min(torch.finfo(square_sum.dtype).tiny).sqrt() + eps


def _grouped_quadratic_form(vectors, group, gram):
    """``vectors[m]ᵀ gram[group[m]] vectors[m]`` for every row, as one batched matmul.

    Args:
        vectors: ``[M, K]`` rows (attention weights).
        group: ``[M]`` group of each row, sorted ascending (rows of a group are contiguous).
        gram: ``[G, K, K]`` one Gram matrix per group.

    Rows are scattered into a zero-padded ``[G, max_rows_per_group, K]`` tensor so that every
    group's rows meet its Gram matrix in one ``bmm``; the padding rows cost a little work but no
    per-group Python loop.
    """
    n_groups = gram.shape[0]
    counts = torch.bincount(group, minlength=n_groups)  # [G]
    starts = counts.cumsum(0) - counts  # [G] first row of each group
    slot = torch.arange(group.numel(), device=group.device) - starts.index_select(0, group)  # [M]
    width = int(counts.max())
    padded = vectors.new_zeros(n_groups, width, vectors.shape[1])  # [G, width, K]
    padded = padded.index_put((group, slot), vectors)
    product = torch.bmm(padded, gram)[group, slot]  # [G, width, K] -> [M, K]
    return (product * vectors).sum(dim=-1)  # [M]


def _pool(rel, query_mask, aggregation, lam_lse):
    """Pool the query relevances ``rel [ci, ct, Q]`` into pair scores ``[ci, ct]``."""
    if aggregation == "lse":
        logits = rel * lam_lse
        if query_mask is not None:
            logits = logits.masked_fill(~query_mask, float("-inf"))
        return torch.logsumexp(logits, dim=-1) / lam_lse
    if query_mask is None:
        return rel.mean(dim=-1)
    weights = query_mask.to(rel.dtype)  # [1, ct, Q]
    return (rel * weights).sum(dim=-1) / weights.sum(dim=-1)


# --------------------------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------------------------
def _validate_fragments(image_fragments, text_fragments, text_mask):
    """Check shapes, emptiness and finiteness; return the boolean word mask ``[N_t, L]``."""
    for name, x in (("image_fragments", image_fragments), ("text_fragments", text_fragments)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape [N, fragments, dim], got {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): nothing to score")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinite values (padding included)")
    if image_fragments.shape[-1] != text_fragments.shape[-1]:
        raise ValueError(
            "image and text fragments must share the feature dimension, got "
            f"{image_fragments.shape[-1]} and {text_fragments.shape[-1]}"
        )
    if image_fragments.device != text_fragments.device:
        raise ValueError("image_fragments and text_fragments are on different devices")
    if image_fragments.dtype != text_fragments.dtype:
        raise ValueError(
            f"dtype mismatch: image_fragments {image_fragments.dtype}, "
            f"text_fragments {text_fragments.dtype}"
        )
    n_txt, n_word, _ = text_fragments.shape
    if text_mask is None:
        return torch.ones(n_txt, n_word, dtype=torch.bool, device=text_fragments.device)
    if tuple(text_mask.shape) != (n_txt, n_word):
        raise ValueError(
            f"text_mask must have shape {(n_txt, n_word)}, got {tuple(text_mask.shape)}"
        )
    if text_mask.is_floating_point() and not bool(torch.isfinite(text_mask).all()):
        raise ValueError("text_mask contains NaN or infinite values")
    mask = text_mask.to(device=text_fragments.device) != 0  # [N_t, L] bool
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        shown = empty[:10].tolist()
        raise ValueError(
            f"{empty.numel()} caption(s) have no real word (all padding), e.g. indices {shown}; "
            "remove them or give them at least one token"
        )
    return mask


def _per_direction(value, defaults, name):
    """Resolve a λ argument into ``{"t2i": float, "i2t": float}``."""
    if value is None:
        out = dict(defaults)
    elif isinstance(value, dict):
        out = dict(defaults)
        out.update({k: float(v) for k, v in value.items()})
    elif isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} as a sequence must be (t2i, i2t), got {value!r}")
        out = {"t2i": float(value[0]), "i2t": float(value[1])}
    else:
        out = {"t2i": float(value), "i2t": float(value)}
    for k, v in out.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be positive and finite, got {v} for {k}")
    return out


def _plan_chunks(n_img, n_txt, n_reg, n_word, chunk_size, memory_budget_mb, element_size):
    """Choose ``(images, captions)`` per chunk.

    The ``[ci, ct, L, R]`` block has ``ci·ct·L·R`` elements; about ``_LIVE_BUFFERS_PER_CHUNK``
    such buffers live at once, so the budget allows
    ``budget / (element_size · _LIVE_BUFFERS_PER_CHUNK)`` elements per block, further capped at
    ``_MAX_FAST_CHUNK_ELEMENTS`` (cache-friendly). Images are chunked first (up to 128, SCAN's
    shard size, which keeps the per-image Gram products efficient), captions fill the rest.
    """
    if chunk_size is not None:
        ci, ct = (int(c) for c in chunk_size)
        if ci < 1 or ct < 1:
            raise ValueError(f"chunk_size must be two positive integers, got {chunk_size!r}")
        return min(ci, n_img), min(ct, n_txt)
    if not (memory_budget_mb > 0):
        raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
    budget_elements = int(memory_budget_mb * 2**20 / (element_size * _LIVE_BUFFERS_PER_CHUNK))
    max_elements = max(1, min(budget_elements, _MAX_FAST_CHUNK_ELEMENTS))
    per_pair = n_word * n_reg
    ci = max(1, min(n_img, 128, max_elements // per_pair))
    ct = max(1, min(n_txt, max_elements // (per_pair * ci)))
    if ct == n_txt:  # all captions fit: spend the rest of the budget on images
        ci = max(1, min(n_img, max_elements // (per_pair * ct)))
    return ci, ct


# --------------------------------------------------------------------------------------------
# Relevance threshold
# --------------------------------------------------------------------------------------------
def gaussian_boundary(
    mu_pos: float, std_pos: float, mu_neg: float, std_neg: float, alpha: float = 2.0
) -> float:
    r"""Threshold ``t`` with ``N(t; μ+, σ+) = α · N(t; μ−, σ−)`` (NAAF's closed form).

    Taking logs and multiplying by ``2σ+²σ−²`` gives ``q(t) = A t² + B t + C = 0`` with::

        A = σ+² − σ−²
        B = 2 (μ+ σ−² − μ− σ+²)
        C = (μ− σ+)² − (μ+ σ−)² + 2 (σ+ σ−)² ln(σ− / (α σ+))

    and ``q(t) = 2σ+²σ−² · (ln N(t;μ+,σ+) − ln N(t;μ−,σ−) − ln α)``. The boundary is the root
    where ``q`` crosses zero upwards (relevant density overtakes α × irrelevant density as ``t``
    grows), ``t = (−B + √(B² − 4AC)) / 2A`` — NAAF's formula; it is the larger root when
    σ+ > σ− and the root between the means otherwise. It is evaluated in the cancellation-free
    form ``−2C / (B + √(B² − 4AC))`` when ``B > 0``, which also covers σ+ = σ− (``A = 0``: the
    linear solution ``−C/B``).

    Falls back to the midpoint of the means when the inputs are not finite, a σ is (nearly)
    zero, there is no real root, or no upward crossing exists.
    """
    mu_p, sd_p, mu_n, sd_n, alpha = (float(v) for v in (mu_pos, std_pos, mu_neg, std_neg, alpha))
    midpoint = 0.5 * (mu_p + mu_n)
    if not all(math.isfinite(v) for v in (mu_p, sd_p, mu_n, sd_n, alpha)) or alpha <= 0:
        return midpoint if math.isfinite(midpoint) else 0.0
    if sd_p < 1e-6 or sd_n < 1e-6:
        return midpoint
    var_p, var_n = sd_p * sd_p, sd_n * sd_n
    a = var_p - var_n
    b = 2.0 * (mu_p * var_n - mu_n * var_p)
    c = (mu_n * sd_p) ** 2 - (mu_p * sd_n) ** 2 + 2.0 * var_p * var_n * math.log(sd_n / (alpha * sd_p))
    disc = b * b - 4.0 * a * c
    if disc < 0:
        return midpoint
    root = math.sqrt(disc)
    if b > 0:
        return -2.0 * c / (b + root)
    if abs(a) > 1e-12 * max(var_p, var_n):
        return (-b + root) / (2.0 * a)
    return midpoint  # A = 0 and B <= 0: the relevant density never overtakes from below


@torch.no_grad()
def relevance_samples(
    image_fragments: torch.Tensor,
    text_fragments: torch.Tensor,
    text_mask: Optional[torch.Tensor],
    scores: torch.Tensor,
    negative: str = "hardest",
    only_correct: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Relevant and irrelevant word–region similarity samples of a training batch.

    The batch pairs image ``b`` with caption ``b`` (``N_i == N_t``; repeat images for several
    captions per image). For every real word of caption ``b``:

    * relevant sample: ``max_j s_ij`` against its own image ``b``;
    * irrelevant sample: ``max_j s_ij`` against the negative image — the highest-scoring other
      image (``negative="hardest"``) or the lowest-scoring one (``"easiest"``, as NAAF does).

    Args:
        image_fragments: ``[B, R, D]``.
        text_fragments: ``[B, L, D]``.
        text_mask: ``[B, L]`` or ``None``.
        scores: ``[B, B]`` image × caption scores of the batch (used only to pick negatives).
        negative: ``"hardest"`` or ``"easiest"``.
        only_correct: keep only captions whose best image is their own (NAAF's mismatch
            mining), so that the samples reflect what the model already separates.

    Returns:
        ``(relevant [n], irrelevant [n])`` detached 1-D tensors (same words, same order).
    """
    word_mask = _validate_fragments(image_fragments, text_fragments, text_mask)
    batch = image_fragments.shape[0]
    if text_fragments.shape[0] != batch or tuple(scores.shape) != (batch, batch):
        raise ValueError(
            "relevance_samples expects a square batch where image b matches caption b: got "
            f"{batch} images, {text_fragments.shape[0]} captions, scores {tuple(scores.shape)}"
        )
    if batch < 2:
        raise ValueError("relevance_samples needs at least 2 pairs (one negative per caption)")
    if negative not in ("hardest", "easiest"):
        raise ValueError(f"negative must be 'hardest' or 'easiest', got {negative!r}")
    s = scores.detach().clone()  # [B_img, B_txt]
    diag = torch.eye(batch, dtype=torch.bool, device=s.device)
    if negative == "hardest":
        neg_image = s.masked_fill(diag, float("-inf")).argmax(dim=0)  # [B]
    else:
        neg_image = s.masked_fill(diag, float("inf")).argmin(dim=0)  # [B]
    words = text_fragments.detach()
    regions = image_fragments.detach()
    # Best region per word, against the own image and against the negative image: [B, L]
    pos = torch.einsum("bld,brd->blr", words, regions).amax(dim=-1)
    neg = torch.einsum("bld,brd->blr", words, regions[neg_image.to(regions.device)]).amax(dim=-1)
    keep = word_mask  # [B, L]
    if only_correct:
        correct = s.argmax(dim=0) == torch.arange(batch, device=s.device)  # [B]
        keep = keep & correct.to(keep.device).unsqueeze(1)
    return pos[keep], neg[keep]


class RelevanceThreshold(nn.Module):
    """UARDA's learned relevance threshold, estimated as in NAAF.

    During training (``self.training``), :meth:`update` collects relevant and irrelevant
    similarity samples (see :func:`relevance_samples`) into ring buffers of the most recent
    ``capacity`` values. Once ``min_samples`` of each are available, every update fits a Gaussian
    to each buffer, solves ``N(t; μ+, σ+) = α N(t; μ−, σ−)`` (:func:`gaussian_boundary`), clips
    to ``clip`` and moves the threshold::

        threshold ← update_weight · estimate + (1 − update_weight) · threshold   (0.7 / 0.3)

    The first estimate is taken directly. In eval mode nothing changes. All state lives in
    buffers (saved in the state dict, never trained by gradient).

    Buffers: ``threshold``, ``relevant_mean``, ``relevant_std``, ``irrelevant_mean``,
    ``irrelevant_std``, ``relevant_samples``, ``irrelevant_samples`` (``[capacity]``),
    ``relevant_seen``, ``irrelevant_seen`` (samples pushed so far) and ``num_updates``.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        update_weight: float = 0.7,
        min_samples: int = 256,
        capacity: int = 2048,
        init_threshold: float = 0.0,
        clip: Tuple[float, float] = (-1.0, 1.0),
    ):
        super().__init__()
        if capacity < min_samples or min_samples < 2:
            raise ValueError(
                f"need 2 <= min_samples <= capacity, got min_samples={min_samples}, "
                f"capacity={capacity}"
            )
        if not 0.0 < update_weight <= 1.0:
            raise ValueError(f"update_weight must be in (0, 1], got {update_weight}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = float(alpha)
        self.update_weight = float(update_weight)
        self.min_samples = int(min_samples)
        self.capacity = int(capacity)
        self.clip = (float(clip[0]), float(clip[1]))
        self.register_buffer("threshold", torch.tensor(float(init_threshold)))
        for name in ("relevant_mean", "relevant_std", "irrelevant_mean", "irrelevant_std"):
            self.register_buffer(name, torch.tensor(float("nan")))
        self.register_buffer("relevant_samples", torch.zeros(self.capacity))
        self.register_buffer("irrelevant_samples", torch.zeros(self.capacity))
        self.register_buffer("relevant_seen", torch.tensor(0, dtype=torch.long))
        self.register_buffer("irrelevant_seen", torch.tensor(0, dtype=torch.long))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    def forward(self) -> torch.Tensor:
        """The current threshold (0-d tensor)."""
        return self.threshold

    def extra_repr(self) -> str:
        return (
            f"threshold={float(self.threshold):.4f}, alpha={self.alpha}, "
            f"update_weight={self.update_weight}, min_samples={self.min_samples}, "
            f"capacity={self.capacity}, clip={self.clip}"
        )

    @torch.no_grad()
    def update(self, relevant: torch.Tensor, irrelevant: torch.Tensor) -> bool:
        """Add samples and, once enough are collected, move the threshold.

        Args:
            relevant: 1-D similarities of words against their matched image.
            irrelevant: 1-D similarities of words against a negative image.

        Returns:
            ``True`` if the threshold was updated. Always ``False`` in eval mode.
        """
        if not self.training:
            return False
        self._push(self.relevant_samples, self.relevant_seen, relevant)
        self._push(self.irrelevant_samples, self.irrelevant_seen, irrelevant)
        n_rel = min(int(self.relevant_seen), self.capacity)
        n_irr = min(int(self.irrelevant_seen), self.capacity)
        if min(n_rel, n_irr) < self.min_samples:
            return False
        rel = self.relevant_samples[:n_rel].double()
        irr = self.irrelevant_samples[:n_irr].double()
        mu_p, sd_p = float(rel.mean()), float(rel.std())
        mu_n, sd_n = float(irr.mean()), float(irr.std())
        estimate = gaussian_boundary(mu_p, sd_p, mu_n, sd_n, self.alpha)
        estimate = min(max(estimate, self.clip[0]), self.clip[1])
        if int(self.num_updates) > 0:
            estimate = self.update_weight * estimate + (1.0 - self.update_weight) * float(
                self.threshold
            )
        self.threshold.fill_(estimate)
        self.relevant_mean.fill_(mu_p)
        self.relevant_std.fill_(sd_p)
        self.irrelevant_mean.fill_(mu_n)
        self.irrelevant_std.fill_(sd_n)
        self.num_updates += 1
        return True

    def _push(self, buffer: torch.Tensor, seen: torch.Tensor, values: torch.Tensor) -> None:
        """Append finite ``values`` to the ring ``buffer``; ``seen`` counts all pushes."""
        values = values.detach().reshape(-1).to(device=buffer.device, dtype=buffer.dtype)
        values = values[torch.isfinite(values)]
        n = values.numel()
        if n == 0:
            return
        start = int(seen) + max(0, n - self.capacity)  # ring position of the first kept value
        values = values[-self.capacity:]  # only the most recent `capacity` values can stay
        positions = (start + torch.arange(values.numel(), device=buffer.device)) % self.capacity
        buffer[positions] = values
        seen += n
