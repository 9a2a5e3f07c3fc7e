"""MVAM: configuration, multi-view pooling, losses, saving/loading, processor and pipeline."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TEXT, TINY_VISION, no_value_reads, run_fresh_python, tiny_text_config
from hf_mvam import MVAMConfig, MVAMModel, MVAMProcessor
from hf_mvam.losses import attention_overlap
from hf_mvam.modeling_mvam import MultiViewAttentionPooling


def tiny_model(tokenizer, **kwargs) -> MVAMModel:
    config = MVAMConfig(vision_config=TINY_VISION, text_config=tiny_text_config(tokenizer), projection_dim=16, **kwargs)
    return MVAMModel(config).eval()


def images(n: int):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


# --- configuration --------------------------------------------------------------------------------


def test_config_round_trip(tmp_path):
    config = MVAMConfig(vision_config=TINY_VISION, text_config={**TINY_TEXT, "vocab_size": 50}, num_views=3)
    again = MVAMConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert type(again.vision_config).__name__ == "CLIPVisionConfig" and again.vision_config.hidden_size == 32
    config.save_pretrained(tmp_path)
    loaded = MVAMConfig.from_pretrained(tmp_path)
    assert loaded.num_views == 3 and loaded.text_config.vocab_size == 50
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["model_type"] == "clip_vision_model"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_views": 0}, "num_views"),
        ({"num_views": 2.5}, "num_views"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"diversity_weight": -0.1}, "diversity_weight"),
        ({"diversity_weight": float("nan")}, "diversity_weight"),
        ({"diversity_weight": "0.1"}, "diversity_weight"),
        ({"diversity_weight": float("inf")}, "diversity_weight"),
        ({"logit_scale_init_value": None}, "logit_scale_init_value"),
        ({"initializer_range": 0.0}, "initializer_range"),
        ({"vision_config": {"model_type": "not-a-model"}}, "vision_config"),
        ({"text_config": {"hidden_size": 8}}, "text_config"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MVAMConfig(**kwargs)


# --- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_views", [1, 4])
def test_forward_shapes_and_unit_norm(tiny_tokenizer, mvam_processor, num_views):
    model = tiny_model(tiny_tokenizer, num_views=num_views)
    batch = mvam_processor(text=["a red circle", "a small green star above a large yellow triangle", "star"], images=images(2))
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # padding present
    out = model(**batch, output_attentions=True)
    width = num_views * 16
    assert out.image_embeds.shape == (2, width) and out.text_embeds.shape == (3, width)
    assert out.logits_per_image.shape == (2, 3) and torch.equal(out.logits_per_text, out.logits_per_image.t())
    assert out.image_view_embeds.shape == (2, num_views, 16)
    torch.testing.assert_close(out.image_view_embeds.norm(dim=-1), torch.ones(2, num_views))
    torch.testing.assert_close(out.text_view_embeds.norm(dim=-1), torch.ones(3, num_views))
    # the concatenated similarity is the mean of the per-view cosines
    per_view = torch.einsum("ikp,tkp->itk", out.image_view_embeds, out.text_view_embeds).mean(-1)
    torch.testing.assert_close(out.image_embeds @ out.text_embeds.t(), per_view)
    assert out.image_view_attentions.shape == (2, num_views, 17)  # 4 x 4 patches + CLS
    text_attention = out.text_view_attentions
    assert text_attention.shape == (3, num_views, batch["input_ids"].shape[1])
    assert torch.all(text_attention[batch["attention_mask"][:, None, :].expand_as(text_attention) == 0] == 0)
    torch.testing.assert_close(text_attention.sum(-1), torch.ones(3, num_views))


def test_padding_and_batch_invariance(tiny_tokenizer, mvam_processor):
    model = tiny_model(tiny_tokenizer)
    alone = mvam_processor(text=["a red circle"], images=images(1))
    batched = mvam_processor(text=["a red circle", "a small green star above a large yellow triangle"], images=images(2))
    with torch.no_grad():
        out_alone, out_batched = model(**alone), model(**batched)
    torch.testing.assert_close(out_alone.text_embeds[0], out_batched.text_embeds[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_alone.image_embeds[0], out_batched.image_embeds[0], atol=1e-5, rtol=1e-5)


def test_loss_parts_gradients_and_training_decreases_loss(tiny_tokenizer, mvam_processor):
    model = tiny_model(tiny_tokenizer, num_views=4, diversity_weight=0.5).train()
    batch = mvam_processor(text=["a red circle", "a small green star", "a blue square", "an orange diamond"], images=images(4))
    out = model(**batch, return_loss=True)
    torch.testing.assert_close(out.loss, out.contrastive_loss + 0.5 * out.diversity_loss)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not no_grad, f"parameters without gradient: {no_grad}"

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("features", [False, True])
def test_training_step_reads_no_tensor_values(tiny_tokenizer, mvam_processor, features):
    """A training forward and backward forces no host sync: value checks live where data enters."""
    model = tiny_model(tiny_tokenizer, num_views=2, **({"image_feature_dim": 12} if features else {})).train()
    batch = mvam_processor(text=["a red circle", "a small green star", "a blue square"], images=images(3))
    if features:
        batch = {**batch, "image_features": torch.randn(3, 5, 12)}
        del batch["pixel_values"]
    with no_value_reads():
        model(**batch, return_loss=True).loss.backward()
    with pytest.raises(AssertionError, match="read a value"), no_value_reads():
        _read_inside_hf_mvam()  # the guard catches hf_mvam's own reads ...
    with no_value_reads():
        torch.ones(()).item()  # ... and leaves everyone else's alone


def _read_inside_hf_mvam():
    """Call ``Tensor.item`` from a frame that lives in hf_mvam's source (its backbones module)."""
    from hf_mvam import backbones

    code = compile("torch.ones(()).item()", backbones.__file__, "eval")
    return eval(code, {"torch": torch})


def test_encodings_score_like_forward_and_image_features(tiny_tokenizer, mvam_processor):
    model = tiny_model(tiny_tokenizer, num_views=2)
    batch = mvam_processor(text=["a red circle", "a small green star", "a blue square"], images=images(2))
    with torch.no_grad():
        out = model(**batch)
        images_encoded = model.encode_images(batch["pixel_values"])
        texts_encoded = model.encode_texts(batch["input_ids"], batch["attention_mask"])
        for budget in (512.0, 1e-6):  # one chunk; one image row per chunk
            scores = model.score(images_encoded, texts_encoded, memory_budget_mb=budget)
            torch.testing.assert_close(scores * out.logit_scale, out.logits_per_image)
    regions = tiny_model(tiny_tokenizer, num_views=2, image_feature_dim=12)
    assert regions.vision_model is None and regions.config.vision_config is None
    encoded = regions.encode_images(image_features=torch.randn(2, 7, 12), output_attentions=True)
    assert encoded.pooler_output.shape == (2, 32) and encoded.view_attentions.shape == (2, 2, 7)
    with pytest.raises(ValueError, match=r"image_features must be \[batch, regions, 12\]"):
        regions.encode_images(image_features=torch.randn(2, 7, 13))
    with pytest.raises(ValueError, match="not pixel_values"):
        regions.encode_images(pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="image_feature_dim"):
        model.encode_images(image_features=torch.randn(2, 7, 12))


def test_single_view_without_diversity_is_plain_clip(tiny_tokenizer, mvam_processor):
    model = tiny_model(tiny_tokenizer, num_views=1, diversity_weight=0.0)
    batch = mvam_processor(text=["a red circle", "a blue square"], images=images(2))
    out = model(**batch, return_loss=True)
    assert out.diversity_loss.item() == 0.0
    logits = out.logits_per_image
    labels = torch.arange(2)
    expected = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.image_embeds, out.image_view_embeds[:, 0])


def test_return_dict_false_gives_tuple(tiny_tokenizer, mvam_processor):
    model = tiny_model(tiny_tokenizer)
    batch = mvam_processor(text=["a red circle"], images=images(1))
    as_tuple = model(**batch, return_dict=False)
    torch.testing.assert_close(as_tuple[0], model(**batch).logits_per_image)


# --- the diversity objective ----------------------------------------------------------------------


def test_attention_overlap_hand_built():
    disjoint = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]])
    identical = torch.tensor([[[0.25, 0.25, 0.25, 0.25]] * 3])
    half = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # cos = 0.5 / sqrt(0.5) = sqrt(0.5), squared = 0.5
    assert attention_overlap(disjoint).item() == pytest.approx(0.0, abs=1e-7)
    assert attention_overlap(identical).item() == pytest.approx(1.0)
    assert attention_overlap(half).item() == pytest.approx(0.5)
    # CAMERA's ||ÂᵀÂ - I||²_F over off-diagonal entries, / K(K-1), with unit-norm columns
    random = torch.rand(2, 4, 7).softmax(-1)
    unit = random / random.norm(dim=-1, keepdim=True)
    gram = unit @ unit.transpose(1, 2)
    camera = ((gram - torch.eye(4)) ** 2).sum((1, 2)) / 12
    torch.testing.assert_close(attention_overlap(random), camera)
    assert torch.all(attention_overlap(random) <= 1.0)


def test_diversity_weight_pushes_views_apart():
    torch.manual_seed(0)
    pooling = MultiViewAttentionPooling(hidden_size=16, num_views=4, projection_dim=8)
    states = torch.randn(8, 10, 16)
    before = attention_overlap(pooling(states)[1]).mean().item()
    optimizer = torch.optim.Adam(pooling.parameters(), lr=0.05)
    for _ in range(50):
        optimizer.zero_grad()
        attention_overlap(pooling(states)[1]).mean().backward()
        optimizer.step()
    assert attention_overlap(pooling(states)[1]).mean().item() < 0.5 * before


# --- saving and loading ---------------------------------------------------------------------------


def test_save_load_identical_and_safetensors(tiny_tokenizer, mvam_processor, tmp_path):
    model = tiny_model(tiny_tokenizer)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_mvam.MVAMModel"
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_mvam.MVAMModel"
    loaded = MVAMModel.from_pretrained(tmp_path).eval()
    batch = mvam_processor(text=["a red circle", "a blue square"], images=images(2))
    torch.testing.assert_close(loaded(**batch).logits_per_image, model(**batch).logits_per_image, rtol=0, atol=1e-6)


def test_auto_classes_in_fresh_process_without_hf_mvam(tiny_tokenizer, mvam_processor, tmp_path):
    model = tiny_model(tiny_tokenizer, num_views=2)
    model.save_pretrained(tmp_path / "model")
    mvam_processor.save_pretrained(tmp_path / "model")
    batch = mvam_processor(text=["a red circle", "a small green star"], images=images(2))
    torch.save(dict(batch), tmp_path / "batch.pt")
    torch.save(model(**batch).logits_per_image, tmp_path / "expected.pt")
    out = run_fresh_python(
        """
        import torch
        try:
            import hf_mvam
            raise SystemExit("hf_mvam should not be importable")
        except ImportError:
            pass
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained("model", trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained("model", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        batch = torch.load("batch.pt")
        torch.testing.assert_close(model(**batch).logits_per_image, torch.load("expected.pt"), rtol=0, atol=1e-6)
        from PIL import Image
        import numpy as np
        rng = np.random.default_rng(0)
        pics = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]
        again = processor(text=["a red circle", "a small green star"], images=pics)
        assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(again["pixel_values"], batch["pixel_values"])
        print(type(model).__name__, type(processor).__name__)
        """,
        cwd=tmp_path,
    )
    assert out.split() == ["MVAMModel", "MVAMProcessor"]


def test_zero_shot_pipeline(tiny_tokenizer, mvam_processor, tmp_path):
    from transformers import pipeline

    model = tiny_model(tiny_tokenizer)
    model.save_pretrained(tmp_path)
    mvam_processor.save_pretrained(tmp_path)
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path), trust_remote_code=True)
    labels = ["red circle", "blue square", "green star"]
    result = classifier(images(1)[0], candidate_labels=labels)
    assert sorted(r["label"] for r in result) == sorted(labels)
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)


def test_processor_round_trip_and_image_modes(mvam_processor, tmp_path):
    from transformers import AutoProcessor

    mvam_processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    rgb = Image.new("RGB", (50, 40), (200, 30, 30))
    path = tmp_path / "pic.png"
    rgb.save(path)
    inputs = [
        rgb,
        rgb.convert("L"),
        rgb.convert("RGBA"),
        rgb.convert("P"),
        np.asarray(rgb),
        np.asarray(rgb, dtype=np.float32) / 255,
        str(path),
        path.read_bytes(),
    ]
    batch = loaded(text=["a red circle"] * len(inputs), images=inputs)
    assert batch["pixel_values"].shape == (len(inputs), 3, 32, 32)
    reference = batch["pixel_values"][0]
    for i in (2, 4, 5, 6, 7):  # lossless conversions give the same pixels
        torch.testing.assert_close(batch["pixel_values"][i], reference, atol=1e-2, rtol=0)
    gray = batch["pixel_values"][1]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])  # grayscale -> 3 equal channels
    assert torch.equal(batch["input_ids"], mvam_processor(text=["a red circle"] * len(inputs))["input_ids"])


# --- bad input ------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(tiny_tokenizer, mvam_processor):
    model = tiny_model(tiny_tokenizer)
    batch = mvam_processor(text=["a red circle", "a blue square", "a star"], images=images(2))
    with pytest.raises(ValueError, match="paired inputs"):
        model(**batch, return_loss=True)
    with pytest.raises(ValueError, match="empty list"):
        mvam_processor(text=[], images=images(1))
    with pytest.raises(ValueError, match=r"text\[1\] is an empty caption"):
        mvam_processor(text=["a red circle", "  "])
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="expects 32 x 32"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"cannot read image images\[0\]"):
        mvam_processor(images=[b"\x89PNG\r\n\x1a\n this is not a png"])
    truncated = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated, format="PNG")
    with pytest.raises(ValueError, match="cannot read image"):
        mvam_processor(images=[truncated.getvalue()[:40]])
    with pytest.raises(ValueError, match="shape"):
        mvam_processor(images=[np.zeros((4, 4, 5), dtype=np.uint8)])


# --- other backbones ------------------------------------------------------------------------------


def test_convolutional_and_clip_text_backbones(tiny_tokenizer):
    resnet = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}
    clip_text = {
        "model_type": "clip_text_model",
        "vocab_size": len(tiny_tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 32,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "pad_token_id": 0,
    }
    model = MVAMModel(MVAMConfig(vision_config=resnet, text_config=clip_text, num_views=2, projection_dim=8)).eval()
    out = model(input_ids=torch.tensor([[2, 5, 6, 3]]), pixel_values=torch.randn(1, 3, 64, 64), output_attentions=True)
    assert out.image_view_attentions.shape == (1, 2, 64)  # 64 px / 8 -> 8 x 8 grid of conv features
    assert model.encode_images(torch.randn(1, 3, 64, 64)).grid_size == (8, 8)


@pytest.mark.parametrize("model_type, normalise_tokens", [("clip_vision_model", True), ("siglip_vision_model", False)])
def test_vision_token_states_get_the_final_layernorm_once(model_type, normalise_tokens):
    """CLIP's last_hidden_state precedes its post_layernorm (kept for the pooled token), so it is
    applied to every token; SigLIP's last_hidden_state has it already and must not get it twice."""
    from transformers import AutoConfig

    from hf_mvam.backbones import build_backbone, vision_token_states

    config = AutoConfig.for_model(model_type, image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2)
    backbone = build_backbone(config).eval()
    layernorm = getattr(backbone, "vision_model", backbone).post_layernorm
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        layernorm.weight.uniform_(0.5, 2.0)  # not the identity, so that twice differs from once
        layernorm.bias.uniform_(-1.0, 1.0)
        expected = backbone(pixel_values=pixels).last_hidden_state  # [2, T, 32]
        expected = layernorm(expected) if normalise_tokens else expected
        states, grid = vision_token_states(backbone, pixels)
    torch.testing.assert_close(states, expected)
    assert grid == (4, 4)


def test_from_vision_text_pretrained_offline(tiny_tokenizer, tmp_path):
    """The real loading code, pointed at tiny backbones saved to disk: a composite CLIP checkpoint
    (its vision tower is taken) and a plain BERT."""
    from transformers import BertConfig, BertModel, CLIPConfig, CLIPModel

    clip = CLIPModel(
        CLIPConfig(
            vision_config=TINY_VISION,
            text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 99},
            projection_dim=16,
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    bert = BertModel(BertConfig(**{k: v for k, v in tiny_text_config(tiny_tokenizer).items() if k != "model_type"}))
    bert.save_pretrained(tmp_path / "bert")
    model = MVAMModel.from_vision_text_pretrained(str(tmp_path / "clip"), str(tmp_path / "bert"), num_views=2)
    assert model.config.num_views == 2 and model.config.vision_config.model_type == "clip_vision_model"
    torch.testing.assert_close(
        model.vision_model.embeddings.patch_embedding.weight,
        clip.vision_model.embeddings.patch_embedding.weight,
    )
    torch.testing.assert_close(model.text_model.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    model.save_pretrained(tmp_path / "mvam")
    reloaded = MVAMModel.from_pretrained(tmp_path / "mvam")
    torch.testing.assert_close(reloaded.text_model.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    # config.json is uploaded: the towers' folders are named there, their local paths are not.
    saved = json.loads((tmp_path / "mvam" / "config.json").read_text())
    assert str(tmp_path) not in json.dumps(saved)
    assert saved["vision_config"]["_name_or_path"] == "clip" and saved["text_config"]["_name_or_path"] == "bert"


# --- a drop-in for CLIP users (issue 21) ----------------------------------------------------------


def test_features_and_forward_as_clipmodel_gives_them(tiny_tokenizer, mvam_processor):
    """get_*_features: pooler_output is the [N, config.embedding_dim] retrieval embedding, tuples
    with return_dict=False (index 1 is the embedding, as CLIP's), per-layer hidden states with
    output_hidden_states; forward adds the towers' outputs with output_hidden_states."""
    model = tiny_model(tiny_tokenizer, num_views=3)
    batch = mvam_processor(text=["a red circle", "a blue square left of a star"], images=images(2))
    image = model.get_image_features(pixel_values=batch["pixel_values"], output_hidden_states=True)
    text = model.get_text_features(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    assert model.config.embedding_dim == 3 * 16 == image.pooler_output.shape[1] == text.pooler_output.shape[1]
    assert len(image.hidden_states) == TINY_VISION["num_hidden_layers"] + 1 and image.last_hidden_state.shape == (2, 17, 32)
    assert len(text.hidden_states) == TINY_TEXT["num_hidden_layers"] + 1
    out = model(**batch)
    torch.testing.assert_close(image.pooler_output, out.image_embeds)
    torch.testing.assert_close(text.pooler_output, out.text_embeds)
    assert model.get_image_features(pixel_values=batch["pixel_values"]).hidden_states is None
    as_tuple = model.get_image_features(pixel_values=batch["pixel_values"], return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[1], out.image_embeds)
    torch.testing.assert_close(model.get_text_features(batch["input_ids"], batch["attention_mask"], return_dict=False)[1], out.text_embeds)

    full = model(**batch, output_hidden_states=True)
    assert out.vision_model_output is None and out.text_model_output is None
    torch.testing.assert_close(full.vision_model_output.last_hidden_state, image.last_hidden_state)
    torch.testing.assert_close(full.text_model_output.hidden_states[-1], text.hidden_states[-1])
    flat = model(**batch, output_hidden_states=True, return_dict=False)
    assert isinstance(flat[-1], tuple) and isinstance(flat[-2], tuple)  # the towers' outputs as tuples, as CLIPOutput
    torch.testing.assert_close(flat[0], out.logits_per_image)


def test_embedding_dim_is_stated_in_the_config(tmp_path):
    config = MVAMConfig(vision_config=TINY_VISION, text_config={**TINY_TEXT, "vocab_size": 50}, num_views=4, projection_dim=32)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["embedding_dim"] == 128
    assert MVAMConfig.from_pretrained(tmp_path).embedding_dim == 128
    with pytest.raises(ValueError, match=r"embedding_dim is num_views \* projection_dim = 128, got 64"):
        MVAMConfig(num_views=4, projection_dim=32, embedding_dim=64)


def test_sdpa_and_eager_attention_reach_the_towers_and_agree(tiny_tokenizer, mvam_processor, tmp_path):
    model = tiny_model(tiny_tokenizer)
    model.save_pretrained(tmp_path)
    batch = mvam_processor(text=["a red circle", "a blue square"], images=images(2))
    logits = {}
    for implementation in ("sdpa", "eager"):
        loaded = MVAMModel.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert loaded.text_model.config._attn_implementation == implementation
        assert loaded.vision_model.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = loaded(**batch).logits_per_image
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_reaches_the_towers_and_keeps_the_gradients(tiny_tokenizer, mvam_processor):
    from hf_mvam.backbones import enable_gradient_checkpointing

    config = MVAMConfig(vision_config={**TINY_VISION, "attention_dropout": 0.0},
                        text_config={**tiny_text_config(tiny_tokenizer), "hidden_dropout_prob": 0.0,
                                     "attention_probs_dropout_prob": 0.0}, projection_dim=16)
    plain = MVAMModel(config).train()
    checkpointed = MVAMModel(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert enable_gradient_checkpointing(checkpointed) == ["vision_model", "text_model"]
    assert any(getattr(module, "gradient_checkpointing", False) for module in checkpointed.text_model.modules())
    batch = mvam_processor(text=CAPTIONS_FOR_GC, images=images(3))
    for model in (plain, checkpointed):
        model(**batch, return_loss=True).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    fresh = MVAMModel(config)
    fresh.gradient_checkpointing_enable()  # as on a CLIPModel
    assert any(getattr(module, "gradient_checkpointing", False) for module in fresh.vision_model.modules())


CAPTIONS_FOR_GC = ["a red circle", "a blue square above a star", "two green crosses"]


def test_freezing_a_tower_keeps_its_last_blocks_and_final_norm_trainable():
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel

    from hf_mvam.backbones import freeze_backbone

    vision = CLIPVisionModel(CLIPVisionConfig(**{**{k: v for k, v in TINY_VISION.items() if k != "model_type"}, "num_hidden_layers": 3}))
    freeze_backbone(vision, 1)
    trainable = {name for name, p in vision.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in vision.named_parameters()
                         if name.startswith(("encoder.layers.2.", "post_layernorm."))}, sorted(trainable)
    text_config = {**{k: v for k, v in TINY_TEXT.items() if k != "model_type"}, "num_hidden_layers": 2, "vocab_size": 50}
    text = BertModel(BertConfig(**text_config), add_pooling_layer=False)
    freeze_backbone(text, 0)
    assert not any(p.requires_grad for p in text.parameters())
    freeze_backbone(text, 2)
    assert {n.split(".")[0] for n, p in text.named_parameters() if p.requires_grad} == {"encoder"}
    with pytest.raises(ValueError, match="has 2 blocks: cannot keep 3 trainable"):
        freeze_backbone(text, 3)
