"""Tests of the cross-attention scorer (hf_mvam.cross_attention).

The references below are written independently of the code under test: a hand-computed SCAN
score, and per-pair loops that follow SCAN's ``func_attention`` (kuanghuei/SCAN, model.py)
one image–caption pair at a time.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_mvam.cross_attention import cross_attention_scores

REPO = Path(__file__).resolve().parents[1]
LAM_SOFTMAX = {"t2i": 9.0, "i2t": 4.0}
LAM_SOFTMAX_UARDA = {"t2i": 20.0, "i2t": 4.0}  # NAAF's 20 (it scores t2i only)
LAM_LSE = {"t2i": 6.0, "i2t": 5.0}


# ----------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------
def _scan_pair(query, context, lam, eps=1e-8):
    """SCAN's func_attention + cosine for ONE pair: relevance of every query row."""
    attn = context @ query.T  # [n_context, n_query]
    attn = F.leaky_relu(attn, 0.1)
    attn = attn / (attn.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)  # l2norm over the queries
    attn = torch.softmax(attn.T * lam, dim=1)  # [n_query, n_context], softmax over the context
    weighted = attn @ context  # [n_query, d]
    w12 = (query * weighted).sum(1)
    return w12 / (query.norm(dim=1) * weighted.norm(dim=1)).clamp(min=eps)


def _uarda_pair(query, context, lam, t, skip=False, eps=1e-8):
    """The documented uarda-mode relevance for ONE pair, one query at a time (NAAF's
    xattn_score: relevance-score branch + positive or negative branch; ``skip``: the retrieval
    form, in which a query with no relevant fragment scores its penalty alone)."""
    s = query @ context.T  # [n_query, n_context]
    x = F.leaky_relu(s, 0.1)
    x = x / (x.pow(2).sum(dim=0, keepdim=True).sqrt() + eps)  # l2norm over the queries
    scan_attn = torch.softmax(lam * x, dim=1)  # SCAN's attention over the context
    out = []
    for q in range(query.shape[0]):
        relevance_score = (scan_attn[q] * s[q]).sum()
        relevant = s[q] > t
        if not bool(relevant.any()):  # skipped: its best falls short of t
            out.append(s[q].max() - t + (0.0 if skip else relevance_score))
            continue
        a = torch.softmax(lam * (s[q, relevant] - t), dim=0)  # over the relevant fragments only
        c = a @ context[relevant]
        out.append(relevance_score + (query[q] @ c) / (query[q].norm() * c.norm()).clamp(min=eps))
    return torch.stack(out)


def _pool(rel, aggregation, lam_lse):
    if aggregation == "lse":
        return torch.log(torch.exp(rel * lam_lse).sum()) / lam_lse
    return rel.mean()


def naive_scores(images, captions, mask, direction, aggregation, mode, t=0.0, lam_softmax=None,
                 skip=False):
    """Loop over every (image, caption) pair; captions truncated to their real words."""
    lam_softmax = lam_softmax or (LAM_SOFTMAX_UARDA if mode == "uarda" else LAM_SOFTMAX)
    out = torch.zeros(images.shape[0], captions.shape[0], dtype=images.dtype)
    dirs = ("t2i", "i2t") if direction == "both" else (direction,)
    for i in range(images.shape[0]):
        for c in range(captions.shape[0]):
            words = captions[c][mask[c].bool()]
            regions = images[i]
            total = 0.0
            for d in dirs:
                query, context = (words, regions) if d == "t2i" else (regions, words)
                if mode == "scan":
                    rel = _scan_pair(query, context, lam_softmax[d])
                else:
                    rel = _uarda_pair(query, context, lam_softmax[d], t, skip)
                total = total + _pool(rel, aggregation, LAM_LSE[d])
            out[i, c] = total
    return out


def random_fragments(n_img=5, n_txt=7, n_reg=6, n_word=5, dim=8, dtype=torch.float64, seed=0,
                     pad_value=0.37):
    """Random unit fragments with variable caption lengths (1..n_word real words)."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_img, n_reg, dim, generator=g, dtype=dtype), dim=-1)
    captions = F.normalize(torch.randn(n_txt, n_word, dim, generator=g, dtype=dtype), dim=-1)
    # Give captions some content of image (c % n_img) so that similarities are mixed.
    for c in range(n_txt):
        captions[c, :2] = F.normalize(images[c % n_img, :2] + 0.3 * captions[c, :2], dim=-1)
    lengths = torch.randint(1, n_word + 1, (n_txt,), generator=g)
    lengths[0] = n_word
    lengths[1] = 1
    mask = (torch.arange(n_word)[None, :] < lengths[:, None]).long()
    # Padding slots hold arbitrary finite values: they must never matter.
    captions = torch.where(mask.bool()[..., None], captions, torch.full_like(captions, pad_value))
    return images, captions, mask


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------
def test_scan_matches_hand_computed_example():
    """One image with regions e1, e2; one caption with words (0.6, 0.8) and (1, 0)."""
    images = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    one_word = torch.tensor([[[0.6, 0.8]]], dtype=torch.float64)
    # A single word: s = (0.6, 0.8); normalised over the (one) word: (1, 1); attention (½, ½);
    # c = (0.5, 0.5); cos(w, c) = 0.7 / sqrt(0.5) = 0.7·√2; LSE over one word = that value.
    got = cross_attention_scores(images, one_word, direction="t2i")
    assert got.shape == (1, 1)
    assert abs(float(got) - 0.7 * math.sqrt(2.0)) < 1e-7  # 0.98994949...

    two_words = torch.tensor([[[0.6, 0.8], [1.0, 0.0]]], dtype=torch.float64)
    # Step by step (λ = 9, λ_lse = 6):
    s = [[0.6, 0.8], [1.0, 0.0]]  # s[word][region]
    col = [math.sqrt(0.6**2 + 1.0**2), math.sqrt(0.8**2 + 0.0**2)]  # per-region norm over words
    s_hat = [[s[i][j] / (col[j] + 1e-8) for j in range(2)] for i in range(2)]
    rel = []
    for i, w in enumerate([(0.6, 0.8), (1.0, 0.0)]):
        e = [math.exp(9.0 * s_hat[i][j]) for j in range(2)]
        a = [e[0] / sum(e), e[1] / sum(e)]
        c = (a[0] * 1.0, a[1] * 1.0)  # a1·e1 + a2·e2
        rel.append((w[0] * c[0] + w[1] * c[1]) / math.hypot(*c))
    expected = math.log(sum(math.exp(6.0 * r) for r in rel)) / 6.0
    # Word 1: ŝ = (0.6/√1.36, 0.8/0.8) = (0.51450, 1) -> a = (0.012499, 0.987501)
    #         -> c = a, w·c = 0.79750, |c| = 0.98758 -> R = 0.80753;
    # word 2: ŝ = (1/√1.36, 0) = (0.85749, 0) -> a = (0.999555, 0.000445) -> R = 0.9999999;
    # LSE = log(e^(6·0.80753) + e^(6·0.9999999)) / 6 = 1.04565.
    assert abs(rel[0] - 0.80753) < 1e-5 and abs(rel[1] - 0.9999999) < 1e-7
    assert abs(expected - 1.04565) < 1e-5
    got = cross_attention_scores(images, two_words, direction="t2i")
    assert abs(float(got) - expected) < 1e-10
    got_mean = cross_attention_scores(images, two_words, aggregation="mean")
    assert abs(float(got_mean) - sum(rel) / 2) < 1e-10


# (mode, threshold, skip_irrelevant_queries): uarda mode's training and retrieval forms
MODES = [("scan", 0.0, False), ("uarda", 0.15, False), ("uarda", 0.15, True),
         ("uarda", -0.05, False), ("uarda", -0.05, True)]


@pytest.mark.parametrize("mode,t,skip", MODES)
@pytest.mark.parametrize("direction", ["t2i", "i2t", "both"])
@pytest.mark.parametrize("aggregation", ["lse", "mean"])
def test_matches_per_pair_reference(mode, t, skip, direction, aggregation):
    images, captions, mask = random_fragments()
    got = cross_attention_scores(
        images, captions, mask, direction=direction, aggregation=aggregation,
        threshold_mode=mode, threshold=t, skip_irrelevant_queries=skip, chunk_size=(2, 3),
    )
    ref = naive_scores(images, captions, mask, direction, aggregation, mode, t, skip=skip)
    assert torch.allclose(got, ref, atol=1e-10, rtol=0), (got - ref).abs().max()


@pytest.mark.parametrize("lam", [0.5, 20.0, 20.5, 60.0])
@pytest.mark.parametrize("mode,t,skip", [("scan", 0.0, False), ("uarda", 0.1, False),
                                         ("uarda", 0.1, True)])
def test_softmax_temperatures_match_reference(mode, t, skip, lam):
    """Small and large λ equal the per-pair loop (large λ: near-one-hot attention, no overflow)."""
    images, captions, mask = random_fragments(seed=4)
    lam_softmax = {"t2i": lam, "i2t": lam}
    kwargs = dict(direction="both", threshold_mode=mode, threshold=t, lambda_softmax=lam,
                  skip_irrelevant_queries=skip)
    got = cross_attention_scores(images, captions, mask, **kwargs)
    ref = naive_scores(images, captions, mask, "both", "lse", mode, t, lam_softmax, skip=skip)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ref, atol=1e-10, rtol=0), (got - ref).abs().max()
    got32 = cross_attention_scores(images.float(), captions.float(), mask, **kwargs)
    assert torch.allclose(got32.double(), ref, atol=1e-5), (got32.double() - ref).abs().max()


@pytest.mark.parametrize("mode,t,skip", [("scan", 0.0, False), ("uarda", 0.1, False),
                                         ("uarda", 0.1, True)])
def test_masks_with_holes(mode, t, skip):
    """Real words need not be a prefix: any mask pattern scores like the per-pair loop."""
    images, captions, _ = random_fragments(seed=6)
    g = torch.Generator().manual_seed(7)
    mask = (torch.rand(captions.shape[:2], generator=g) < 0.6).long()
    mask[:, 2] = 1  # every caption keeps at least one word
    mask[0] = torch.tensor([0, 0, 1, 0, 1])
    got = cross_attention_scores(images, captions, mask, direction="both", threshold_mode=mode,
                                 threshold=t, skip_irrelevant_queries=skip)
    ref = naive_scores(images, captions, mask, "both", "lse", mode, t, skip=skip)
    assert torch.allclose(got, ref, atol=1e-10)


@pytest.mark.parametrize("skip", [False, True])
def test_i2t_padding_slots_with_negative_threshold_and_large_lambda(skip):
    """An i2t row spans its chunk's padding word slots (similarity 0). With t < best < 0 and a
    large λ, exp(λ(0 - best)) on them overflows float32; they are masked out, so they must not
    turn the score into inf · 0 = NaN (caption 0 has a padding slot, caption 1 has none)."""
    images = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    captions = torch.tensor([[[-0.6, 0.8], [0.0, 0.0]], [[-0.6, 0.8], [0.6, 0.8]]])
    mask = torch.tensor([[1, 0], [1, 1]])
    lam = {"t2i": 200.0, "i2t": 200.0}  # λ · 0.6 = 120 > log(float32 max) = 88.7
    got = cross_attention_scores(images, captions, mask, direction="i2t", threshold_mode="uarda",
                                 threshold=-0.9, lambda_softmax=lam, skip_irrelevant_queries=skip)
    ref = naive_scores(images.double(), captions.double(), mask, "i2t", "lse", "uarda", -0.9, lam,
                       skip=skip)
    assert torch.isfinite(got).all(), got
    assert torch.allclose(got.double(), ref, atol=1e-5), (got.double() - ref).abs().max()


@pytest.mark.parametrize("mode,skip", [("scan", False), ("uarda", False), ("uarda", True)])
def test_float16_matches_float32(mode, skip):
    """Half-precision fragments (``model.half()``) score finitely: an exp(λ x̂) without the
    softmax's max subtraction would overflow float16 (caption 1 has one word, so x̂ = ±1, and 36
    regions times exp(9) or exp(20) alone exceed float16's 65504)."""
    images, captions, mask = random_fragments(n_reg=36, dtype=torch.float32, seed=5)
    kwargs = dict(direction="both", threshold_mode=mode, threshold=0.1, skip_irrelevant_queries=skip)
    full = cross_attention_scores(images, captions, mask, **kwargs)
    half = cross_attention_scores(images.half(), captions.half(), mask, **kwargs)
    assert half.dtype == torch.float16 and torch.isfinite(half).all(), half
    assert torch.allclose(half.float(), full, atol=2e-2), (half.float() - full).abs().max()


def test_uarda_skips_queries_and_reports_it():
    images, captions, mask = random_fragments()
    _, stats = cross_attention_scores(
        images, captions, mask, direction="both", threshold_mode="uarda", threshold=0.15,
        return_stats=True,
    )
    assert stats["t2i_queries"] == 5 * int(mask.sum())
    assert 0 < stats["t2i_attended"] < stats["t2i_queries"]
    assert 0 < stats["i2t_skipped_fraction"] < 1
    # A threshold above every similarity skips everything: score = pooled shortfalls best - t.
    got, stats = cross_attention_scores(
        images, captions, mask, threshold_mode="uarda", threshold=1.5, return_stats=True
    )
    assert stats["t2i_attended"] == 0
    ref = naive_scores(images, captions, mask, "t2i", "lse", "uarda", 1.5)
    assert torch.allclose(got, ref, atol=1e-12)
    # ... and in the retrieval form nothing else: the scores are the pooled shortfalls alone.
    got = cross_attention_scores(images, captions, mask, aggregation="mean",
                                 threshold_mode="uarda", threshold=1.5, skip_irrelevant_queries=True)
    best = torch.einsum("tld,ird->itlr", captions, images).amax(-1)  # [I, T, L]
    real = mask.bool()
    expected = ((best - 1.5) * real).sum(-1) / real.sum(-1)  # [I, T] mean over real words
    assert torch.allclose(got, expected, atol=1e-12)


def test_float32_matches_float64():
    images, captions, mask = random_fragments(dtype=torch.float64, seed=3)
    for mode in ("scan", "uarda"):
        ref = cross_attention_scores(images, captions, mask, direction="both",
                                     threshold_mode=mode, threshold=0.1)
        got = cross_attention_scores(images.float(), captions.float(), mask, direction="both",
                                     threshold_mode=mode, threshold=0.1)
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_region_gram_matrices_that_are_not_positive_definite(dtype):
    """|c|² = aᵀGa holds for any Gram matrix: one that is not positive definite (a repeated
    region, an all-zero region as in zero-padded precomputed features, more regions than
    dimensions) scores like the per-pair loop, with and without autograd."""
    images, captions, mask = random_fragments(n_img=4, n_txt=5, n_reg=6, dim=8, seed=8)
    images[1, 3] = images[1, 0]  # a repeated region
    images[2, 5] = 0.0  # an all-zero region: its Cholesky pivot is exactly 0
    gram = images @ images.transpose(1, 2)
    assert int(torch.linalg.cholesky_ex(gram)[1][2]) != 0  # not positive definite
    wide = random_fragments(n_img=3, n_txt=4, n_reg=9, n_word=5, dim=4, seed=9)  # R > D
    atol = 1e-10 if dtype == torch.float64 else 1e-5
    for im, cap, m in ((images, captions, mask), wide):
        im, cap = im.to(dtype), cap.to(dtype)
        got = cross_attention_scores(im, cap, m)
        ref = naive_scores(im.double(), cap.double(), m, "t2i", "lse", "scan")
        assert torch.isfinite(got).all()
        assert torch.allclose(got.double(), ref, atol=atol), (got.double() - ref).abs().max()
        with_grad = cross_attention_scores(im.clone().requires_grad_(True), cap, m)
        assert torch.allclose(with_grad.detach(), got, atol=atol)


@pytest.mark.parametrize("mode,skip", [("scan", False), ("uarda", False), ("uarda", True)])
def test_chunking_does_not_change_the_result(mode, skip):
    images, captions, mask = random_fragments(n_img=9, n_txt=11, seed=1)
    kwargs = dict(direction="both", threshold_mode=mode, threshold=0.1,
                  skip_irrelevant_queries=skip)
    full = cross_attention_scores(images, captions, mask, chunk_size=(9, 11), **kwargs)
    for chunk in [(1, 1), (2, 3), (4, 11), (9, 2)]:
        got = cross_attention_scores(images, captions, mask, chunk_size=chunk, **kwargs)
        assert torch.allclose(got, full, atol=1e-12), chunk
    tiny_budget = cross_attention_scores(images, captions, mask, memory_budget_mb=0.01, **kwargs)
    assert torch.allclose(tiny_budget, full, atol=1e-12)
    default = cross_attention_scores(images, captions, mask, **kwargs)
    assert torch.allclose(default, full, atol=1e-12)


@pytest.mark.parametrize("mode,aggregation,skip", [("scan", "lse", False), ("uarda", "mean", False),
                                                    ("uarda", "lse", False), ("uarda", "lse", True)])
def test_gradients(mode, aggregation, skip):
    # Zero padding vectors: similarities of exactly 0 must not produce NaN gradients.
    images, captions, mask = random_fragments(n_img=3, n_txt=4, n_reg=4, n_word=4, dim=5, seed=2,
                                              pad_value=0.0)
    images.requires_grad_(True)
    captions.requires_grad_(True)

    def fn(im, cap):
        return cross_attention_scores(
            im, cap, mask, direction="both", aggregation=aggregation, threshold_mode=mode,
            threshold=0.1, skip_irrelevant_queries=skip, chunk_size=(2, 3),
        )

    assert torch.autograd.gradcheck(fn, (images, captions), eps=1e-6, atol=1e-6, fast_mode=True)
    # float32 backward through a weighted sum: finite, non-zero gradients.
    im32 = images.detach().float().requires_grad_(True)
    cap32 = captions.detach().float().requires_grad_(True)
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    (fn(im32, cap32) * weights).sum().backward()
    for g in (im32.grad, cap32.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # float32 and float64 give the same gradients.
    (fn(images, captions) * weights.double()).sum().backward()
    assert torch.allclose(im32.grad.double(), images.grad, atol=1e-4)
    assert torch.allclose(cap32.grad.double(), captions.grad, atol=1e-4)


def test_uarda_matches_hand_computed_example():
    """One image with regions e1, e2; one word (0.6, 0.8): s = (0.6, 0.8), λ = 9."""
    images = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    word = torch.tensor([[[0.6, 0.8]]], dtype=torch.float64)

    def score(t, skip=False):
        return float(cross_attention_scores(images, word, aggregation="mean", lambda_softmax=9.0,
                                            threshold_mode="uarda", threshold=t,
                                            skip_irrelevant_queries=skip))

    # Relevance-score branch: SCAN's normalisation over the one word maps each similarity to
    # s / (s + eps) ≈ 1, so its attention is ≈ (1/2, 1/2) and the branch ≈ 0.7, whatever t is.
    x = [0.6 / (0.6 + 1e-8), 0.8 / (0.8 + 1e-8)]
    b = [math.exp(9 * v) for v in x]
    relevance_score = (0.6 * b[0] + 0.8 * b[1]) / sum(b)
    assert abs(relevance_score - 0.7) < 1e-6
    # t = 0.5: both regions relevant, a ∝ (exp(9·0.1), exp(9·0.3)); c = a (e1, e2 are the basis)
    a = [math.exp(0.9), math.exp(2.7)]
    a = [v / sum(a) for v in a]
    positive = (0.6 * a[0] + 0.8 * a[1]) / math.hypot(*a)
    assert abs(score(0.5) - (relevance_score + positive)) < 1e-12
    # t = 0.7: only e2 is relevant, c = e2, cos = 0.8; t = 0.9: skipped, the penalty 0.8 - 0.9
    assert abs(score(0.7) - (relevance_score + 0.8)) < 1e-12
    assert abs(score(0.9) - (relevance_score - 0.1)) < 1e-12
    # t = 0.55 vs 0.5: a shift of t that keeps the same relevant set does not change the softmax
    assert abs(score(0.55) - score(0.5)) < 1e-12
    # Retrieval form: a live word scores the same; the skipped word only its penalty, 0.8 - 0.9
    assert abs(score(0.5, skip=True) - (relevance_score + positive)) < 1e-12
    assert abs(score(0.9, skip=True) - (0.8 - 0.9)) < 1e-12


def test_progress_bar_runs(capsys):
    images, captions, mask = random_fragments()
    got = cross_attention_scores(images, captions, mask, chunk_size=(2, 2), progress=True)
    assert got.shape == (5, 7)


def test_lambda_arguments():
    images, captions, mask = random_fragments()
    a = cross_attention_scores(images, captions, mask, direction="both")
    b = cross_attention_scores(images, captions, mask, direction="both",
                               lambda_softmax=(9, 4), lambda_lse={"t2i": 6, "i2t": 5})
    assert torch.equal(a, b)
    c = cross_attention_scores(images, captions, mask, lambda_softmax=20.0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize(
    "case,match",
    [
        ("all_padding", "no real word"),
        ("empty_images", "empty"),
        ("empty_text", "empty"),
        ("nan_image", "NaN or infinite"),
        ("inf_text", "NaN or infinite"),
        ("dim_mismatch", "feature dimension"),
        ("bad_rank", "shape"),
        ("mask_shape", "text_mask must have shape"),
        ("direction", "direction"),
        ("aggregation", "aggregation"),
        ("mode", "threshold_mode"),
        ("threshold", "threshold must be finite"),
        ("lambda", "lambda_softmax"),
        ("chunk", "chunk_size"),
    ],
)
def test_bad_inputs_raise(case, match):
    images, captions, mask = random_fragments()
    kwargs = {}
    if case == "all_padding":
        mask = mask.clone()
        mask[3] = 0
    elif case == "empty_images":
        images = images[:0]
    elif case == "empty_text":
        captions, mask = captions[:0], mask[:0]
    elif case == "nan_image":
        images = images.clone()
        images[1, 2, 3] = float("nan")
    elif case == "inf_text":
        captions = captions.clone()
        captions[0, 0, 0] = float("inf")
    elif case == "dim_mismatch":
        captions = captions[..., :4]
    elif case == "bad_rank":
        images = images[0]
    elif case == "mask_shape":
        mask = mask[:, :2]
    elif case == "direction":
        kwargs["direction"] = "x2y"
    elif case == "aggregation":
        kwargs["aggregation"] = "max"
    elif case == "mode":
        kwargs["threshold_mode"] = "naaf"
    elif case == "threshold":
        kwargs.update(threshold_mode="uarda", threshold=float("nan"))
    elif case == "lambda":
        kwargs["lambda_softmax"] = -1.0
    elif case == "chunk":
        kwargs["chunk_size"] = (0, 4)
    with pytest.raises(ValueError, match=match):
        cross_attention_scores(images, captions, mask, **kwargs)


def test_remote_code_imports_only_torch_and_stdlib():
    """cross_attention.py is copied into saved model folders: torch, tqdm and stdlib only, and
    only public torch APIs (a saved folder must keep loading on future torch releases)."""
    import ast

    source = (REPO / "src" / "hf_mvam" / "cross_attention.py").read_text()
    for private in ("torch.ops", "torch._", "mkldnn"):
        assert private not in source, private
    allowed = {"__future__", "functools", "math", "typing", "torch", "tqdm"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports needed"
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed, name


# ----------------------------------------------------------------------------------------------
# Benchmark smoke test
# ----------------------------------------------------------------------------------------------
def test_benchmark_tiny_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_uarda_scorer.py"), "--tiny",
         "--out-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| contender" in proc.stdout
    assert (tmp_path / "uarda_scorer.json").exists()
