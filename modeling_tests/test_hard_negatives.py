"""NegCLIP-style hard negative captions: one detail changed, deterministic per caption."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from hf_mvam.data.hard_negatives import HardNegativeGenerator
from training_runs import FAST, SYNTHETIC, TINY, TINY_UARDA, synthetic_cache, train  # noqa: F401 (a fixture)

CAPTIONS = [
    "A small red circle is left of a large blue square.",
    "There are two shapes: a green star above a yellow triangle",
    "the image shows a big pink diamond",
    "something else entirely",
]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_every_negative_differs_in_one_edit_and_is_deterministic():
    generator = HardNegativeGenerator(CAPTIONS, seed=3)
    for caption in CAPTIONS:
        negative = generator(caption)
        assert negative != caption
        assert negative == HardNegativeGenerator(CAPTIONS, seed=3)(caption)  # same caption, same seed
        before, after = words(caption), words(negative)
        if sorted(before) == sorted(after):  # a swap or a shuffle: the bag of words is kept
            continue
        changed = [(b, a) for b, a in zip(before, after) if b != a]
        assert len(before) == len(after) and len(changed) == 1, (caption, negative)


def test_relation_words_flip_to_their_opposite():
    generator = HardNegativeGenerator(["the star is left of the circle"], word_classes={})
    assert generator("the star is left of the circle") == "the star is right of the circle"
    assert HardNegativeGenerator(["a is above b"], word_classes={})("a is above b") == "a is below b"


def test_replacements_come_from_the_training_captions_class_words():
    colours = {"colour": ["red", "blue", "green"]}  # green never occurs: never used
    generator = HardNegativeGenerator(["a red circle", "a blue circle"], word_classes=colours)
    assert generator("a red circle") == "a blue circle"
    assert HardNegativeGenerator(["Red circles", "blue"], word_classes=colours)("Red circles") == "Blue circles"


def test_swap_exchanges_two_words_of_a_class():
    caption = "a red circle and a blue circle"
    negatives = {HardNegativeGenerator([caption], seed=s, word_classes={"colour": ["red", "blue"]})(caption) for s in range(20)}
    assert "a blue circle and a red circle" in negatives  # the binding swap
    assert negatives <= {"a blue circle and a red circle", "a blue circle and a blue circle", "a red circle and a red circle"}


def test_sizes_change_group_never_to_a_synonym():
    captions = ["a small star", "a little star", "a large star"]
    for seed in range(10):
        assert HardNegativeGenerator(captions, seed=seed)("a small star") == "a large star"


def test_a_caption_without_class_words_is_shuffled():
    negative = HardNegativeGenerator(CAPTIONS)("something else entirely")
    assert negative != "something else entirely"
    assert sorted(negative.split()) == sorted("something else entirely".split())


def test_the_collator_adds_each_pairs_negative(mvam_processor):
    import numpy as np

    from hf_mvam.data.collate import ImageCaptionCollator

    generator = HardNegativeGenerator(CAPTIONS)
    pairs = [{"image_features": np.zeros((3, 4), np.float32), "caption": caption} for caption in CAPTIONS[:3]]
    batch = ImageCaptionCollator(mvam_processor, hard_negatives=generator)(pairs)
    expected = mvam_processor(text=[generator(caption) for caption in CAPTIONS[:3]])
    assert torch.equal(batch["negative_input_ids"], expected["input_ids"])
    assert torch.equal(batch["negative_attention_mask"], expected["attention_mask"])
    assert batch["input_ids"].shape[0] == batch["negative_input_ids"].shape[0] == 3
    assert "negative_input_ids" not in ImageCaptionCollator(mvam_processor)(pairs)


def test_mvam_takes_hard_negatives_as_extra_caption_negatives(tiny_tokenizer, mvam_processor):
    from conftest import TINY_VISION, tiny_text_config
    from hf_mvam import MVAMConfig, MVAMModel
    from hf_mvam.losses import contrastive_loss

    model = MVAMModel(MVAMConfig(vision_config=TINY_VISION, text_config=tiny_text_config(tiny_tokenizer),
                                 projection_dim=8, num_views=2, diversity_weight=0.0)).eval()
    captions = ["a red circle left of a blue square", "a small green star", "a blue square"]
    generator = HardNegativeGenerator(captions)
    batch = mvam_processor(text=captions, images=[np.zeros((32, 32, 3), np.uint8) + 60 * i for i in range(3)])
    negatives = mvam_processor(text=[generator(c) for c in captions])
    out = model(**batch, negative_input_ids=negatives["input_ids"], negative_attention_mask=negatives["attention_mask"],
                return_loss=True)
    negative_embeds = model.encode_texts(negatives["input_ids"], negatives["attention_mask"]).pooler_output
    expected = contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale, negative_text_embeds=negative_embeds)
    torch.testing.assert_close(out.loss, expected)
    assert out.logits_per_image.shape == (3, 3)  # negatives are training-only columns
    assert not torch.allclose(out.loss, model(**batch, return_loss=True).loss)


def test_uarda_takes_hard_negatives_as_extra_caption_negatives(tiny_tokenizer):
    """The triplet loss with hard negatives, against a hinge written out pair by pair: every
    image's hardest caption negative is the harder of the in-batch captions and the hard negatives;
    each caption's hardest image is unchanged (hard negatives are never queries)."""
    from test_uarda import images, tiny_uarda

    from hf_mvam import UARDAProcessor
    from hf_mvam.builders import default_image_processor

    processor = UARDAProcessor(image_processor=default_image_processor(32), tokenizer=tiny_tokenizer)
    model = tiny_uarda(tiny_tokenizer, threshold_mode="uarda", max_violation=True).eval()
    captions = ["a red circle left of a blue square", "a small green star", "a blue square", "a big pink diamond"]
    generator = HardNegativeGenerator(captions)
    batch = processor(text=captions, images=images(4))
    negatives = processor(text=[generator(c) for c in captions])
    with torch.no_grad():
        out = model(**batch, negative_input_ids=negatives["input_ids"],
                    negative_attention_mask=negatives["attention_mask"], return_loss=True)
        encoded_images = model.encode_images(batch["pixel_values"])
        s = model.score(encoded_images, model.encode_texts(batch["input_ids"], batch["attention_mask"]))
        n = model.score(encoded_images, model.encode_texts(negatives["input_ids"], negatives["attention_mask"]))
    margin, size = model.config.margin, len(captions)
    expected = 0.0
    for i in range(size):
        text_costs = [max(0.0, margin + float(s[i, j] - s[i, i])) for j in range(size) if j != i]
        text_costs += [max(0.0, margin + float(n[i, j] - s[i, i])) for j in range(size)]
        image_costs = [max(0.0, margin + float(s[j, i] - s[i, i])) for j in range(size) if j != i]
        expected += (max(text_costs) + max(image_costs)) / size
    assert abs(float(out.loss) - expected) < 1e-5
    assert out.logits_per_image.shape == (4, 4)  # negatives are training-only columns
    with torch.no_grad():
        assert float(out.loss) != float(model(**batch, return_loss=True).loss)


@pytest.mark.parametrize("model_type", ["mvam", "uarda"])
def test_training_with_hard_negatives_passes_one_per_caption(model_type, tmp_path, monkeypatch):
    """run.py --hard_negatives: every training forward of either model gets one hard negative per
    caption, a different caption of the same batch size; without the flag, none."""
    import hf_mvam

    model_class = hf_mvam.MODEL_CLASSES[model_type][1]
    forward, seen = model_class.forward, []

    def spy(self, *args, **kwargs):
        if kwargs.get("return_loss"):
            seen.append((kwargs["input_ids"], kwargs.get("negative_input_ids")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(model_class, "forward", spy)
    tiny = TINY if model_type == "mvam" else TINY_UARDA
    train("--output_dir", tmp_path / "with", "--model_type", model_type, "--hard_negatives", *tiny, *SYNTHETIC, *FAST)
    assert len(seen) == 4  # --max_steps 4
    for captions, negatives in seen:
        assert negatives is not None and negatives.shape[0] == captions.shape[0] == 8
        assert not torch.equal(negatives[:, : captions.shape[1]], captions[:, : negatives.shape[1]])
    seen.clear()
    train("--output_dir", tmp_path / "without", "--model_type", model_type, *tiny, *SYNTHETIC, *FAST)
    assert len(seen) == 4 and all(negatives is None for _, negatives in seen)
