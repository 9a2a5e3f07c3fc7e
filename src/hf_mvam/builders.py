"""Building a from-scratch model and its processor from training captions (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import CLIPImageProcessorPil

from .backbones import DEFAULT_TEXT_CONFIG, DEFAULT_VISION_CONFIG
from .tokenization import train_caption_tokenizer

# Mean/std of the synthetic benchmark are unknown in advance; 0.5/0.5 maps [0, 1] to [-1, 1].
_MEAN_STD = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def default_image_processor(image_size: int = DEFAULT_VISION_CONFIG["image_size"]) -> CLIPImageProcessorPil:
    """Resize the shorter side to ``image_size``, centre-crop to a square, scale and normalise.
    The PIL-backed class, because there is no CPU torchvision here."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, **_MEAN_STD
    )


def default_processor(processor_class, captions: Iterable[str], image_size: int = DEFAULT_VISION_CONFIG["image_size"]):
    """``processor_class`` (MVAMProcessor or UARDAProcessor) with a tokenizer trained on ``captions``."""
    tokenizer = train_caption_tokenizer(captions, model_max_length=DEFAULT_TEXT_CONFIG["max_position_embeddings"])
    return processor_class(image_processor=default_image_processor(image_size), tokenizer=tokenizer)


def default_text_config(vocab_size: int) -> dict:
    """The built-in text tower sized to a trained tokenizer's vocabulary."""
    return {**DEFAULT_TEXT_CONFIG, "vocab_size": vocab_size}
