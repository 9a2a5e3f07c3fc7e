"""Word–region cross-attention scoring (SCAN) and UARDA's learned relevance threshold.

This is a *remote-code* file: it is copied flat into saved model folders, so it imports only
``torch`` and the standard library (``tqdm`` optionally, for progress bars).

Contents, top to bottom
-----------------------
``cross_attention_scores``
    The full image × caption score matrix of stacked cross attention (SCAN, Lee et al., ECCV
    2018), vectorised over all pairs, chunked under a memory budget, and differentiable, so a
    model's training forward and its retrieval scorer are the very same function. Two threshold
    modes: ``"scan"`` (SCAN's LeakyReLU + L2 normalisation) and ``"uarda"`` (NAAF's
    negative–positive branches: a relevance threshold ``t`` decides which fragments take part in
    the positive attention, and queries with no relevant fragment skip it and are penalised
    instead; at retrieval, ``skip_irrelevant_queries=True``, nothing else is computed for them;
    formulas in the function's docstring).
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
A chunk of ``ct`` captions and ``ci`` images is one matrix product
``[ct·L, D] × [D, ci·R] -> [ct·L, ci·R]``, viewed as the block ``[ct, L, ci, R]``
(caption, word, image, region) that everything else works on.

How a pair is scored without materialising the attended vectors
---------------------------------------------------------------
SCAN's relevance of query word ``w`` is ``cos(w, c)`` with the attended vector
``c = Σ_j a_j v_j``. With ``s_j = w · v_j`` and the image's region Gram matrix ``G = V Vᵀ``
(``R × R``, computed once per image)::

    w · c = Σ_j a_j s_j            |c|² = aᵀ G a

so, after one large matrix multiply for all similarities, each (pair, word) costs ``O(R²)``
instead of the ``O(R·D)`` of forming ``c``. Without autograd, scan mode takes
``aᵀ G a = |F a|²`` with a factor ``FᵀF = G`` (Cholesky, computed once per image) instead: the
product ``F a`` runs faster on CPU than ``G a`` followed by a dot with ``a``, and a row of ones
under ``F`` gives the softmax normaliser ``Σ_j a_j`` in the same product. Image-to-text uses
the caption's word Gram ``H = W Wᵀ`` (``L × L``) in the same way. The result equals SCAN's
``func_attention`` + ``cosine_similarity`` + LogSumExp up to floating-point rounding (the tests
check it against a per-pair loop, the benchmark against SCAN's sharded evaluation loop).

Speed notes (CPU): blocks are kept cache-sized (about 0.5 M elements), padding words are zeroed
before the product (their similarities are exactly 0, so SCAN's normalisation over the words
needs no mask pass), the softmax skips its max subtraction when λ is small enough for the bounded
logits (the normaliser is divided out of the per-row results, not the block; the attended-vector
cosine is otherwise invariant to it), intermediates are overwritten in place when no gradient is
recorded, and the similarity product uses oneDNN's fp32 GEMM when PyTorch exposes it
(``_linear_pointwise``, the kernel ``torch.compile`` emits for CPU linear layers), falling back
to ``torch.matmul`` otherwise.
Without gradients, the image operands are prepacked for it once per call (a copy of the image
fragments lives for the duration of the call).
"""

from __future__ import annotations

import math
from functools import partial
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
    "NAAF_LAMBDA_SOFTMAX",
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
#: uarda mode's λ: NAAF's 20 (text-to-image; NAAF scores that direction only, so image-to-text
#: keeps SCAN's 4). On the synthetic benchmark it trained uarda mode to a higher rSum than 9 did,
#: while scan mode trained worse with 20 than with 9 (README, benchmarks).
NAAF_LAMBDA_SOFTMAX = {"t2i": 20.0, "i2t": 4.0}

_DIRECTIONS = ("t2i", "i2t", "both")
_AGGREGATIONS = ("lse", "mean")
_THRESHOLD_MODES = ("scan", "uarda")

# Number of [ct, L, ci, R]-sized buffers alive at the peak of one chunk (similarities,
# activations, attention, products, ...). Turns a memory budget into a chunk size.
_LIVE_BUFFERS_PER_CHUNK = 6
# Preferred size of one [ct, L, ci, R] block (elements). scan mode: about 2 MB in float32, so
# that its many elementwise passes run from the CPU caches; uarda mode: larger, as the compacted
# live rows have a fixed cost per chunk that larger chunks spread (measured: 1.1-1.2x faster
# with 2 M than with 0.5 M). The memory budget can only lower these.
_TARGET_CHUNK_ELEMENTS = {"scan": 1 << 19, "uarda": 1 << 21}
# Images per chunk (their region matrix, ci·R × D, is the GEMM operand reused across captions).
_IMAGES_PER_CHUNK = {"scan": 32, "uarda": 128}
# Largest softmax λ for which SCAN's t2i attention skips the softmax's max subtraction (its
# logits lie in [-λ, λ]; exp(20)² times K² stays far from float32's overflow, and exp(-20) far
# from its underflow). Only for these dtypes: float16 overflows at exp(11.1).
_MAX_LAMBDA_UNSHIFTED_EXP = 20.0
_UNSHIFTED_EXP_DTYPES = (torch.float32, torch.float64)
# Softmax weights are computed as 2^(λ·log2(e)·x) = e^(λx): log2(e) folds into the λ multiply that
# is there anyway, and torch.exp2 ran about 3x faster than torch.exp on an AVX-512 CPU (2 M
# float32 elements, 0.57 ms against 1.68 ms).
_LOG2_E = 1.0 / math.log(2.0)

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
    skip_irrelevant_queries: bool = False,
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
            each caption to its length; padding slots may hold any finite values.
        direction: ``"t2i"`` (words attend to regions), ``"i2t"`` (regions attend to words) or
            ``"both"`` (the sum of the two scores).
        aggregation: ``"lse"`` — ``(1/λ_lse) log Σ_q exp(λ_lse r_q)`` over the queries — or
            ``"mean"`` over the queries.
        lambda_softmax: inverse softmax temperature λ. ``None``: SCAN's 9 (t2i) / 4 (i2t) in
            scan mode, ``NAAF_LAMBDA_SOFTMAX`` (20 / 4) in uarda mode; a float for both
            directions; a pair ``(t2i, i2t)`` or a dict ``{"t2i": .., "i2t": ..}``.
        lambda_lse: LogSumExp factor, same forms. ``None``: SCAN's 6 (t2i) / 5 (i2t).
        threshold_mode: ``"scan"`` or ``"uarda"`` (see below).
        threshold: relevance threshold ``t`` (float or 0-d tensor; used in uarda mode only). It is
            read as a plain number: no gradient flows into it.
        skip_irrelevant_queries: uarda mode only. ``True`` (retrieval; what ``UARDAModel`` does
            in eval mode): a query with no relevant fragment scores its penalty alone and its
            relevance-score branch is not computed. ``False`` (training; NAAF's form): every
            query gets the relevance-score branch. See below.
        chunk_size: ``(images, captions)`` per chunk. ``None``: chosen from the budget (blocks
            of 0.5 M (scan) or 2 M (uarda) word–region pairs, fewer if the budget asks for it),
            with captions sorted by length so that each chunk is trimmed to its longest caption.
        memory_budget_mb: upper bound on the working memory of one chunk (its ~6
            ``[captions, L, images, R]`` intermediates). With autograd recording, every chunk's
            intermediates are kept for the backward pass, so the budget then bounds each chunk,
            not the total.
        progress: show a tqdm bar over the chunks.
        return_stats: also return a dict with the number of queries and of attended (not
            skipped) queries per direction, the skipped fraction and the chunk size.
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

    **uarda mode** (our reading of UARDA's abstract, with the negative–positive branches of
    NAAF, the same group's public follow-up, CrossmodalGroup/NAAF ``xattn_score``; the threshold
    ``t`` replaces the zero of SCAN's ReLU). For a query ``q`` and the context fragments ``k`` of
    one pair::

        K_q  = {k : s_qk > t}                                   # relevant fragments
        a⁺_qk = exp(λ (s_qk - t)) / Σ_{k' ∈ K_q} exp(λ (s_qk' - t))  if k ∈ K_q, else 0
        r_q  = Σ_k a_qk s_qk                        # relevance-score branch, a = SCAN's attention
             + cos(q, Σ_k a⁺_qk v_k)               if K_q is not empty  (positive branch)
             + max_k s_qk - t   (≤ 0)               if K_q is empty      (negative branch)
        score = (1/λ_lse) log Σ_q exp(λ_lse r_q)                # or the mean, over real queries

    Irrelevant fragments take no part in the positive attention, and a query with no relevant
    fragment ("skipped") gets no positive branch: it is penalised by how far its best fragment
    falls short of the threshold, and its softmax and Gram work is skipped (that work runs on
    the compacted (pair, query) rows that have a relevant fragment). The relevance-score branch
    (SCAN's attention weights times the similarities: no cosine, so no Gram work) covers every
    query in training; it keeps SCAN's smooth attention over all fragments in the score, which
    the model needs to train from scratch: without it, uarda mode trained to rSum 143 against
    scan mode's 200 on the synthetic benchmark (README).

    With ``skip_irrelevant_queries=True`` (retrieval), a skipped query is not computed at all
    beyond its best similarity, as UARDA's abstract has it ("avoiding the calculation of
    irrelevant fragment queries")::

        r_q  = max_k s_qk - t                        if K_q is empty
        r_q  = Σ_k a_qk s_qk + cos(q, Σ_k a⁺_qk v_k)  otherwise (a as above: SCAN's attention,
                                                       normalised over ALL real queries)

    so a skipped query costs one max over its similarities, and all softmax work runs on the
    compacted live rows (SCAN's normalisation over the queries is one more pass over the
    block). A model trained with the relevance-score branch everywhere ranks the synthetic
    benchmark's test set almost the same either way (README).

    The positive softmax has no L2 normalisation over the queries (NAAF's has none: on
    ``relu(s - t)`` it would map every fragment that one query finds relevant to 1 whatever its
    similarity). All branches are exact and differentiable (the gradient of a skipped query's
    penalty flows through its best similarity).
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
    uarda = threshold_mode == "uarda"
    lam_softmax = _softmax_lambdas(lambda_softmax, threshold_mode)
    lam_lse = _per_direction(lambda_lse, SCAN_LAMBDA_LSE, "lambda_lse")
    t = float(threshold)
    if uarda and not math.isfinite(t):
        raise ValueError(f"threshold must be finite, got {t}")
    do_t2i, do_i2t = direction in ("t2i", "both"), direction in ("i2t", "both")
    if uarda:
        t2i_relevance = partial(_t2i_uarda, skip_irrelevant=bool(skip_irrelevant_queries))
        i2t_relevance = partial(_i2t_uarda, skip_irrelevant=bool(skip_irrelevant_queries))
    else:
        t2i_relevance, i2t_relevance = _t2i_scan, _i2t_scan

    n_img, n_reg, dim = image_fragments.shape
    n_txt, n_word, _ = text_fragments.shape
    img_chunk, fixed_txt_chunk, max_elements = _plan_chunks(
        n_img, n_reg, n_word, chunk_size, memory_budget_mb, image_fragments.element_size(),
        threshold_mode,
    )
    # Captions sorted by length and each chunk trimmed to its longest caption: blocks carry
    # (almost) no padding words, as SCAN's loop, which truncates every caption to its length.
    length = _effective_lengths(word_mask)  # [N_t] last real word + 1
    order = torch.argsort(length, stable=True)  # [N_t]
    caption_chunks = _caption_chunks(
        length[order].tolist(), img_chunk * n_reg, fixed_txt_chunk, max_elements
    )
    # Intermediates may be overwritten in place only when autograd is not recording.
    inplace = not (
        torch.is_grad_enabled()
        and (image_fragments.requires_grad or text_fragments.requires_grad)
    )

    # Per-image quantities, computed once for all chunks.
    images = image_fragments.contiguous()
    image_gram = torch.matmul(images, images.transpose(1, 2))  # [N_i, R, R]
    region_norm = images.norm(dim=-1)  # [N_i, R]
    # scan mode's t2i |c|² from a factor F of each Gram (FᵀF = G) when no gradient is recorded
    # and the softmax is unshifted: a faster product that also yields the softmax normaliser.
    image_factor = _gram_factors(images, image_gram) if (
        do_t2i and not uarda and inplace and _unshifted_exp_ok(lam_softmax["t2i"], images.dtype)
    ) else None  # [N_i, R+1, R]

    # GEMM operand of every image chunk, [ci*R, D] (rows: image, region), shared by all caption
    # chunks.
    rows_hint = max_elements // (img_chunk * n_reg) if max_elements else fixed_txt_chunk * n_word
    image_chunks = []
    for i0 in range(0, n_img, img_chunk):
        chunk = images[i0:i0 + img_chunk]  # [ci, R, D]
        operand = _region_operand(chunk.reshape(-1, dim), rows_hint, inplace)  # [ci*R, D]
        image_chunks.append((i0, min(i0 + img_chunk, n_img), operand))

    scores = images.new_zeros(n_img, n_txt)  # [N_i, N_t]
    stats = {"t2i_queries": 0, "t2i_attended": 0, "i2t_queries": 0, "i2t_attended": 0}
    n_chunks = -(-n_img // img_chunk) * len(caption_chunks)
    bar = _tqdm(total=n_chunks, desc="cross-attention", unit="chunk") if (
        progress and _tqdm is not None
    ) else None

    for t0, t1, n_len in caption_chunks:
        idx = order[t0:t1].to(text_fragments.device)  # [ct] caption indices of this chunk
        real = word_mask[idx, :n_len]  # [ct, Lc] bool, Lc = longest caption of the chunk
        # Padding words become zero vectors: their similarities are exactly 0, so they add
        # nothing to SCAN's normalisation over the words (no mask pass over the big blocks).
        words = text_fragments[idx, :n_len] * real.unsqueeze(-1).to(text_fragments.dtype)
        words_flat = words.reshape(-1, dim)  # [ct, Lc, D] -> [ct*Lc, D]
        word_norm = words.norm(dim=-1)  # [ct, Lc]
        word_gram = torch.bmm(words, words.transpose(1, 2)) if do_i2t else None  # [ct, Lc, Lc]
        n_real = int(real.sum())
        t2i_parts, i2t_parts = [], []
        for i0, i1, regions_flat in image_chunks:
            # All word–region similarities of the chunk in one GEMM:
            # [ct*Lc, D] x [D, ci*R] -> [ct*Lc, ci*R] -> [ct, Lc, ci, R]
            sim = _similarity(words_flat, regions_flat).view(t1 - t0, n_len, i1 - i0, n_reg)
            if do_t2i:
                rel, attended = t2i_relevance(
                    sim, real, word_norm, image_gram[i0:i1],
                    None if image_factor is None else image_factor[i0:i1],
                    lam_softmax["t2i"], t, eps, inplace,
                )  # [ct, Lc, ci]
                t2i_parts.append(rel)
                stats["t2i_queries"] += n_real * (i1 - i0)
                stats["t2i_attended"] += n_real * (i1 - i0) if attended is None else attended
            if do_i2t:
                rel, attended = i2t_relevance(
                    sim, real, region_norm[i0:i1], word_gram, lam_softmax["i2t"], t, eps, inplace
                )  # [ct, ci, R]
                i2t_parts.append(_pool(rel, None, aggregation, lam_lse["i2t"], dim=-1))  # [ct, ci]
                n_q = (t1 - t0) * (i1 - i0) * n_reg
                stats["i2t_queries"] += n_q
                stats["i2t_attended"] += n_q if attended is None else attended
            del sim
            if bar is not None:
                bar.update(1)
        block = 0
        if do_t2i:
            rel = torch.cat(t2i_parts, dim=2)  # [ct, Lc, N_i]
            block = _pool(rel, real.unsqueeze(-1), aggregation, lam_lse["t2i"], dim=1)  # [ct, N_i]
        if do_i2t:
            block = block + torch.cat(i2t_parts, dim=1)  # [ct, N_i]
        scores[:, idx] = block.transpose(0, 1)  # autograd records this indexed copy
    if bar is not None:
        bar.close()

    if not return_stats:
        return scores
    out = {"chunk_size": (img_chunk, max(t1 - t0 for t0, t1, _ in caption_chunks))}
    for d, on in (("t2i", do_t2i), ("i2t", do_i2t)):
        if on:
            q, a = stats[f"{d}_queries"], stats[f"{d}_attended"]
            out.update({f"{d}_queries": q, f"{d}_attended": a,
                        f"{d}_skipped_fraction": 1.0 - a / q if q else 0.0})
    return scores, out


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
        :func:`cross_attention_scores` uses in the t2i direction (in uarda mode those of the
        positive branch, the attention over the relevant regions), and the mask of relevant
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
    lam = _softmax_lambdas(lambda_softmax, threshold_mode)["t2i"]
    sim = text_fragments @ image_fragments.T  # [L, R]
    keep = real.unsqueeze(1).to(sim.dtype)  # [L, 1]
    if threshold_mode == "scan":
        x = F.leaky_relu(sim, 0.1) * keep  # [L, R]
        relevant = torch.ones_like(sim, dtype=torch.bool)
        norm = _sqrt_plus_eps(x.square().sum(dim=0, keepdim=True), eps)  # [1, R] over the words
        logits = x * (lam / norm)  # [L, R]
    else:
        t = float(threshold)
        relevant = sim > t  # [L, R]
        logits = ((sim - t) * lam).masked_fill(~relevant, float("-inf"))  # [L, R]
    attended = relevant.any(dim=1, keepdim=True) & real.unsqueeze(1)  # [L, 1]
    logits = logits.masked_fill(~attended, 0.0)  # rows with no relevant region: finite
    attention = torch.softmax(logits, dim=-1) * attended.to(sim.dtype)  # [L, R]
    return attention, relevant & real.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Similarity product
# --------------------------------------------------------------------------------------------
_ONEDNN_STATE = {"checked": False, "ok": False, "pack_ok": False}


def _onednn_linear_ok() -> bool:
    """Whether ``torch.ops.mkldnn._linear_pointwise`` exists here and agrees with matmul.

    Also records whether its weights can be prepacked (``_reorder_linear_weight``).
    """
    if not _ONEDNN_STATE["checked"]:
        _ONEDNN_STATE["checked"] = True
        try:
            if torch.backends.mkldnn.is_available():
                gen = torch.Generator().manual_seed(0)
                a, b = torch.randn(37, 19, generator=gen), torch.randn(23, 19, generator=gen)
                expected = a @ b.T
                out = torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
                _ONEDNN_STATE["ok"] = bool(torch.allclose(out, expected, atol=1e-4))
                packed = torch.ops.mkldnn._reorder_linear_weight(b, 37)
                out = torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
                _ONEDNN_STATE["pack_ok"] = bool(torch.allclose(out, expected, atol=1e-4))
        except Exception:  # op missing or unsupported build: use torch.matmul
            pass
    return _ONEDNN_STATE["ok"]


def _onednn_applies(x: torch.Tensor) -> bool:
    """oneDNN's GEMM is used for contiguous float32 CPU tensors when mkldnn is enabled."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and torch.backends.mkldnn.enabled
        and _onednn_linear_ok()
    )


class _OneDNNSimilarity(torch.autograd.Function):
    """``words @ regions.T`` with oneDNN's forward and plain matmuls for the backward pass."""

    @staticmethod
    def forward(ctx, words, regions):  # [n, D], [m, D] -> [n, m]
        ctx.save_for_backward(words, regions)
        return torch.ops.mkldnn._linear_pointwise(words, regions, None, "none", [], "")

    @staticmethod
    def backward(ctx, grad):  # grad [n, m]
        words, regions = ctx.saved_tensors
        return grad @ regions, grad.transpose(0, 1) @ words  # [n, D], [m, D]


def _region_operand(regions: torch.Tensor, rows_hint: int, inplace: bool):
    """The GEMM operand for ``regions [m, D]``: prepacked for oneDNN when nothing needs
    gradients (it is reused by every caption chunk), else the tensor itself."""
    if inplace and _onednn_applies(regions) and _ONEDNN_STATE["pack_ok"]:
        try:
            return torch.ops.mkldnn._reorder_linear_weight(regions, max(1, rows_hint))
        except Exception:
            _ONEDNN_STATE["pack_ok"] = False
    return regions


def _similarity(words: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """All dot products ``[n, D] x [m, D] -> [n, m]`` (one GEMM).

    ``regions`` may be a oneDNN-prepacked operand from :func:`_region_operand`.
    """
    if regions.layout != torch.strided or regions.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(words, regions, None, "none", [], "")
    if _onednn_applies(words) and _onednn_applies(regions):
        if torch.is_grad_enabled() and (words.requires_grad or regions.requires_grad):
            return _OneDNNSimilarity.apply(words, regions)
        return torch.ops.mkldnn._linear_pointwise(words, regions, None, "none", [], "")
    return torch.matmul(words, regions.transpose(0, 1))


# --------------------------------------------------------------------------------------------
# Per-chunk relevance of every query. Input block `sim` [ct, L, ci, R]; padding words are zero
# vectors (their similarities are 0). Each function returns (relevance, attended rows or None).
# --------------------------------------------------------------------------------------------
def _t2i_scan_attention(sim, lam, eps, inplace, normaliser=True):
    """SCAN's text-to-image attention over the regions of every (caption, word, image) row.

    Args:
        sim: ``[ct, L, ci, R]`` similarities (padding words are zero rows).
        normaliser: with the unshifted softmax, also sum the weights; ``False`` when the caller
            gets the sums elsewhere (:func:`_factored_quadratic_form`).

    Returns:
        ``(weights [ct, L, ci, R], normaliser [ct, L, ci] or None)``: the weights are
        ``exp(λ x̂)`` and still need dividing by the normaliser (``None`` if not asked for), or
        (``None``) the softmax itself.
    """
    x = F.leaky_relu(sim, 0.1)  # [ct, L, ci, R]
    norm = _scan_norm(x, 1, eps, inplace=False).unsqueeze(1)  # [ct, 1, ci, R] over the words
    unshifted = _unshifted_exp_ok(lam, sim.dtype)
    scale = lam * _LOG2_E if unshifted else lam  # base-2 logits for exp2 (see _LOG2_E)
    logits = x.mul_(scale / norm) if inplace else x * (scale / norm)  # [ct, L, ci, R]
    if not unshifted:
        return torch.softmax(logits, dim=-1), None  # [ct, L, ci, R], softmax over the regions
    # softmax without its max pass and its division pass: |x̂| <= 1 (x over its norm over the
    # words), so the logits lie in [-λ, λ] and exp cannot overflow; the caller divides the
    # normaliser Σ_j exp out of its per-row results instead of the whole block.
    weights = logits.exp2_() if inplace else logits.exp2()  # [ct, L, ci, R] unnormalised
    return weights, weights.sum(dim=-1) if normaliser else None


def _t2i_scan(sim, real, word_norm, image_gram, image_factor, lam, t, eps, inplace):
    """SCAN text-to-image relevance ``r [ct, L, ci]`` of every word against every image.

    Args:
        sim: ``[ct, L, ci, R]`` similarities.
        real: ``[ct, L]`` real-word mask (unused: padding rows are already zero).
        word_norm: ``[ct, L]`` word norms (1 for normalised words; kept for SCAN's cosine).
        image_gram: ``[ci, R, R]`` region Gram matrices.
        image_factor: ``[ci, R+1, R]`` their factors from :func:`_gram_factors`, or ``None``
            (then the Gram matrices are used). Only given with the unshifted softmax.
    """
    # [ct, L, ci, R] weights, [ct, L, ci] normaliser or None
    attn, total = _t2i_scan_attention(sim, lam, eps, inplace, normaliser=image_factor is None)
    if image_factor is not None:
        # |c|² and the softmax normaliser Σ exp from one product (instead of a pass of its own)
        quad, total = _factored_quadratic_form(attn, image_factor)  # [ct, L, ci] each
    else:
        quad = _per_image_quadratic_form(attn, image_gram)  # [ct, L, ci] |c|² (· (Σ exp)²)
    prod = attn.mul_(sim) if inplace else attn * sim  # attn is not needed after this
    numerator = prod.sum(dim=-1)  # [ct, L, ci]  = w · c (times Σ exp)
    if total is not None:
        numerator, quad = numerator / total, quad / total.square()
    denom = word_norm.unsqueeze(-1) * quad.clamp_min(eps * eps).sqrt()  # [ct, L, ci]
    return numerator / denom.clamp_min(eps), None


def _t2i_uarda(sim, real, word_norm, image_gram, image_factor, lam, t, eps, inplace,
               skip_irrelevant):
    """uarda-mode text-to-image relevance ``r [ct, L, ci]`` (see cross_attention_scores).

    Same arguments as :func:`_t2i_scan` (``image_factor`` is not used); ``skip_irrelevant``:
    skipped words get only the penalty.
    """
    ct, n_word, ci, n_reg = sim.shape
    best = sim.amax(dim=-1)  # [ct, L, ci]  max_j s_ij
    live = (best > t) & real.unsqueeze(-1)  # [ct, L, ci]  real words with a relevant region
    # Live (word, image) rows in image-major order, so that the rows of one image are
    # contiguous for the grouped Gram product: [ct, L, ci] -> [ci, ct, L] -> 3 x [M]
    image, caption, word = live.permute(2, 0, 1).nonzero(as_tuple=True)
    n_live = int(image.numel())
    rel = torch.where(live, 0.0, best - t)  # [ct, L, ci]  negative branch: shortfall best - t
    if not skip_irrelevant:
        # Relevance-score branch for every word: Σ_j a_ij s_ij with SCAN's attention.
        attn, total = _t2i_scan_attention(sim, lam, eps, inplace)  # [ct, L, ci, R]
        scores = (attn.mul_(sim) if inplace else attn * sim).sum(dim=-1)  # [ct, L, ci]
        rel = rel + (scores if total is None else scores / total)
    if n_live == 0:
        return rel, 0
    # Flat indices of the live rows (index_select/index_add on flat views are several times
    # faster than tuple indexing on CPU): query = (caption, word), row = (caption, word, image).
    query = caption * n_word + word  # [M] into [ct*L]
    row = query * ci + image  # [M] into [ct*L*ci]
    s_rows = sim.view(-1, n_reg).index_select(0, row)  # [ct*L*ci, R] -> [M, R] whole rows
    relevant = (s_rows.detach() - t).gt_(0.0)  # [M, R] 0/1 in s_rows' dtype; s - t > 0 iff s > t
    live_rel = _attend_live_rows(
        s_rows, relevant, best.view(-1).index_select(0, row), image, image_gram,
        word_norm.view(-1).index_select(0, query), lam, eps,
    )  # [M] positive branch
    if skip_irrelevant:
        # Relevance-score branch on the live rows only; SCAN's normalisation still runs over all
        # real words (one pass over the block).
        norm = _scan_norm(F.leaky_relu(sim, 0.1), 1, eps, inplace)  # [ct, ci, R] over the words
        norm_rows = norm.view(-1, n_reg).index_select(0, caption * ci + image)  # [M, R]
        live_rel = live_rel + _scan_relevance_rows(s_rows, norm_rows, None, lam)
    return rel.view(-1).index_add(0, row, live_rel).view(ct, n_word, ci), n_live


def _i2t_scan_attention(sim, real, lam, eps):
    """SCAN's image-to-text attention ``[ct, L, ci, R]`` over the real words of each caption,
    for every (caption, image, region) column.

    Args:
        sim: ``[ct, L, ci, R]`` similarities.
        real: ``[ct, L]`` real-word mask (padding words are never attended).
    """
    ct, n_word = real.shape
    x = F.leaky_relu(sim, 0.1)  # [ct, L, ci, R]
    # L2 normalisation over the regions for each word.
    norm = _sqrt_plus_eps(torch.linalg.vecdot(x, x).unsqueeze(-1), eps)  # [ct, L, ci, 1]
    # x·λ/norm, and −inf on padding words in the same pass: [ct, L, 1, 1] bias
    bias = _padding_bias(real, sim.dtype).view(ct, n_word, 1, 1)
    logits = torch.addcmul(bias, x, lam / norm)  # [ct, L, ci, R]
    return torch.softmax(logits, dim=1)  # [ct, L, ci, R], softmax over the real words


def _i2t_scan(sim, real, region_norm, word_gram, lam, t, eps, inplace):
    """SCAN image-to-text relevance ``r [ct, ci, R]`` of every region against every caption.

    Args:
        sim: ``[ct, L, ci, R]`` similarities.
        real: ``[ct, L]`` real-word mask (the context: padding is never attended).
        region_norm: ``[ci, R]`` region norms.
        word_gram: ``[ct, L, L]`` word Gram matrices of the captions.
    """
    ct, n_word, ci, n_reg = sim.shape
    attn = _i2t_scan_attention(sim, real, lam, eps)  # [ct, L, ci, R]
    # |c|² = aᵀ H a with the caption's word Gram, batched per caption:
    # [ct, L, L] x [ct, L, ci*R] -> [ct, L, ci*R]
    attn_flat = attn.view(ct, n_word, ci * n_reg)
    prod = torch.bmm(word_gram, attn_flat)
    prod = prod.mul_(attn_flat) if inplace else prod * attn_flat
    quad = prod.sum(dim=1).view(ct, ci, n_reg)  # [ct, ci, R]
    prod = attn.mul_(sim) if inplace else attn * sim  # attn is not needed after this
    numerator = prod.sum(dim=1)  # [ct, ci, R]  = v · c
    denom = region_norm.unsqueeze(0) * quad.clamp_min(eps * eps).sqrt()  # [ct, ci, R]
    return numerator / denom.clamp_min(eps), None


def _i2t_uarda(sim, real, region_norm, word_gram, lam, t, eps, inplace, skip_irrelevant):
    """uarda-mode image-to-text relevance ``r [ct, ci, R]`` (see cross_attention_scores).

    Same arguments as :func:`_i2t_scan`; ``skip_irrelevant``: skipped regions get only the
    penalty.
    """
    ct, n_word, ci, n_reg = sim.shape
    bias = _padding_bias(real, sim.dtype).view(ct, n_word, 1, 1)  # −inf on padding words
    best = (sim + bias).amax(dim=1)  # [ct, ci, R]  best real word of every region
    live = best > t  # [ct, ci, R]
    # Live (image, region) rows in caption-major order (rows of one caption are contiguous for
    # the grouped word-Gram product, rows of one pair consecutive): [ct, ci, R] -> 3 x [M]
    caption, image, region = live.nonzero(as_tuple=True)
    n_live = int(caption.numel())
    rel = torch.where(live, 0.0, best - t)  # [ct, ci, R]  negative branch: shortfall best - t
    if not skip_irrelevant:
        # Relevance-score branch for every region (SCAN's attention over the words).
        attn = _i2t_scan_attention(sim, real, lam, eps)  # [ct, L, ci, R]
        rel = rel + (attn.mul_(sim) if inplace else attn * sim).sum(dim=1)  # [ct, ci, R]
    if n_live == 0:
        return rel, 0
    # The live rows: [ct, L, ci, R] -> [ct, ci, R, L] gathered -> [M, L]
    s_rows = sim.permute(0, 2, 3, 1)[caption, image, region]
    real_rows = real.index_select(0, caption)  # [M, L]
    relevant = ((s_rows > t) & real_rows).to(s_rows.dtype)  # [M, L] real, s > t
    live_rel = _attend_live_rows(
        s_rows, relevant, best[caption, image, region], caption, word_gram,
        region_norm[image, region], lam, eps,
    )  # [M] positive branch
    if skip_irrelevant:
        # Relevance-score branch on the live rows only; SCAN's normalisation over the regions
        # for each word still runs over the whole block: [ct, L, ci] -> [ct, ci, L] -> [M, L]
        norm = _scan_norm(F.leaky_relu(sim, 0.1), -1, eps, inplace)  # [ct, L, ci]
        norm_rows = norm.permute(0, 2, 1)[caption, image]
        live_rel = live_rel + _scan_relevance_rows(s_rows, norm_rows, real_rows, lam)
    return rel.index_put((caption, image, region), live_rel, accumulate=True), n_live


def _attend_live_rows(s_rows, relevant, best, group, gram, query_norm, lam, eps):
    """uarda mode's positive branch on the compacted live query rows (both directions).

    Args:
        s_rows: ``[M, K]`` similarities of each live query to its pair's context fragments.
        relevant: ``[M, K]`` 1 on the relevant context fragments (``s > t``, real), else 0.
        best: ``[M]`` each row's largest similarity (that of a relevant fragment).
        group: ``[M]`` index into ``gram`` of each row, sorted ascending.
        gram: ``[G, K, K]`` Gram matrices of the context fragments.
        query_norm: ``[M]`` norm of each query.

    Returns:
        ``[M]`` cosines between each query and its positive attended context vector.
    """
    # Softmax of λ(s - t) over the relevant fragments, computed as exp(λ(s - best)): the shift
    # cancels in the softmax (so it needs no gradient), keeps every exp <= 1, and the row's best
    # fragment gives 1, so the normaliser is >= 1. The 0/1 mask replaces a -inf fill (exp of
    # -inf is slow on this CPU). The normaliser is divided out of the two per-row results.
    # The clamp only changes masked entries: a padding word (s = 0) in an i2t row whose best
    # similarity is negative would otherwise reach exp(λ|best|), overflow, and give inf · 0.
    shifted = (s_rows - best.detach().unsqueeze(-1)).mul_(lam * _LOG2_E).clamp_max_(0.0)  # [M, K]
    attn = shifted.exp2_() * relevant  # [M, K] unnormalised, exp(λ(s - best)) on the relevant
    total = attn.sum(dim=-1)  # [M]
    numerator = torch.linalg.vecdot(attn, s_rows) / total  # [M]  q · c
    quad = _grouped_quadratic_form(attn, group, gram) / total.square()  # [M]  |c|²
    denom = query_norm * quad.clamp_min(eps * eps).sqrt()  # [M]
    return numerator / denom.clamp_min(eps)  # [M]


def _scan_relevance_rows(s_rows, norm_rows, context_mask, lam):
    """SCAN's relevance score ``Σ_k a_k s_k`` on compacted query rows (uarda retrieval form).

    Args:
        s_rows: ``[M, K]`` similarities of each query to its pair's context fragments.
        norm_rows: ``[M, K]`` each context fragment's SCAN norm (over the pair's queries).
        context_mask: ``[M, K]`` bool, real context fragments; ``None``: all real.

    Returns:
        ``[M]``, with ``a = softmax(λ · LeakyReLU(s) / norm)`` over the real context fragments.
    """
    x = F.leaky_relu(s_rows, 0.1) / norm_rows  # [M, K]
    if not _unshifted_exp_ok(lam, s_rows.dtype):
        logits = x.mul_(lam)
        if context_mask is not None:
            logits = logits.masked_fill(~context_mask, float("-inf"))
        return torch.linalg.vecdot(torch.softmax(logits, dim=-1), s_rows)  # [M]
    # |x| <= 1 (each fragment's norm runs over all the pair's queries, this one included), so
    # the exp needs no max shift (as in _t2i_scan_attention); padding gets weight 0.
    weights = x.mul_(lam * _LOG2_E).exp2_()  # [M, K] unnormalised
    if context_mask is not None:
        weights = weights * context_mask
    return torch.linalg.vecdot(weights, s_rows) / weights.sum(dim=-1)  # [M]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _unshifted_exp_ok(lam, dtype):
    """Whether a softmax of ``λ x`` with ``|x| <= 1`` may skip its max subtraction."""
    return lam <= _MAX_LAMBDA_UNSHIFTED_EXP and dtype in _UNSHIFTED_EXP_DTYPES


def _scan_norm(x, dim, eps, inplace):
    """SCAN's L2 norm of ``x`` over ``dim`` (``sqrt(Σ x²) + eps``), the dimension dropped.

    Square, then sum: ``linalg.vecdot`` over the word axis (dim 1 of a ``[ct, L, ci, R]`` block)
    is several times slower on CPU. ``inplace`` lets the square overwrite ``x``. Padding words
    (zero rows) contribute 0.
    """
    square = x.mul_(x) if inplace else x * x
    return _sqrt_plus_eps(square.sum(dim=dim), eps)


def _sqrt_plus_eps(square_sum, eps):
    """SCAN's L2 norm ``sqrt(Σ x²) + eps``, with a zero (not NaN) gradient where ``Σ x² = 0``.

    An all-zero column (a padding word, or a fragment no query finds relevant) has norm
    ``eps``; clamping at the dtype's smallest normal number before the square root changes no
    value that matters (``sqrt(tiny) ≪ eps``) and keeps ``0 · ∞`` out of the backward pass.
    """
    return square_sum.clamp_min(torch.finfo(square_sum.dtype).tiny).sqrt() + eps


def _padding_bias(real, dtype):
    """``[ct, L]`` additive bias: 0 for real words, −inf for padding."""
    return torch.zeros(real.shape, dtype=dtype, device=real.device).masked_fill_(
        ~real, float("-inf")
    )


def _per_image_quadratic_form(attn, image_gram):
    """``a ᵀ G_i a`` for every (caption, word, image) row of ``attn [ct, L, ci, R]``.

    One batched matmul per chunk, batched over the images: the rows of image ``i`` are the
    strided view ``attn[:, :, i, :]`` (no copy): [ct, L, ci, R] -> [ct*L, ci, R] -> [ci, ct*L, R]
    """
    ct, n_word, ci, n_reg = attn.shape
    rows = attn.view(ct * n_word, ci, n_reg).transpose(0, 1)  # [ci, ct*L, R]
    prod = torch.bmm(rows, image_gram)  # [ci, ct*L, R]
    # the row-wise dot (a G) · a as one fused pass: [ci, ct*L] -> [ct*L, ci] -> [ct, L, ci]
    return torch.linalg.vecdot(prod, rows).transpose(0, 1).reshape(ct, n_word, ci)


def _gram_factors(regions, gram):
    """``[N, R+1, R]``: a factor ``F`` of every Gram matrix (``FᵀF = G``), a row of ones below.

    ``F`` is the upper Cholesky factor; a Gram matrix that is not numerically positive definite
    (repeated or zero regions, or more regions than dimensions) gets the triangular factor of a
    QR decomposition of its regions instead (``Vᵀ = QF``, so ``FᵀF = VVᵀ``; zero rows pad it
    when ``D < R``). Cholesky costs about 7 µs per image, the QR about 80 µs.

    Args:
        regions: ``[N, R, D]`` region fragments.
        gram: ``[N, R, R]`` their Gram matrices ``V Vᵀ``.
    """
    n_img, n_reg, _ = regions.shape
    factor, info = torch.linalg.cholesky_ex(gram, upper=True)  # [N, R, R]
    failed = (info != 0).nonzero().flatten()  # [n_failed]
    if failed.numel():
        triangular = torch.linalg.qr(regions[failed].transpose(1, 2), mode="r")[1]
        factor[failed] = F.pad(triangular, (0, 0, 0, n_reg - triangular.shape[1]))  # [n, R, R]
    return torch.cat([factor, gram.new_ones(n_img, 1, n_reg)], dim=1)  # [N, R+1, R]


def _factored_quadratic_form(attn, image_factor):
    """``aᵀ G_i a`` and ``Σ a`` for every (caption, word, image) row of ``attn [ct, L, ci, R]``.

    ``aᵀGa = |F a|²`` with the factors of :func:`_gram_factors`, and their row of ones gives
    ``Σ a``. One batched product per chunk, in the orientation ``[R+1, R] x [R, ct*L]`` (the
    rows of image ``i`` are the strided view ``attn[:, :, i, :]``, no copy), which runs
    markedly faster on CPU than ``[ct*L, R] x [R, R]`` with ``R`` = 36, and then squares and
    sums in place instead of a separate multiply with ``a`` (:func:`_per_image_quadratic_form`).

    Returns:
        ``(quad [ct, L, ci], total [ct, L, ci])``.
    """
    ct, n_word, ci, n_reg = attn.shape
    rows = attn.view(ct * n_word, ci, n_reg).permute(1, 2, 0)  # [ct*L, ci, R] -> [ci, R, ct*L]
    product = torch.bmm(image_factor, rows)  # [ci, R+1, ct*L]
    total = product[:, n_reg]  # [ci, ct*L]
    quad = product[:, :n_reg].square_().sum(dim=1)  # [ci, ct*L]
    # [2, ci, ct*L] -> [2, ct*L, ci] -> [2, ct, L, ci]
    both = torch.stack([quad, total]).transpose(1, 2).reshape(2, ct, n_word, ci)
    return both[0], both[1]


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
    n_groups, k = gram.shape[0], gram.shape[-1]
    counts = torch.bincount(group, minlength=n_groups)  # [G]
    starts = counts.cumsum(0) - counts  # [G] first row of each group
    width = int(counts.max())
    # Row m goes to slot (group, position within its group) of the padded tensor, flattened.
    position = torch.arange(group.numel(), device=group.device) - starts.index_select(0, group)
    flat = group * width + position  # [M] into [G*width]
    padded = vectors.new_zeros(n_groups * width, k).index_copy(0, flat, vectors)  # [G*width, K]
    product = torch.bmm(padded.view(n_groups, width, k), gram)  # [G, width, K]
    product = product.view(n_groups * width, k).index_select(0, flat)  # [M, K]
    return torch.linalg.vecdot(product, vectors)  # [M]


def _pool(rel, query_mask, aggregation, lam_lse, dim):
    """Pool query relevances over ``dim`` into pair scores; ``query_mask`` marks real queries."""
    if aggregation == "lse":
        logits = rel * lam_lse
        if query_mask is not None:
            logits = logits.masked_fill(~query_mask, float("-inf"))
        return torch.logsumexp(logits, dim=dim) / lam_lse
    if query_mask is None:
        return rel.mean(dim=dim)
    weights = query_mask.to(rel.dtype)
    return (rel * weights).sum(dim=dim) / weights.sum(dim=dim)


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
        if not _all_finite(x):
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
    if text_mask.is_floating_point() and not _all_finite(text_mask):
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


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or ±inf in ``x``: one reduction pass (min and max propagate NaN)."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _softmax_lambdas(value, threshold_mode):
    """The softmax λ per direction, defaulting to the threshold mode's own values."""
    defaults = NAAF_LAMBDA_SOFTMAX if threshold_mode == "uarda" else SCAN_LAMBDA_SOFTMAX
    return _per_direction(value, defaults, "lambda_softmax")


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


def _plan_chunks(n_img, n_reg, n_word, chunk_size, memory_budget_mb, element_size, mode):
    """Choose the images per chunk and the size of the caption chunks.

    Returns ``(images_per_chunk, captions_per_chunk or None, max_block_elements)``. A chunk's
    block ``[ct, Lc, ci, R]`` has ``ct·Lc·ci·R`` elements and about ``_LIVE_BUFFERS_PER_CHUNK``
    such buffers live at once, so the budget allows
    ``budget / (element_size · _LIVE_BUFFERS_PER_CHUNK)`` elements per block; blocks are further
    kept near ``_TARGET_CHUNK_ELEMENTS[mode]``. Images are chunked by
    ``_IMAGES_PER_CHUNK[mode]`` (fewer if one caption's block would not fit); the number of captions
    per chunk then follows each chunk's caption length (``captions_per_chunk`` is ``None``),
    unless ``chunk_size`` fixes both.
    """
    if chunk_size is not None:
        ci, ct = (int(c) for c in chunk_size)
        if ci < 1 or ct < 1:
            raise ValueError(f"chunk_size must be two positive integers, got {chunk_size!r}")
        return min(ci, n_img), ct, None
    if not (memory_budget_mb > 0):
        raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
    budget_elements = int(memory_budget_mb * 2**20 / (element_size * _LIVE_BUFFERS_PER_CHUNK))
    max_elements = max(1, min(budget_elements, _TARGET_CHUNK_ELEMENTS[mode]))
    ci = max(1, min(n_img, _IMAGES_PER_CHUNK[mode], max_elements // (n_word * n_reg)))
    return ci, None, max_elements


def _effective_lengths(word_mask):
    """``[N_t]`` index of the last real word + 1 (the caption length for prefix masks)."""
    positions = torch.arange(1, word_mask.shape[1] + 1, device=word_mask.device)  # [L]
    return (word_mask * positions).amax(dim=1)  # [N_t]


def _caption_chunks(sorted_lengths, words_per_caption_word, fixed_size, max_elements):
    """Split captions sorted by length into ``(start, end, Lc)`` chunks.

    ``Lc`` is the chunk's longest caption; a chunk holds about ``max_elements`` block elements
    (``captions · Lc · words_per_caption_word``, the latter being ``ci·R``), or ``fixed_size``
    captions when given.
    """
    chunks, start, n = [], 0, len(sorted_lengths)
    while start < n:
        if fixed_size is not None:
            end = min(n, start + fixed_size)
        else:
            per_caption = sorted_lengths[start] * words_per_caption_word
            end = min(n, start + max(1, max_elements // per_caption))
            per_caption = sorted_lengths[end - 1] * words_per_caption_word  # sorted: the longest
            end = min(end, start + max(1, max_elements // per_caption))
        chunks.append((start, end, int(sorted_lengths[end - 1])))
        start = end
    return chunks


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
    σ+ > σ− (methods.md's phrasing) and the smaller one when σ+ < σ− (the larger one then lies
    above μ+, where the wider irrelevant tail wins again). It is evaluated in the cancellation-free
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
    c = (mu_n * sd_p) ** 2 - (mu_p * sd_n) ** 2
    c += 2.0 * var_p * var_n * math.log(sd_n / (alpha * sd_p))
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
    negative: str = "easiest",
    only_correct: bool = False,
    positive_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Relevant and irrelevant word–region similarity samples of a training batch.

    The batch pairs image ``b`` with caption ``b`` (``N_i == N_t``; repeat images for several
    captions per image). For every real word of caption ``b``:

    * relevant sample: ``max_j s_ij`` against its own image ``b``;
    * irrelevant sample: ``max_j s_ij`` against the negative image — the lowest-scoring other
      image (``negative="easiest"``, NAAF's choice and UARDAModel's) or the highest-scoring one
      (``"hardest"``). Early in training the hardest negative often outscores the match, which
      would put the boundary above every relevant similarity.

    Args:
        image_fragments: ``[B, R, D]``.
        text_fragments: ``[B, L, D]``.
        text_mask: ``[B, L]`` or ``None``.
        scores: ``[B, B]`` image × caption scores of the batch (used only to pick negatives).
        negative: ``"hardest"`` or ``"easiest"``.
        only_correct: keep only captions whose best image is their own (NAAF's mismatch
            mining), so that the samples reflect what the model already separates.
        positive_mask: ``[B, B]`` bool, True where image ``i`` matches caption ``c`` (default:
            the diagonal). Give it when the batch repeats an image, so that a copy of the own
            image is never taken as the negative.

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
    s = scores.detach()  # [B_img, B_txt]
    diag = torch.eye(batch, dtype=torch.bool, device=s.device)
    if positive_mask is None:
        positive_mask = diag
    elif tuple(positive_mask.shape) != (batch, batch):
        raise ValueError(
            f"positive_mask must be [{batch}, {batch}], got {tuple(positive_mask.shape)}"
        )
    else:
        positive_mask = positive_mask.to(device=s.device, dtype=torch.bool) | diag
    if bool(positive_mask.all(dim=0).any()):
        raise ValueError("every caption needs at least one negative image in the batch")
    if negative == "hardest":
        neg_image = s.masked_fill(positive_mask, float("-inf")).argmax(dim=0)  # [B]
    else:
        neg_image = s.masked_fill(positive_mask, float("inf")).argmin(dim=0)  # [B]
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
        self.relevant_mean.fill_(mu_p)
        self.relevant_std.fill_(sd_p)
        self.irrelevant_mean.fill_(mu_n)
        self.irrelevant_std.fill_(sd_n)
        if mu_p <= mu_n:  # not yet separated: no boundary between the two to learn from
            return False
        estimate = gaussian_boundary(mu_p, sd_p, mu_n, sd_n, self.alpha)
        estimate = min(max(estimate, self.clip[0]), self.clip[1])
        if int(self.num_updates) > 0:
            estimate = self.update_weight * estimate + (1.0 - self.update_weight) * float(
                self.threshold
            )
        self.threshold.fill_(estimate)
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
