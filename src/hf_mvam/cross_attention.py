"""SCAN-style word–region cross-attention scores of every image–caption pair (Lee et al., ECCV 2018).

This is a remote-code file: it is copied flat into saved model folders and imports only torch
and the standard library (tqdm optionally, for a progress bar).

:func:`cross_attention_scores` computes the ``[N_images, N_texts]`` score matrix, vectorised over
all pairs, chunked under a memory budget and differentiable, so that a model's training forward
and its retrieval scorer are the same function. Two threshold modes: ``"scan"`` (SCAN: every
fragment takes part) and ``"uarda"`` (a relevance threshold ``t`` decides which fragments take
part, with NAAF's negative and positive branches). How UARDA learns ``t`` is its own idea and
lives in ``modeling_uarda.py``; this file only applies a given ``t``.

Notation: ``N_i`` images of ``R`` regions, ``N_t`` captions of ``L`` word slots (a mask marks the
real words), dimension ``D``. Fragments are L2-normalised, so ``s = w · v`` is a cosine. A chunk of
``ct`` captions and ``ci`` images is one matrix product ``[ct·L, D] x [D, ci·R]``, viewed as the
block ``[ct, L, ci, R]`` (caption, word, image, region) that everything else works on.

A pair is scored without forming the attended vectors. SCAN's relevance of a query word ``w`` is
``cos(w, c)`` with ``c = Σ_j a_j v_j``. With ``s_j = w · v_j`` and the image's region Gram matrix
``G = V Vᵀ`` (``R x R``, computed once per image)::

    w · c = Σ_j a_j s_j            |c|² = aᵀ G a

so after the one matrix product for all similarities, each (pair, word) costs ``O(R²)`` instead
of the ``O(R·D)`` of forming ``c``. Image-to-text uses each caption's word Gram matrix ``H = W Wᵀ``
in the same way.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

try:  # tqdm is optional: without it there is no progress bar.
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency of the package
    _tqdm = None

__all__ = [
    "THRESHOLD_MODES",
    "DIRECTIONS",
    "AGGREGATIONS",
    "SCAN_LAMBDA_SOFTMAX",
    "SCAN_LAMBDA_LSE",
    "NAAF_LAMBDA_SOFTMAX",
    "cross_attention_scores",
]

#: The choices of :func:`cross_attention_scores` (and of ``UARDAConfig``, which imports them).
THRESHOLD_MODES = ("scan", "uarda")
DIRECTIONS = ("t2i", "i2t", "both")
AGGREGATIONS = ("lse", "mean")

#: SCAN's inverse softmax temperature λ per direction.
SCAN_LAMBDA_SOFTMAX = {"t2i": 9.0, "i2t": 4.0}
#: SCAN's LogSumExp pooling factor λ_lse per direction.
SCAN_LAMBDA_LSE = {"t2i": 6.0, "i2t": 5.0}
#: uarda mode's λ: NAAF's 20 for text-to-image (NAAF scores that direction only, so image-to-text
#: keeps SCAN's 4).
NAAF_LAMBDA_SOFTMAX = {"t2i": 20.0, "i2t": 4.0}

# [ct, L, ci, R]-sized intermediates alive at once in one chunk: turns the budget into a block size.
_BUFFERS_PER_CHUNK = 6
# Largest block (elements) and images per chunk, whatever the budget allows: blocks small enough
# for the many elementwise passes over them to run from the CPU caches.
_BLOCK_ELEMENTS = 1 << 19
_IMAGES_PER_CHUNK = 32

LambdaArg = Union[None, float, Sequence[float], Dict[str, float]]


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
    skip_irrelevant_queries: bool = False,
    chunk_size: Optional[Tuple[int, int]] = None,
    memory_budget_mb: float = 512.0,
    progress: bool = False,
    return_stats: bool = False,
    eps: float = 1e-8,
):
    r"""Image x caption cross-attention scores, SCAN-style, for every pair.

    Args:
        image_fragments: ``[N_i, R, D]`` region features, L2-normalised per region.
        text_fragments: ``[N_t, L, D]`` word features, L2-normalised per word.
        text_mask: ``[N_t, L]``, 1 (or True) for a real word, 0 for padding; ``None``: all real.
            Only real words count anywhere, as SCAN truncates each caption to its length.
        direction: ``"t2i"`` (words attend to regions), ``"i2t"`` (regions attend to words) or
            ``"both"`` (the sum of the two scores).
        aggregation: ``"lse"``, ``(1/λ_lse) log Σ_q exp(λ_lse r_q)`` over the queries, or ``"mean"``.
        lambda_softmax: inverse softmax temperature λ. ``None``: ``SCAN_LAMBDA_SOFTMAX`` (9 / 4)
            in scan mode, ``NAAF_LAMBDA_SOFTMAX`` (20 / 4) in uarda mode; a float for both
            directions, a pair ``(t2i, i2t)`` or a dict ``{"t2i": .., "i2t": ..}``.
        lambda_lse: LogSumExp factor, same forms. ``None``: ``SCAN_LAMBDA_LSE`` (6 / 5).
        threshold_mode: ``"scan"`` or ``"uarda"`` (below).
        threshold: the relevance threshold ``t`` of uarda mode (float or 0-d tensor, no gradient).
        skip_irrelevant_queries: uarda mode's retrieval form (below); ``UARDAModel`` sets it in
            eval mode.
        chunk_size: ``(images, captions)`` per chunk. ``None``: from the memory budget.
        memory_budget_mb: bound on the working memory of one chunk. While autograd records,
            every chunk's intermediates are kept for the backward pass, so it bounds each chunk.
        progress: show a tqdm bar over the chunks.
        return_stats: also return a dict: the chunk size, and per direction the number of
            queries, of attended (not skipped) queries and the skipped fraction.
        eps: SCAN's epsilon in the L2 normalisation and the cosine.

    Returns:
        ``[N_i, N_t]`` scores (and the stats dict if ``return_stats``).

    **scan mode**, text-to-image (word queries ``w_i``, region context ``v_j``)::

        s_ij = w_i · v_j
        x_ij = LeakyReLU_0.1(s_ij) / (sqrt(Σ_{i' real} LeakyReLU_0.1(s_i'j)²) + eps)  # over the words
        a_ij = softmax_j(λ x_ij)
        r_i  = cos(w_i, Σ_j a_ij v_j)
        score = (1/λ_lse) log Σ_{i real} exp(λ_lse r_i)          # or the mean over real words

    Image-to-text swaps the roles: regions are the queries, the softmax runs over the real words,
    the normalisation over the regions and the pooling over the regions.

    **uarda mode** (NAAF's ``xattn_score``, CrossmodalGroup/NAAF, with the threshold ``t`` in
    place of the zero of SCAN's ReLU). For a query ``q`` and the context fragments ``k`` of a pair::

        K_q   = {k : s_qk > t}                                   # relevant fragments
        a⁺_qk = softmax over k ∈ K_q of λ (s_qk - t)             # 0 outside K_q
        r_q   = Σ_k a_qk s_qk                   # relevance score, a = scan mode's attention
              + cos(q, Σ_k a⁺_qk v_k)           if K_q is not empty   (positive branch)
              + max_k s_qk - t   (< 0)          if K_q is empty       (negative branch)

    A query with no relevant fragment is *skipped*: it gets no positive attention and is penalised
    by how far its best fragment falls short of ``t``. With ``skip_irrelevant_queries=True``
    (retrieval) a skipped query scores its penalty alone, ``r_q = max_k s_qk - t``, and only the
    live queries are attended, on their compacted rows: UARDA's "avoiding the calculation of
    irrelevant fragment queries". Training keeps the relevance score for every query, which a
    model needs to learn from scratch (benchmarks/README.md).

    While autograd records, no tensor value is read back to the host (chunks are planned from the
    shapes, uarda mode's branches are masked, not compacted). Without autograd the captions are
    sorted by length so that each chunk is cut to its longest caption, and the inputs are checked
    for non-finite values and captions without a real word.
    """
    _check_choices(direction=(direction, DIRECTIONS), aggregation=(aggregation, AGGREGATIONS),
                   threshold_mode=(threshold_mode, THRESHOLD_MODES))
    word_mask = _validate_fragments(image_fragments, text_fragments, text_mask)  # [N_t, L] bool
    uarda = threshold_mode == "uarda"
    lam = _per_direction(lambda_softmax, NAAF_LAMBDA_SOFTMAX if uarda else SCAN_LAMBDA_SOFTMAX, "lambda_softmax")
    lam_lse = _per_direction(lambda_lse, SCAN_LAMBDA_LSE, "lambda_lse")
    # None: scan mode. A 0-d tensor, so that a learned threshold is used without reading it back.
    t = torch.as_tensor(threshold, dtype=image_fragments.dtype, device=image_fragments.device) if uarda else None
    t = None if t is None else t.detach()
    skip = bool(skip_irrelevant_queries) and uarda
    do_t2i, do_i2t = direction in ("t2i", "both"), direction in ("i2t", "both")
    n_img, n_reg, dim = image_fragments.shape
    n_txt, n_word, _ = text_fragments.shape

    if torch.is_grad_enabled() and (image_fragments.requires_grad or text_fragments.requires_grad):
        order, lengths = None, [n_word] * n_txt  # training: chunks from the shapes alone
    else:  # retrieval: captions by length, so that each chunk is cut to its longest caption
        order, lengths = _sort_by_length(image_fragments, text_fragments, word_mask, t)
    img_chunk, caption_chunks = _plan_chunks(n_img, n_reg, lengths, chunk_size, memory_budget_mb,
                                             image_fragments.element_size())
    image_gram = image_fragments @ image_fragments.transpose(1, 2)  # [N_i, R, R]
    region_norm = image_fragments.norm(dim=-1)  # [N_i, R]
    scores = image_fragments.new_zeros(n_img, n_txt)
    counts = {d: [] for d, on in (("t2i", do_t2i), ("i2t", do_i2t)) if on and return_stats}
    bar = _tqdm(total=len(caption_chunks) * -(-n_img // img_chunk), desc="cross-attention", unit="chunk") \
        if progress and _tqdm is not None else None

    for t0, t1, n_len in caption_chunks:
        columns = slice(t0, t1) if order is None else order[t0:t1]
        real = word_mask[columns, :n_len]  # [ct, Lc]
        # Padding words become zero vectors: their similarities are exactly 0, so SCAN's
        # normalisation over the words needs no mask.
        words = text_fragments[columns, :n_len] * real.unsqueeze(-1)  # [ct, Lc, D]
        word_norm = words.norm(dim=-1)  # [ct, Lc]
        word_gram = words @ words.transpose(1, 2) if do_i2t else None  # [ct, Lc, Lc]
        t2i_parts, i2t_parts = [], []  # per image chunk: [ct, Lc, ci] and [ct, ci, R] relevances
        for i0 in range(0, n_img, img_chunk):
            i1 = min(i0 + img_chunk, n_img)
            # All similarities of the chunk in one GEMM: [ct*Lc, D] x [D, ci*R] -> [ct, Lc, ci, R]
            sim = _similarities(words.reshape(-1, dim), image_fragments[i0:i1].reshape(-1, dim))
            sim = sim.view(t1 - t0, n_len, i1 - i0, n_reg)
            if do_t2i:
                rel, attended = _t2i_relevance(sim, real, word_norm, image_gram[i0:i1], lam["t2i"], t, skip, eps)
                t2i_parts.append(rel)
                if return_stats:
                    counts["t2i"].append((real.sum() * (i1 - i0), attended.sum()))
            if do_i2t:
                rel, attended = _i2t_relevance(sim, real, region_norm[i0:i1], word_gram, lam["i2t"], t, skip, eps)
                i2t_parts.append(rel)
                if return_stats:
                    counts["i2t"].append((rel.numel(), attended.sum()))
            if bar is not None:
                bar.update(1)
        pair = 0.0  # [ct, N_i]: the words pooled per image, the regions per caption
        if do_t2i:
            pair = pair + _pool(torch.cat(t2i_parts, dim=2), real.unsqueeze(-1), aggregation, lam_lse["t2i"], dim=1)
        if do_i2t:
            pair = pair + _pool(torch.cat(i2t_parts, dim=1), None, aggregation, lam_lse["i2t"], dim=-1)
        scores[:, columns] = pair.T  # [ct, N_i] -> [N_i, ct]
    if bar is not None:
        bar.close()
    return (scores, _stats(counts, img_chunk, caption_chunks)) if return_stats else scores


def _similarities(words, regions):
    """``words @ regions.T``: ``[n, D] x [m, D] -> [n, m]``, in one GEMM.

    On CPU in float32 the product is run as a 1x1 convolution, the same GEMM in channels-last
    layout, because PyTorch runs CPU convolutions with oneDNN, whose fp32 GEMM is markedly faster
    than the BLAS behind ``torch.matmul`` on some CPUs (benchmarks/README.md).
    """
    if words.device.type != "cpu" or words.dtype != torch.float32:
        return words @ regions.T
    # [n, D] -> [1, D, n, 1] in channels-last memory (a view), weight [m, D, 1, 1]
    out = F.conv2d(words.view(1, words.shape[0], 1, words.shape[1]).permute(0, 3, 1, 2), regions[:, :, None, None])
    return out.permute(0, 2, 3, 1).reshape(words.shape[0], regions.shape[0])  # [1, m, n, 1] channels-last: a view


# --------------------------------------------------------------------------------------------
# One chunk, one direction. `sim` is the block [ct, L, ci, R]; padding words are zero rows.
# Each helper returns the relevance of every query and the mask of the queries it attended.
# --------------------------------------------------------------------------------------------
def _t2i_relevance(sim, real, word_norm, image_gram, lam, threshold, skip_irrelevant, eps):
    """Relevance ``[ct, L, ci]`` of every word against every image, and the attended words.

    Args:
        sim: ``[ct, L, ci, R]`` similarities.
        real: ``[ct, L]`` real-word mask.
        word_norm: ``[ct, L]`` word norms.
        image_gram: ``[ci, R, R]`` region Gram matrices.
        threshold: uarda mode's ``t`` (0-d tensor), ``None`` in scan mode.
        skip_irrelevant: uarda mode's retrieval form.
    """
    queries = real.unsqueeze(-1).expand(sim.shape[:3])  # [ct, L, ci]
    if threshold is None:
        attn = _scan_attention(sim, lam, query_dim=1, context_dim=-1, eps=eps)  # [ct, L, ci, R]
        return _t2i_cosine(attn, sim, word_norm, image_gram, eps), queries
    best = sim.amax(dim=-1)  # [ct, L, ci]
    live = (best > threshold) & queries  # real words with a relevant region
    if not skip_irrelevant:
        scan_attn = _scan_attention(sim, lam, query_dim=1, context_dim=-1, eps=eps)
        positive_attn = _relevant_attention(sim, sim > threshold, best.unsqueeze(-1), lam, dim=-1)
        positive = _t2i_cosine(positive_attn, sim, word_norm, image_gram, eps)
        return torch.linalg.vecdot(scan_attn, sim) + torch.where(live, positive, best - threshold), live
    # Retrieval: live rows only, image-major so that each image's rows meet its Gram matrix together.
    image, caption, word = live.permute(2, 0, 1).nonzero(as_tuple=True)  # [M] each
    norm = _l2norm(F.leaky_relu(sim, 0.1), dim=1, eps=eps)  # [ct, 1, ci, R] SCAN's, over the words
    live_rel = _live_relevance(
        sim[caption, word, image], norm[caption, 0, image], None, best[caption, word, image], threshold,
        word_norm[caption, word], image, image_gram, lam, eps,
    )  # [M]
    return (best - threshold).index_put((caption, word, image), live_rel), live


def _i2t_relevance(sim, real, region_norm, word_gram, lam, threshold, skip_irrelevant, eps):
    """Relevance ``[ct, ci, R]`` of every region against every caption, and the attended regions.

    Args:
        sim: ``[ct, L, ci, R]`` similarities.
        real: ``[ct, L]`` real-word mask (padding words are never attended).
        region_norm: ``[ci, R]`` region norms.
        word_gram: ``[ct, L, L]`` word Gram matrices.
        threshold, skip_irrelevant: as in :func:`_t2i_relevance`.
    """
    ct, n_word, ci, n_reg = sim.shape
    context = real.view(ct, n_word, 1, 1)  # the words a region may attend to
    if threshold is None:
        attn = _scan_attention(sim, lam, query_dim=-1, context_dim=1, eps=eps, context_mask=context)
        return _i2t_cosine(attn, sim, region_norm, word_gram, eps), sim.new_ones(ct, ci, n_reg, dtype=torch.bool)
    best = sim.masked_fill(~context, float("-inf")).amax(dim=1)  # [ct, ci, R] best real word
    live = best > threshold  # regions with a relevant word
    if not skip_irrelevant:
        scan_attn = _scan_attention(sim, lam, query_dim=-1, context_dim=1, eps=eps, context_mask=context)
        positive_attn = _relevant_attention(sim, (sim > threshold) & context, best.unsqueeze(1), lam, dim=1)
        positive = _i2t_cosine(positive_attn, sim, region_norm, word_gram, eps)
        return (scan_attn * sim).sum(1) + torch.where(live, positive, best - threshold), live
    # Retrieval: live rows only, caption-major so that each caption's rows meet its Gram matrix together.
    caption, image, region = live.nonzero(as_tuple=True)  # [M] each
    norm = _l2norm(F.leaky_relu(sim, 0.1), dim=-1, eps=eps)  # [ct, L, ci, 1] SCAN's, over the regions
    live_rel = _live_relevance(
        sim.permute(0, 2, 3, 1)[caption, image, region], norm[..., 0].permute(0, 2, 1)[caption, image],
        real[caption], best[caption, image, region], threshold, region_norm[image, region],
        caption, word_gram, lam, eps,
    )  # [M]
    return (best - threshold).index_put((caption, image, region), live_rel), live


def _scan_attention(sim, lam, query_dim, context_dim, eps, context_mask=None):
    """SCAN's attention: LeakyReLU(0.1), L2-normalised over the queries, softmax of λ· over the
    context (only where ``context_mask`` allows)."""
    x = F.leaky_relu(sim, 0.1)
    logits = x * (lam / _l2norm(x, dim=query_dim, eps=eps))
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask, float("-inf"))
    return torch.softmax(logits, dim=context_dim)


def _relevant_attention(sim, relevant, best, lam, dim):
    """uarda mode's positive attention: the softmax of λ(s - t) over the ``relevant`` fragments
    along ``dim``, 0 elsewhere, all 0 where none is relevant (that query takes the negative branch).

    Computed as ``exp(λ(s - best))`` times the 0/1 mask: the shift cancels in the softmax, and
    ``best``, the query's largest similarity over its real context (``dim`` kept), is a relevant
    one whenever any is, so every weight is at most 1 and the largest is 1. The clamp only touches
    masked entries (a padding word's 0 above a negative ``best``), and no -inf or NaN is formed,
    also on rows with nothing relevant, so the backward pass stays finite.
    """
    weights = (lam * (sim - best.detach())).clamp_max(0.0).exp() * relevant
    return weights / weights.sum(dim, keepdim=True).clamp_min(torch.finfo(sim.dtype).tiny)


def _t2i_cosine(attn, sim, word_norm, image_gram, eps):
    """``cos(w, c)`` for every (caption, word, image) row of ``attn [ct, L, ci, R]`` -> ``[ct, L, ci]``."""
    ct, n_word, ci, n_reg = attn.shape
    numerator = torch.linalg.vecdot(attn, sim)  # [ct, L, ci]  w · c
    # |c|² = aᵀGa, one batched product over the images: [ct, L, ci, R] -> [ci, ct*L, R] (a view)
    rows = attn.view(ct * n_word, ci, n_reg).transpose(0, 1)
    quad = torch.linalg.vecdot(torch.bmm(rows, image_gram), rows)  # [ci, ct*L]
    return _cosine(numerator, word_norm.unsqueeze(-1), quad.T.reshape(ct, n_word, ci), eps)


def _i2t_cosine(attn, sim, region_norm, word_gram, eps):
    """``cos(v, c)`` for every (caption, image, region) column of ``attn [ct, L, ci, R]`` -> ``[ct, ci, R]``."""
    ct, n_word, ci, n_reg = attn.shape
    numerator = (attn * sim).sum(1)  # [ct, ci, R]  v · c
    # |c|² = aᵀHa, one batched product over the captions: [ct, L, L] x [ct, L, ci*R]
    columns = attn.view(ct, n_word, ci * n_reg)
    quad = (torch.bmm(word_gram, columns) * columns).sum(1).view(ct, ci, n_reg)
    return _cosine(numerator, region_norm, quad, eps)


def _live_relevance(s_rows, norm_rows, context_mask, best, threshold, query_norm, group, gram, lam, eps):
    """uarda mode's retrieval relevance of the compacted live query rows (both directions):
    SCAN's relevance score plus the positive branch.

    Args:
        s_rows: ``[M, K]`` each live query's similarities to its pair's context fragments.
        norm_rows: ``[M, K]`` each context fragment's SCAN norm over the pair's queries.
        context_mask: ``[M, K]`` real context fragments, or ``None`` (all real).
        best: ``[M]`` each row's largest similarity over its real context.
        query_norm: ``[M]`` query norms.
        group: ``[M]``, sorted: index into ``gram [G, K, K]`` of each row's Gram matrix.
    """
    logits = F.leaky_relu(s_rows, 0.1) * (lam / norm_rows)
    relevant = s_rows > threshold
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask, float("-inf"))
        relevant &= context_mask
    relevance_score = torch.linalg.vecdot(torch.softmax(logits, dim=-1), s_rows)  # [M]
    attn = _relevant_attention(s_rows, relevant, best.unsqueeze(-1), lam, dim=-1)  # [M, K]
    quad = _grouped_quadratic_form(attn, group, gram)  # [M]
    return relevance_score + _cosine(torch.linalg.vecdot(attn, s_rows), query_norm, quad, eps)


def _grouped_quadratic_form(vectors, group, gram):
    """``vectors[m]ᵀ gram[group[m]] vectors[m]`` for every row, as one batched matmul.

    The rows (``[M, K]``, ``group`` sorted) are scattered into a zero-padded ``[G, rows per
    group, K]`` tensor so that each group's rows meet its Gram matrix in one ``bmm`` with no
    Python loop over the groups. Reads the largest group size (retrieval only).
    """
    n_groups, k = gram.shape[0], gram.shape[-1]
    counts = torch.bincount(group, minlength=n_groups)  # [G]
    width = int(counts.max())
    position = torch.arange(group.numel(), device=group.device) - (counts.cumsum(0) - counts)[group]
    slot = group * width + position  # [M] into [G*width]
    padded = vectors.new_zeros(n_groups * width, k).index_copy(0, slot, vectors)
    product = torch.bmm(padded.view(n_groups, width, k), gram).view(n_groups * width, k)[slot]  # [M, K]
    return torch.linalg.vecdot(product, vectors)


def _cosine(numerator, query_norm, quad, eps):
    """SCAN's cosine ``q·c / max(|q| |c|, eps)`` from ``q·c`` and ``|c|² = quad``; the square root
    is taken at >= eps² so that an all-zero ``c`` has a finite gradient."""
    return numerator / (query_norm * quad.clamp_min(eps * eps).sqrt()).clamp_min(eps)


def _l2norm(x, dim, eps):
    """SCAN's L2 norm ``sqrt(Σ x²) + eps`` over ``dim`` (kept). Σ x² is clamped at the smallest
    normal number before the root, which changes no value that matters and keeps 0 · inf out of
    the backward pass of an all-zero column."""
    return x.square().sum(dim, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny).sqrt() + eps


def _pool(rel, query_mask, aggregation, lam_lse, dim):
    """Pool query relevances over ``dim`` into pair scores; ``query_mask`` marks real queries."""
    if aggregation == "lse":
        logits = rel * lam_lse
        if query_mask is not None:
            logits = logits.masked_fill(~query_mask, float("-inf"))
        return torch.logsumexp(logits, dim=dim) / lam_lse
    if query_mask is None:
        return rel.mean(dim=dim)
    return (rel * query_mask).sum(dim=dim) / query_mask.sum(dim=dim)


# --------------------------------------------------------------------------------------------
# Arguments and chunks
# --------------------------------------------------------------------------------------------
def _check_choices(**choices):
    """``name=(value, allowed)``: raise a ValueError naming the first value not allowed."""
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _stats(counts, img_chunk, caption_chunks):
    """``return_stats``' dict from the per-chunk ``(queries, attended)`` counts of each direction."""
    stats = {"chunk_size": (img_chunk, max(t1 - t0 for t0, t1, _ in caption_chunks))}
    for d, parts in counts.items():
        queries, attended = (sum(int(v) for v in column) for column in zip(*parts))
        stats.update({f"{d}_queries": queries, f"{d}_attended": attended,
                      f"{d}_skipped_fraction": 1.0 - attended / queries if queries else 0.0})
    return stats


def _validate_fragments(image_fragments, text_fragments, text_mask):
    """Check shapes, dtypes and devices (no values); return the boolean word mask ``[N_t, L]``."""
    for name, x in (("image_fragments", image_fragments), ("text_fragments", text_fragments)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape [N, fragments, dim], got {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): nothing to score")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if image_fragments.shape[-1] != text_fragments.shape[-1]:
        raise ValueError(
            "image and text fragments must share the feature dimension, got "
            f"{image_fragments.shape[-1]} and {text_fragments.shape[-1]}"
        )
    if image_fragments.device != text_fragments.device:
        raise ValueError("image_fragments and text_fragments are on different devices")
    if image_fragments.dtype != text_fragments.dtype:
        raise ValueError(
            f"dtype mismatch: image_fragments {image_fragments.dtype}, text_fragments {text_fragments.dtype}"
        )
    n_txt, n_word, _ = text_fragments.shape
    if text_mask is None:
        return torch.ones(n_txt, n_word, dtype=torch.bool, device=text_fragments.device)
    if tuple(text_mask.shape) != (n_txt, n_word):
        raise ValueError(f"text_mask must have shape {(n_txt, n_word)}, got {tuple(text_mask.shape)}")
    return text_mask.to(device=text_fragments.device) != 0


def _sort_by_length(image_fragments, text_fragments, word_mask, threshold):
    """Retrieval's chunk order: the captions sorted by length (``[N_t]`` order and the sorted
    lengths as a list; the length is the last real word's position + 1). Reading the lengths
    back is where retrieval also checks the values: finite inputs, a real word in every caption."""
    for name, x in (("image_fragments", image_fragments), ("text_fragments", text_fragments)):
        if not all(math.isfinite(float(v)) for v in torch.aminmax(x.detach())):  # min and max propagate NaN
            raise ValueError(f"{name} contains NaN or infinite values (padding included)")
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be finite, got {float(threshold)}")
    length = (word_mask * torch.arange(1, word_mask.shape[1] + 1, device=word_mask.device)).amax(dim=1)  # [N_t]
    order = torch.argsort(length, stable=True)
    lengths = length[order].tolist()
    n_empty = sum(1 for n in lengths if n == 0)
    if n_empty:
        raise ValueError(
            f"{n_empty} caption(s) have no real word (all padding), e.g. indices {order[:min(n_empty, 10)].tolist()}; "
            "remove them or give them at least one token"
        )
    return order, lengths


def _plan_chunks(n_img, n_reg, lengths, chunk_size, memory_budget_mb, element_size):
    """Images per chunk and the caption chunks ``[(start, end, words)]``, ``words`` being the
    longest caption of the chunk (``lengths`` ascending).

    The budget allows ``budget / (element_size · _BUFFERS_PER_CHUNK)`` elements per block
    ``[ct, words, ci, R]``, and at most ``_BLOCK_ELEMENTS``; ``chunk_size`` fixes both counts.
    """
    n_txt = len(lengths)
    if chunk_size is not None:
        ci, ct = (int(c) for c in chunk_size)
        if ci < 1 or ct < 1:
            raise ValueError(f"chunk_size must be two positive integers, got {chunk_size!r}")
        ci = min(ci, n_img)
        return ci, [(s, min(s + ct, n_txt), lengths[min(s + ct, n_txt) - 1]) for s in range(0, n_txt, ct)]
    if not memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
    budget = int(memory_budget_mb * 2**20 / (element_size * _BUFFERS_PER_CHUNK))
    max_elements = max(1, min(budget, _BLOCK_ELEMENTS))
    ci = max(1, min(n_img, _IMAGES_PER_CHUNK, max_elements // (lengths[-1] * n_reg)))
    chunks, start = [], 0
    while start < n_txt:
        # First as many captions as fit at the chunk's shortest length, then as fit at the longest
        # of those (fewer, all no longer): the block stays within max_elements.
        end = min(n_txt, start + max(1, max_elements // (lengths[start] * ci * n_reg)))
        end = min(end, start + max(1, max_elements // (lengths[end - 1] * ci * n_reg)))
        chunks.append((start, end, lengths[end - 1]))
        start = end
    return ci, chunks


def _per_direction(value, defaults, name):
    """Resolve a λ argument into ``{"t2i": float, "i2t": float}``."""
    if value is None:
        out = dict(defaults)
    elif isinstance(value, dict):
        out = {**defaults, **{k: float(v) for k, v in value.items()}}
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
