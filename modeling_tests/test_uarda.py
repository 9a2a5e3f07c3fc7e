"""UARDA: the learned threshold (Gaussian boundary, samples, estimator), the single-pair attention,
configuration, fragments, forward == scorer, saving/loading, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_TEXT, TINY_VISION, no_value_reads, run_fresh_python, tiny_text_config
from hf_mvam import UARDAConfig, UARDAModel, UARDAProcessor
from hf_mvam.builders import default_image_processor
from hf_mvam.cross_attention import cross_attention_scores
from hf_mvam.modeling_uarda import (
    RelevanceThreshold,
    UARDAImageEncoding,
    UARDATextEncoding,
    gaussian_boundary,
    relevance_samples,
    word_region_attention,
)
from test_cross_attention import LAM_SOFTMAX_UARDA, random_fragments


# ----------------------------------------------------------------------------------------------
# The learned threshold and the single-pair attention
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["scan", "uarda"])
def test_word_region_attention_is_the_scoring_attention(mode):
    images, captions, mask = random_fragments(seed=5)
    t = 0.15
    scores = cross_attention_scores(images, captions, mask, aggregation="mean",
                                    threshold_mode=mode, threshold=t)
    for i, c in [(0, 0), (2, 3), (4, 1)]:
        attn, relevant = word_region_attention(images[i], captions[c], mask[c],
                                               threshold_mode=mode, threshold=t)
        real = mask[c].bool()
        assert attn.shape == relevant.shape == (captions.shape[1], images.shape[1])
        assert torch.all(attn[~real] == 0) and not relevant[~real].any()
        sim = captions[c] @ images[i].T
        attended = relevant.any(dim=1)
        ctx = attn @ images[i]
        rel = torch.where(attended, (captions[c] * ctx).sum(1) / ctx.norm(dim=1).clamp(min=1e-8),
                          sim.max(dim=1).values - t)
        if mode == "uarda":  # plus the relevance-score branch, SCAN's attention at uarda's λ
            scan_attn, _ = word_region_attention(images[i], captions[c], mask[c],
                                                 lambda_softmax=LAM_SOFTMAX_UARDA["t2i"])
            rel = rel + (scan_attn * sim).sum(1)
        assert torch.allclose(rel[real].mean(), scores[i, c], atol=1e-10)
        if mode == "scan":
            assert relevant[real].all()
        assert torch.allclose(attn[attended].sum(1), torch.ones(int(attended.sum()),
                                                                dtype=attn.dtype))




def _normal_pdf(x, mu, sd):
    return math.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


def test_gaussian_boundary_closed_form():
    # Equal σ: N(t;μ+,σ) = α N(t;μ−,σ)  <=>  t = (μ+ + μ−)/2 + σ² ln α / (μ+ − μ−)
    t = gaussian_boundary(0.5, 0.1, 0.1, 0.1, alpha=2.0)
    assert abs(t - (0.3 + 0.01 * math.log(2.0) / 0.4)) < 1e-12  # 0.317329
    # Unequal σ (both signs of A): the density ratio equals α at t, between the means.
    for mu_p, sd_p, mu_n, sd_n in [(0.6, 0.15, 0.1, 0.05), (0.5, 0.05, 0.1, 0.12)]:
        t = gaussian_boundary(mu_p, sd_p, mu_n, sd_n, alpha=2.0)
        assert mu_n < t < mu_p
        ratio = _normal_pdf(t, mu_p, sd_p) / _normal_pdf(t, mu_n, sd_n)
        assert abs(ratio - 2.0) < 1e-9
    # Degenerate inputs fall back to the midpoint of the means.
    assert gaussian_boundary(0.5, 0.0, 0.1, 0.1) == pytest.approx(0.3)
    assert gaussian_boundary(0.5, float("nan"), 0.1, 0.1) == pytest.approx(0.3)
    # No real root (relevant distribution far wider and below): midpoint.
    assert gaussian_boundary(0.0, 0.01, 0.5, 0.5, alpha=1e6) == pytest.approx(0.25)


def test_threshold_recovers_boundary_from_samples():
    torch.manual_seed(0)
    est = RelevanceThreshold(min_samples=256, capacity=8192).train()
    assert float(est.threshold) == 0.0
    assert not est.update(0.5 + 0.1 * torch.randn(100), 0.1 + 0.1 * torch.randn(100))
    assert float(est.threshold) == 0.0  # not enough samples yet
    assert est.update(0.5 + 0.1 * torch.randn(8000), 0.1 + 0.1 * torch.randn(8000))
    expected = 0.3 + 0.01 * math.log(2.0) / 0.4
    assert abs(float(est.threshold) - expected) < 0.01
    assert abs(float(est.relevant_mean) - 0.5) < 0.01
    assert abs(float(est.irrelevant_std) - 0.1) < 0.01


def test_threshold_momentum_and_eval_mode():
    torch.manual_seed(1)
    est = RelevanceThreshold(min_samples=64, capacity=512).train()
    assert est.update(0.5 + 0.1 * torch.randn(512), 0.1 + 0.1 * torch.randn(512))
    first = float(est.threshold)
    assert first == pytest.approx(float(
        gaussian_boundary(est.relevant_mean, est.relevant_std, est.irrelevant_mean,
                          est.irrelevant_std)), abs=1e-6)  # first estimate taken directly
    # The ring buffer now only holds the new samples (capacity 512).
    rel, irr = 0.7 + 0.05 * torch.randn(512), 0.2 + 0.05 * torch.randn(512)
    assert est.update(rel, irr)
    second = float(gaussian_boundary(rel.double().mean(), rel.double().std(),
                                     irr.double().mean(), irr.double().std()))
    assert float(est.threshold) == pytest.approx(0.7 * second + 0.3 * first, abs=1e-6)
    assert int(est.num_updates) == 2
    # Eval mode: nothing moves, nothing is collected.
    est.eval()
    state = {k: v.clone() for k, v in est.state_dict().items()}
    assert not est.update(torch.ones(1000), -torch.ones(1000))
    for k, v in est.state_dict().items():
        assert torch.equal(v, state[k]) or (v.isnan().all() and state[k].isnan().all()), k
    # Buffers round-trip through a state dict.
    other = RelevanceThreshold(min_samples=64, capacity=512)
    other.load_state_dict(est.state_dict())
    assert float(other.threshold) == float(est.threshold)


def test_threshold_stays_in_range_for_extreme_inputs():
    est = RelevanceThreshold(min_samples=16, capacity=64).train()
    est.update(torch.full((64,), 50.0) + torch.randn(64), torch.full((64,), 40.0))  # σ− = 0
    assert -1.0 <= float(est.threshold) <= 1.0
    est = RelevanceThreshold(min_samples=16, capacity=64).train()
    est.update(-30.0 + torch.randn(64), -40.0 + 5 * torch.randn(64))
    assert float(est.threshold) == -1.0
    est.update(torch.tensor([float("nan"), float("inf")]), torch.tensor([float("nan")]))
    assert math.isfinite(float(est.threshold))


def test_relevance_samples():
    images, captions, mask = random_fragments(n_img=6, n_txt=6, seed=4)
    images, captions = images.float(), captions.float()
    # Make caption b strongly about image b.
    captions[:, :2] = F.normalize(images[:, :2] + 0.05 * captions[:, :2], dim=-1)
    scores = cross_attention_scores(images, captions, mask)
    rel_dense, irr_dense = relevance_samples(images, captions, mask, scores, negative="hardest")
    assert rel_dense.shape == irr_dense.shape == mask.shape  # [B, L], NaN where no sample
    assert torch.equal(rel_dense.isfinite(), mask.bool()) and torch.equal(irr_dense.isfinite(), mask.bool())
    rel, irr = rel_dense[mask.bool()], irr_dense[mask.bool()]  # the samples, caption by caption
    assert rel.shape == irr.shape == (int(mask.sum()),)
    assert rel.mean() > irr.mean()
    # Hardest negative of caption 0 = highest-scoring other image.
    neg0 = int(scores[1:, 0].argmax()) + 1
    n0 = int(mask[0].sum())
    expected = (captions[0, :n0] @ images[neg0].T).amax(dim=1)
    assert torch.allclose(irr[:n0], expected)
    rel_e, irr_e = relevance_samples(images, captions, mask, scores, negative="easiest",
                                     only_correct=True)
    rel_e = rel_e[rel_e.isfinite()]
    assert rel_e.numel() <= rel.numel()
    # A repeated image is never its own caption's negative.
    twin = images.clone()
    twin[1] = twin[0]
    positives = torch.eye(6, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True
    scores_twin = cross_attention_scores(twin, captions, mask)
    _, irr_twin = relevance_samples(twin, captions, mask, scores_twin, negative="hardest", positive_mask=positives)
    irr_twin = irr_twin[mask.bool()]
    neg0 = int(scores_twin[2:, 0].argmax()) + 2
    expected = (captions[0, :n0] @ twin[neg0].T).amax(dim=1)
    assert torch.allclose(irr_twin[:n0], expected)
    with pytest.raises(ValueError, match="square batch"):
        relevance_samples(images, captions[:5], mask[:5], scores[:, :5])




def test_threshold_does_not_move_while_irrelevant_outscore_relevant():
    estimator = RelevanceThreshold(min_samples=16, capacity=64).train()
    generator = torch.Generator().manual_seed(0)
    relevant = 0.2 + 0.1 * torch.randn(64, generator=generator)
    irrelevant = 0.4 + 0.1 * torch.randn(64, generator=generator)
    assert not estimator.update(relevant, irrelevant)
    assert estimator.threshold.item() == 0.0 and int(estimator.num_updates) == 0
    assert estimator.relevant_mean.item() < estimator.irrelevant_mean.item()  # still logged
    assert estimator.update(irrelevant + 0.5, relevant)  # once separated, it learns


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uarda_processor(tiny_tokenizer):
    return UARDAProcessor(image_processor=default_image_processor(32), tokenizer=tiny_tokenizer)


def tiny_uarda(tokenizer, **kwargs) -> UARDAModel:
    config = UARDAConfig(
        vision_config=TINY_VISION, text_config=tiny_text_config(tokenizer), embed_dim=16, threshold_min_samples=8, **kwargs
    )
    return UARDAModel(config).eval()


def images(n: int):
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in range(n)]


CAPTIONS4 = ["a red circle", "a small green star above a large yellow triangle", "a blue square", "an orange diamond"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"threshold_mode": "relu"}, "threshold_mode"),
        ({"direction": "up"}, "direction"),
        ({"aggregation": "max"}, "aggregation"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"margin": -0.1}, "margin"),
        ({"image_feature_dim": 0}, "image_feature_dim"),
        ({"lambda_softmax": 0.0}, "lambda_softmax"),
        ({"threshold_momentum": 0.0}, "threshold_momentum"),
        ({"initial_threshold": 2.0}, "initial_threshold"),
        ({"vision_config": {"model_type": "nope"}}, "vision_config"),
        ({"margin": "0.2"}, "margin"),
        ({"margin": float("inf")}, "margin"),
        ({"lambda_lse": float("inf")}, "lambda_lse"),
        ({"lambda_softmax": [9.0, 4.0]}, "lambda_softmax"),
        ({"threshold_alpha": None}, "threshold_alpha"),
        ({"initial_threshold": float("nan")}, "initial_threshold"),
        ({"max_violation": "no"}, "max_violation"),
        ({"threshold_min_samples": 10**9}, "threshold_min_samples"),
        ({"embed_dim": True}, "embed_dim"),
        ({"retrieval_threshold": 1.5}, "retrieval_threshold"),
        ({"retrieval_threshold": float("nan")}, "retrieval_threshold"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        UARDAConfig(**kwargs)


def test_config_round_trip(tmp_path):
    config = UARDAConfig(image_feature_dim=48, text_config={**TINY_TEXT, "vocab_size": 40}, threshold_mode="scan", direction="both")
    assert config.vision_config is None
    config.save_pretrained(tmp_path)
    loaded = UARDAConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict() and loaded.image_feature_dim == 48 and loaded.direction == "both"


@pytest.mark.parametrize("mode", ["scan", "uarda"])
def test_forward_equals_scorer_and_chunking(tiny_tokenizer, uarda_processor, mode):
    model = tiny_uarda(tiny_tokenizer, threshold_mode=mode, direction="both")
    model.relevance_threshold.threshold.fill_(0.05)
    batch = uarda_processor(text=CAPTIONS4[:3], images=images(2))
    with torch.no_grad():
        out = model(**batch)
        assert out.logits_per_image.shape == (2, 3)
        assert out.image_fragments.shape == (2, 16, 16)  # 4 x 4 grid regions (CLS dropped), D = 16
        torch.testing.assert_close(out.image_fragments.norm(dim=-1), torch.ones(2, 16))
        image_encoding = model.encode_images(batch["pixel_values"])
        text_encoding = model.encode_texts(batch["input_ids"], batch["attention_mask"])
        for budget in (512.0, 0.001):  # one chunk vs one pair per chunk
            torch.testing.assert_close(model.score(image_encoding, text_encoding, memory_budget_mb=budget), out.logits_per_image)
        # Training mode: forward and score agree too (dropout makes training-mode fragments
        # differ from eval mode's, so the comparison uses the forward's own fragments).
        model.train()
        train_out = model(**batch)
        torch.testing.assert_close(
            model.score(
                UARDAImageEncoding(image_fragments=train_out.image_fragments),
                UARDATextEncoding(text_fragments=train_out.text_fragments, text_mask=train_out.text_mask),
            ),
            train_out.logits_per_image,
        )


def test_eval_mode_skips_the_relevance_score_of_skipped_words(tiny_tokenizer, uarda_processor):
    """uarda mode: training mode scores a skipped word with SCAN's relevance score plus its
    penalty, eval mode (retrieval) with the penalty alone; live words score the same."""
    model = tiny_uarda(tiny_tokenizer, threshold_mode="uarda", aggregation="mean")
    batch = uarda_processor(text=CAPTIONS4, images=images(3))
    with torch.no_grad():
        image_encoding = model.encode_images(batch["pixel_values"])
        text_encoding = model.encode_texts(batch["input_ids"], batch["attention_mask"])
        regions = image_encoding.image_fragments  # [I, R, D]
        words, mask = text_encoding.text_fragments, text_encoding.text_mask  # [T, L, D], [T, L]
        sim = torch.einsum("tld,ird->itlr", words, regions)  # [I, T, L, R]
        best = sim.amax(-1)  # [I, T, L]
        model.relevance_threshold.threshold.fill_(float(best[:, mask].median()))
        eval_scores = model.eval().score(image_encoding, text_encoding)
        train_scores = model.train().score(image_encoding, text_encoding)
    skipped = (best <= model.relevance_threshold.threshold) & mask  # [I, T, L]
    assert 0 < skipped.sum() < mask.sum() * 3
    expected = torch.zeros_like(eval_scores)  # [I, T]: mean over real words of the skipped terms
    for i in range(3):
        for c in range(len(CAPTIONS4)):
            # SCAN's attention at uarda mode's λ: word_region_attention in scan mode
            scan_attn, _ = word_region_attention(regions[i], words[c], mask[c], lambda_softmax=20.0)
            relevance_score = (scan_attn * sim[i, c]).sum(-1)  # [L]
            expected[i, c] = relevance_score[skipped[i, c]].sum() / mask[c].sum()
    torch.testing.assert_close(train_scores - eval_scores, expected)


def test_precomputed_region_features(tiny_tokenizer, uarda_processor):
    model = tiny_uarda(tiny_tokenizer, image_feature_dim=24)
    assert model.vision_model is None
    text = uarda_processor(text=CAPTIONS4[:2])
    features = torch.randn(2, 36, 24)
    out = model(**text, image_features=features, return_loss=True)
    assert out.logits_per_image.shape == (2, 2) and out.loss.item() >= 0
    with pytest.raises(ValueError, match=r"\[batch, regions, 24\]"):
        model(**text, image_features=torch.randn(2, 36, 25))
    with pytest.raises(ValueError, match="not pixel_values"):
        model(**text, pixel_values=torch.zeros(2, 3, 32, 32))


def test_bad_inputs(tiny_tokenizer, uarda_processor):
    model = tiny_uarda(tiny_tokenizer)
    batch = uarda_processor(text=CAPTIONS4[:2], images=images(2))
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_features"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_features"):
        model(**batch, image_features=torch.zeros(2, 4, 32))
    with pytest.raises(ValueError, match="empty caption"):
        uarda_processor(text=["a red circle", ""])
    with pytest.raises(ValueError, match="paired inputs"):
        model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1], pixel_values=batch["pixel_values"], return_loss=True)
    max_length = model.config.text_config.max_position_embeddings
    too_long = torch.ones(2, max_length + 1, dtype=torch.long)
    with pytest.raises(ValueError, match=f"at most {max_length}"):
        model(input_ids=too_long, attention_mask=too_long, pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="integer token ids"):
        model(**{**batch, "input_ids": batch["input_ids"].float()})
    with pytest.raises(ValueError, match="attention_mask must be a tensor"):
        model(**{**batch, "attention_mask": batch["attention_mask"].tolist()})


def test_training_learns_threshold_and_lowers_loss(tiny_tokenizer, uarda_processor):
    model = tiny_uarda(tiny_tokenizer, threshold_mode="uarda").train()
    batch = uarda_processor(text=CAPTIONS4, images=images(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, moves = [], 0
    for _ in range(12):
        optimizer.zero_grad()
        used = model.relevance_threshold.threshold.clone()
        out = model(**batch, return_loss=True)
        assert torch.equal(out.threshold, used)  # the scores' threshold, not the updated one
        moves += not torch.equal(model.relevance_threshold.threshold, used)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    threshold = model.relevance_threshold
    assert moves > 0
    assert int(threshold.num_updates) > 0 and threshold.threshold.item() != 0.0
    assert -1 <= threshold.threshold.item() <= 1
    assert threshold.relevant_mean.item() > threshold.irrelevant_mean.item()
    assert losses[-1] < losses[0], losses
    # in eval mode the threshold stays where training left it
    model.eval()
    before = threshold.threshold.clone()
    model(**batch, return_loss=True)
    assert torch.equal(threshold.threshold, before)


def test_scan_mode_reports_the_zero_threshold_it_scores_with(tiny_tokenizer, uarda_processor):
    """scan mode's RelevanceThreshold still learns (for scoring the model in uarda mode later),
    but its outputs report SCAN's 0, which its scores used."""
    model = tiny_uarda(tiny_tokenizer, threshold_mode="scan").train()
    batch = uarda_processor(text=CAPTIONS4, images=images(4))
    model.relevance_threshold.threshold.fill_(0.3)  # as if learned
    assert model(**batch, return_loss=True).threshold.item() == 0.0
    assert model.eval()(**batch).threshold.item() == 0.0
    assert model.relevance_threshold.threshold.item() != 0.0  # kept for scoring in uarda mode


def test_uarda_skips_queries_below_threshold(tiny_tokenizer, uarda_processor):
    model = tiny_uarda(tiny_tokenizer, threshold_mode="uarda")
    batch = uarda_processor(text=CAPTIONS4, images=images(3))
    with torch.no_grad():
        image_encoding = model.encode_images(batch["pixel_values"])
        text_encoding = model.encode_texts(batch["input_ids"], batch["attention_mask"])
        regions, words, mask = image_encoding.image_fragments, text_encoding.text_fragments, text_encoding.text_mask
        best = torch.einsum("tld,ird->itlr", words, regions).amax(-1)  # [I, T, L] best region per word
        model.relevance_threshold.threshold.fill_(float(best[:, mask.bool()].median()))
        _, stats = model.score(image_encoding, text_encoding, return_stats=True)
    expected = (best[:, mask.bool()] <= model.relevance_threshold.threshold).float().mean().item()
    assert stats["t2i_skipped_fraction"] == pytest.approx(expected, abs=1e-6)
    assert 0.3 < stats["t2i_skipped_fraction"] < 0.7


def test_word_region_attention_map(tiny_tokenizer, uarda_processor):
    model = tiny_uarda(tiny_tokenizer, threshold_mode="uarda")
    model.relevance_threshold.threshold.fill_(0.0)
    batch = uarda_processor(text=CAPTIONS4[:1], images=images(1))
    regions = model.encode_images(batch["pixel_values"]).image_fragments[0]
    text = model.encode_texts(batch["input_ids"], batch["attention_mask"])
    words, mask = text.text_fragments, text.text_mask
    attention, relevant = model.word_region_attention(regions, words[0], mask[0])
    similarity = words[0] @ regions.t()
    assert attention.shape == relevant.shape == (words.shape[1], 16)
    assert torch.equal(relevant, similarity > 0)
    attended = relevant.any(-1)
    torch.testing.assert_close(attention[attended].sum(-1), torch.ones(int(attended.sum())))
    assert torch.all(attention[~relevant] == 0)


def test_save_load_keeps_threshold_and_fresh_process(tiny_tokenizer, uarda_processor, tmp_path):
    model = tiny_uarda(tiny_tokenizer, threshold_mode="uarda")
    model.relevance_threshold.threshold.fill_(0.123)
    model.save_pretrained(tmp_path / "model")
    uarda_processor.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_uarda.UARDAModel"
    loaded = UARDAModel.from_pretrained(tmp_path / "model").eval()
    assert loaded.relevance_threshold.threshold.item() == pytest.approx(0.123)
    batch = uarda_processor(text=CAPTIONS4[:2], images=images(2))
    with torch.no_grad():
        expected = model(**batch).logits_per_image
    torch.testing.assert_close(loaded(**batch).logits_per_image, expected, rtol=0, atol=1e-6)
    torch.save(dict(batch), tmp_path / "batch.pt")
    torch.save(expected, tmp_path / "expected.pt")
    out = run_fresh_python(
        """
        import torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained("model", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained("model", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules")
        with torch.no_grad():
            scores = model(**torch.load("batch.pt")).logits_per_image
        torch.testing.assert_close(scores, torch.load("expected.pt"), rtol=0, atol=1e-6)
        print(type(model).__name__, type(processor).__name__, round(model.relevance_threshold.threshold.item(), 3))
        """,
        cwd=tmp_path,
    )
    assert out.split() == ["UARDAModel", "UARDAProcessor", "0.123"]
    # The processor class itself loads the folder without transformers asking to run its
    # auto_map code (a prompt that blocks or fails in scripts).
    result = subprocess.run(
        [sys.executable, "-c", "from hf_mvam import UARDAProcessor; "
         "p = UARDAProcessor.from_pretrained('model'); print(p(text=['a red circle'])['input_ids'].shape[0])"],
        cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    # ... nor warns that the folder's model type is not the one being instantiated.
    assert "to instantiate a model of type" not in result.stdout + result.stderr
    assert result.stdout.split()[-1] == "1"


def test_triplet_loss_hand_computed():
    from hf_mvam.losses import triplet_loss

    scores = torch.tensor([[0.9, 0.8, 0.1], [0.3, 0.5, 0.6], [0.2, 0.4, 0.7]])  # image i matches caption i
    # hinge costs relu(0.2 + s_neg - s_pos): image rows (captions as negatives), caption columns (images)
    per_image = [[0.1, 0.0], [0.0, 0.3], [0.0, 0.0]]  # image 0: captions 1, 2; image 1: 0, 2; image 2: 0, 1
    per_caption = [[0.0, 0.0], [0.5, 0.1], [0.0, 0.1]]  # caption 0: images 1, 2; caption 1: 0, 2; caption 2: 0, 1
    hardest = sum(max(c) for c in per_image + per_caption) / 3
    summed = sum(sum(c) for c in per_image + per_caption) / 3
    assert triplet_loss(scores, 0.2, max_violation=True).item() == pytest.approx(hardest)
    assert triplet_loss(scores, 0.2, max_violation=False).item() == pytest.approx(summed)


@pytest.mark.parametrize("mode", ["scan", "uarda"])
@pytest.mark.parametrize("features", [False, True])
def test_training_steps_read_no_tensor_values(tiny_tokenizer, uarda_processor, mode, features):
    """Training forwards and backwards force no host sync, also once the threshold learns: the
    scorer plans its chunks from shapes and the threshold update is written in tensor ops."""
    model = tiny_uarda(tiny_tokenizer, threshold_mode=mode, direction="both", **({"image_feature_dim": 12} if features else {})).train()
    batch = uarda_processor(text=CAPTIONS4, images=images(4))
    if features:
        batch = {**batch, "image_features": torch.randn(4, 5, 12)}
        del batch["pixel_values"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with no_value_reads():
        for _ in range(4):  # 4 captions of >= 3 words a step: past min_samples = 8 from step 1
            optimizer.zero_grad()
            model(**batch, return_loss=True).loss.backward()
            optimizer.step()
    assert int(model.relevance_threshold.num_updates) > 0  # the update ran inside the guard


def test_retrieval_threshold_is_used_in_eval_mode_only(tiny_tokenizer, uarda_processor, tmp_path):
    """config.retrieval_threshold: eval mode scores (and reports, and draws) uarda mode at that
    threshold, as cross_attention_scores does when given it; training scores with the learned
    threshold, which the retrieval threshold never changes."""
    model = tiny_uarda(tiny_tokenizer, threshold_mode="uarda", direction="both", retrieval_threshold=0.2)
    model.relevance_threshold.threshold.fill_(0.05)
    batch = uarda_processor(text=CAPTIONS4, images=images(3))
    with torch.no_grad():
        image_encoding = model.encode_images(batch["pixel_values"])
        text_encoding = model.encode_texts(batch["input_ids"], batch["attention_mask"])
        fragments = (image_encoding.image_fragments, text_encoding.text_fragments, text_encoding.text_mask)

        def uarda_scores(threshold, skip, **kwargs):
            return cross_attention_scores(*fragments, direction="both", threshold_mode="uarda", threshold=threshold,
                                          skip_irrelevant_queries=skip, **kwargs)

        got, stats = model.score(image_encoding, text_encoding, return_stats=True)
        torch.testing.assert_close(got, uarda_scores(0.2, True), rtol=0, atol=0)
        assert not torch.allclose(got, uarda_scores(0.05, True))
        _, stats_learned = uarda_scores(0.05, True, return_stats=True)
        assert stats["t2i_skipped_fraction"] > stats_learned["t2i_skipped_fraction"]  # the trade: more skipped
        out = model(**batch)
        assert out.threshold.item() == pytest.approx(0.2)
        torch.testing.assert_close(out.logits_per_image, got)
        regions, words, mask = fragments[0][0], fragments[1][0], fragments[2][0]
        _, relevant = model.word_region_attention(regions, words, mask)
        assert torch.equal(relevant, (words @ regions.T > 0.2) & mask[:, None])
        # Training mode: the learned threshold, in the training form.
        model.train()
        torch.testing.assert_close(model.score(image_encoding, text_encoding), uarda_scores(0.05, False))
    assert model(**batch).threshold.item() == pytest.approx(0.05)
    assert model.relevance_threshold.threshold.item() == pytest.approx(0.05)  # untouched throughout
    model.eval().save_pretrained(tmp_path)
    loaded = UARDAModel.from_pretrained(tmp_path).eval()
    assert loaded.config.retrieval_threshold == 0.2 and loaded.scoring_threshold().item() == pytest.approx(0.2)


def test_scores_are_float32_under_autocast(tiny_tokenizer, uarda_processor):
    """score runs the attention in float32 whatever autocast does to the towers: on CUDA, autocast
    lowers the similarity product but keeps softmaxes and sums in float32, and the scorer's
    products of the two failed on mixed dtypes. The scores equal float32 scoring of the same
    fragments."""
    model = tiny_uarda(tiny_tokenizer, threshold_mode="uarda", direction="both")
    batch = uarda_processor(text=CAPTIONS4, images=images(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        image_encoding = model.encode_images(batch["pixel_values"])
        text_encoding = model.encode_texts(batch["input_ids"], batch["attention_mask"])
        low = type(image_encoding)(image_fragments=image_encoding.image_fragments.bfloat16())
        scores = model.score(low, text_encoding)
    assert scores.dtype == torch.float32
    with torch.no_grad():
        expected = model.score(type(image_encoding)(image_fragments=low.image_fragments.float()),
                               type(text_encoding)(text_fragments=text_encoding.text_fragments.float(),
                                                   text_mask=text_encoding.text_mask))
    torch.testing.assert_close(scores, expected)
