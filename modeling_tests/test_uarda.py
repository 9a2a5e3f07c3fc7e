"""UARDA: configuration, fragments, forward == scorer, the learned threshold, saving/loading, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TEXT, TINY_VISION, run_fresh_python, tiny_text_config
from hf_mvam import UARDAConfig, UARDAModel, UARDAProcessor
from hf_mvam.modeling_uarda import UARDAImageEncoding, UARDATextEncoding
from hf_mvam.builders import default_image_processor
from hf_mvam.cross_attention import word_region_attention


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
