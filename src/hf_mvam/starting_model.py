"""The model and processor a run of ``training/run.py`` starts from: from scratch (a tokenizer
trained on the training captions), on pretrained backbones (either or both; for UARDA too), or a
trained hf-mvam model to fine-tune (``--model_name_or_path``); then frozen or checkpointed towers.

Errors are ``ValueError``/``OSError`` with a message for the script's one-line error.
"""

from __future__ import annotations

import json

from accelerate.utils import broadcast_object_list
from transformers import AutoImageProcessor, AutoTokenizer

from . import MODEL_CLASSES
from .arguments import config_options, one_line
from .backbones import (
    DEFAULT_TEXT_CONFIG, DEFAULT_VISION_CONFIG, enable_gradient_checkpointing, freeze_backbone,
    from_vision_text_pretrained,
)
from .builders import default_image_processor, default_processor, default_text_config
from .checkpointing import PROCESSOR_DIR
from .data.collate import flatten_captions

__all__ = ["build_model", "build_processor", "prepare_towers"]


def build_processor(model_args, train_split, accelerator, checkpoint=None):
    """A resumed run's processor comes from its checkpoint, a fine-tuned model's from its folder.
    Otherwise the main process builds it (a pretrained backbone's tokenizer or image processor,
    else a tokenizer trained on the training captions and the default image processor) and sends
    it to the other processes, so that every process tokenises alike."""
    processor_class = MODEL_CLASSES[model_args.model_type][2]
    if checkpoint is not None:
        return processor_class.from_pretrained(checkpoint / PROCESSOR_DIR)
    if model_args.model_name_or_path:
        return _loaded(model_args.model_name_or_path, processor_class.from_pretrained, model_args.model_name_or_path)
    processor = None
    if accelerator.is_main_process:
        vision, text = model_args.vision_model_name_or_path, model_args.text_model_name_or_path
        vision_config = json.loads(model_args.vision_config or "{}")
        image_size = vision_config.get("image_size", DEFAULT_VISION_CONFIG["image_size"])  # e.g. a ResNet has none
        if text:
            tokenizer = _loaded(text, AutoTokenizer.from_pretrained, text)
            processor = processor_class(image_processor=default_image_processor(image_size), tokenizer=tokenizer)
        else:
            if not hasattr(train_split, "column_names"):
                raise ValueError("--streaming cannot train a caption tokenizer on the whole training split: "
                                 "pass --text_model_name_or_path or --model_name_or_path")
            processor = default_processor(processor_class, flatten_captions(train_split)[0], image_size=image_size)
            text_config = {**DEFAULT_TEXT_CONFIG, **json.loads(model_args.text_config or "{}")}
            if "max_position_embeddings" in text_config:  # captions must fit the text tower's positions
                tokenizer = processor.tokenizer
                tokenizer.model_max_length = min(tokenizer.model_max_length, text_config["max_position_embeddings"])
        if vision:
            processor.image_processor = _loaded(vision, AutoImageProcessor.from_pretrained, vision)
    return broadcast_object_list([processor])[0]


def build_model(model_args, processor, train_split):
    """The model to train: ``--model_name_or_path`` with the options given applied to its config
    (an option that changes a weight's shape is refused), or a new model on pretrained and/or
    from-scratch backbones, the text tower sized to a trained tokenizer; on precomputed region
    features when the data has them."""
    config_class, model_class, _ = MODEL_CLASSES[model_args.model_type]
    options = config_options(model_args)
    feature_dim = None
    if "image_features" in getattr(train_split, "column_names", ()):
        feature_dim = int(train_split.with_format("numpy")[0]["image_features"].shape[-1])
    if model_args.model_name_or_path:
        model = _fine_tuned(model_class, model_args.model_name_or_path, options)
        if model.config.image_feature_dim != feature_dim:
            takes = f"image_features of width {model.config.image_feature_dim}" if model.config.image_feature_dim else "pixels"
            gives = f"image_features of width {feature_dim}" if feature_dim else "images"
            raise ValueError(f"--model_name_or_path {model_args.model_name_or_path} takes {takes}, but the data has {gives}")
        return model
    if feature_dim is not None:
        if model_args.vision_model_name_or_path or model_args.vision_config:
            raise ValueError("this data has precomputed image_features: a vision backbone would go unused")
        options["image_feature_dim"] = feature_dim
    elif model_args.vision_config:
        options["vision_config"] = json.loads(model_args.vision_config)
    if not model_args.text_model_name_or_path:
        vocab_size = len(processor.tokenizer)
        options["text_config"] = {**default_text_config(vocab_size), **json.loads(model_args.text_config or "{}"),
                                  "vocab_size": vocab_size}
    pretrained = model_args.vision_model_name_or_path, model_args.text_model_name_or_path
    model = _loaded(" and ".join(filter(None, pretrained)) or "the model", from_vision_text_pretrained, model_class,
                    *pretrained, **options)
    vocab_size = model.config.text_config.vocab_size
    if len(processor.tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(processor.tokenizer)} tokens but the text backbone embeds only {vocab_size}")
    return model


def prepare_towers(model, model_args, train_args) -> None:
    """Freeze the towers asked for (keeping their last blocks trainable as asked) and turn on
    gradient checkpointing in the towers that support it."""
    for side in ("vision", "text"):
        tower = getattr(model, f"{side}_model", None)
        if getattr(model_args, f"freeze_{side}_model"):
            if tower is None:
                raise ValueError(f"--freeze_{side}_model: this model has no {side} backbone (precomputed features)")
            freeze_backbone(tower, getattr(model_args, f"unfrozen_{side}_layers"))
    if train_args.gradient_checkpointing and not enable_gradient_checkpointing(model):
        raise ValueError("--gradient_checkpointing: neither backbone of this model supports it")


def _fine_tuned(model_class, name_or_path: str, options: dict):
    """A trained model with ``options`` applied to its configuration; refused when they change the
    shape of a weight (e.g. another --num_views)."""
    try:
        return _loaded(name_or_path, model_class.from_pretrained, name_or_path, **options)
    except RuntimeError as error:  # transformers: mismatched sizes with ignore_mismatched_sizes=False
        if "mismatch" not in str(error):
            raise
        given = ", ".join(f"--{k} {v}" for k, v in options.items())
        raise ValueError(f"{given} changes the shape of weights of --model_name_or_path {name_or_path}: "
                         "options that size the model come from it") from None


def _loaded(what: str, load, *args, **kwargs):
    """``load(*args, **kwargs)`` with a failure to reach or read a Hub id or folder as a one-line
    ``OSError`` naming ``what`` (transformers raises OSError, httpx and Hub errors)."""
    try:
        return load(*args, **kwargs)
    except (ValueError, RuntimeError):
        raise
    except Exception as error:  # connection and Hub errors come in many types
        raise OSError(f"cannot load {what}: {one_line(error)}") from None
