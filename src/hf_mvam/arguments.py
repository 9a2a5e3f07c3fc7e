"""The command-line arguments of ``training/run.py``, as transformers' ``HfArgumentParser``
dataclasses: the model, the data and the training loop. Every value is checked here, so a bad one
stops the run before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from accelerate.utils import is_tensorboard_available
from transformers import HfArgumentParser

from . import MODEL_CLASSES

__all__ = ["DataArguments", "ModelArguments", "TrainingArguments", "config_options", "parse_arguments"]


def option(default, help: str):
    """A dataclass field with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArguments:
    model_type: Literal["mvam", "uarda"] = option(
        "mvam", "mvam (multi-view dual encoder) or uarda (cross attention, learned relevance threshold)."
    )
    num_views: int = option(4, "MVAM: view codes K per modality (1 = a plain CLIP-style dual encoder).")
    projection_dim: int = option(128, "MVAM: width of each view (the retrieval embedding is num_views times it).")
    diversity_weight: float = option(0.1, "MVAM: weight of the views' diversity loss.")
    embed_dim: int = option(128, "UARDA: width of the shared word and region fragment space.")
    vision_config: Optional[str] = option(
        None,
        "From-scratch vision backbone as JSON with a model_type, e.g. "
        '\'{"model_type": "clip_vision_model", "image_size": 32, ...}\' (default: the built-in 64 px ViT).',
    )
    text_config: Optional[str] = option(
        None,
        "From-scratch text backbone as JSON with a model_type (default: the built-in 2-layer BERT); "
        "its vocab_size follows the tokenizer trained on the training captions.",
    )
    vision_model_name_or_path: Optional[str] = option(
        None, "Pretrained vision backbone (Hub id or folder), whose image processor is used."
    )
    text_model_name_or_path: Optional[str] = option(
        None, "Pretrained text backbone (Hub id or folder), whose tokenizer is used."
    )
    threshold_mode: Literal["scan", "uarda"] = option(
        "uarda", "UARDA: learned relevance threshold (uarda) or SCAN's fixed zero threshold (scan)."
    )
    direction: Literal["t2i", "i2t", "both"] = option("t2i", "UARDA: cross-attention direction.")
    aggregation: Literal["lse", "mean"] = option("lse", "UARDA: pooling over the queries.")
    margin: float = option(
        0.2,
        "UARDA: margin of the triplet loss. Its negatives come from each "
        "process's own batch (they are not gathered across processes).",
    )
    max_violation: bool = option(
        False, "UARDA: only the hardest negative counts in the triplet loss (SCAN); default sums over all negatives."
    )

    def __post_init__(self):
        for name in ("vision_config", "text_config"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                parsed = json.loads(value) if isinstance(value, str) else value
            except json.JSONDecodeError as error:
                raise ValueError(f"--{name} is not valid JSON: {error}") from None
            if not isinstance(parsed, dict) or "model_type" not in parsed:
                raise ValueError(f"--{name} must be a JSON object with a 'model_type', got {value!r}")
            setattr(self, name, json.dumps(parsed))
        pretrained = (self.vision_model_name_or_path, self.text_model_name_or_path)
        if any(pretrained) and not all(pretrained):
            raise ValueError("--vision_model_name_or_path and --text_model_name_or_path go together")
        if any(pretrained) and (self.vision_config or self.text_config):
            raise ValueError("pass either pretrained backbones or --vision_config/--text_config, not both")
        model_class = MODEL_CLASSES[self.model_type][1]
        if any(pretrained) and not hasattr(model_class, "from_vision_text_pretrained"):
            raise ValueError(f"pretrained backbones are not supported for --model_type {self.model_type}")
        config_options(self)  # an option the model type does not take is an error now, not later


def config_options(model_args: ModelArguments) -> dict:
    """The model options that ``model_args.model_type``'s configuration class takes (by its
    signature), as keyword arguments. An option of another model type set to anything but its
    default is an error: it would be silently ignored."""
    config_class = MODEL_CLASSES[model_args.model_type][0]
    accepted = inspect.signature(config_class.__init__).parameters
    not_config = {"model_type", "vision_config", "text_config", "vision_model_name_or_path", "text_model_name_or_path"}
    options = {}
    for item in dataclasses.fields(model_args):
        if item.name in not_config:
            continue
        value = getattr(model_args, item.name)
        if item.name in accepted:
            options[item.name] = value
        elif value != item.default:
            raise ValueError(f"--{item.name} does not apply to --model_type {model_args.model_type}")
    return options


@dataclass
class DataArguments:
    data: Optional[str] = option(
        None,
        "Image–caption data: a save_to_disk folder, an image folder with metadata.jsonl/csv, a "
        "Karpathy split JSON, a SCAN feature folder or a Hub dataset id (default: the synthetic benchmark).",
    )
    image_root: Optional[str] = option(None, "Folder of the images a Karpathy JSON (or relative paths) names.")
    image_column: Optional[str] = option(None, "Image column (default: image, else the first Image column).")
    caption_column: Optional[str] = option(None, "Caption column (default: caption, captions, sentences, ...).")
    num_train_images: int = option(10_000, "Synthetic benchmark: training images.")
    num_validation_images: int = option(500, "Synthetic benchmark: validation images.")
    num_test_images: int = option(1_000, "Synthetic benchmark: test images (5 captions each).")
    all_pairs: bool = option(
        False, "Train on every (image, caption) pair instead of one random caption per image per epoch."
    )

    def __post_init__(self):
        for name in ("num_train_images", "num_validation_images", "num_test_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")

    def source(self) -> dict:
        """The arguments that say which data to load (everything but how it is sampled)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "all_pairs"}


@dataclass
class TrainingArguments:
    output_dir: str = option("outputs/demo", "The model folder to write (checkpoints go to its checkpoints/).")
    per_device_train_batch_size: int = option(
        128, "Pairs per process per step. MVAM takes its negatives from every process's batch."
    )
    per_device_eval_batch_size: int = option(256, "Images or captions per forward pass in evaluation.")
    learning_rate: float = option(5e-4, "Peak AdamW learning rate.")
    weight_decay: float = option(0.05, "AdamW weight decay (not on biases, norms and scalars).")
    warmup_steps: int = option(100, "Linear warm-up steps before the cosine decay.")
    num_train_epochs: int = option(8, "Epochs (unless --max_steps is given).")
    max_steps: int = option(-1, "Optimizer steps; replaces --num_train_epochs when > 0.")
    gradient_accumulation_steps: int = option(
        1, "Batches per optimizer step (the contrastive negatives still come from one batch)."
    )
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = option(
        None, "Autocast through accelerate (default: accelerate's config or launcher setting)."
    )
    seed: int = option(42, "Seed of the initialisation, the data order and the caption drawn per image.")
    eval_steps: int = option(250, "Evaluate on the validation split every N steps (the test split at the end).")
    save_steps: int = option(250, "Save a checkpoint every N steps and at the end.")
    save_total_limit: Optional[int] = option(2, "Keep only the newest N checkpoints.")
    resume_from_checkpoint: Optional[str] = option(
        None, "'latest' (the newest in OUTPUT_DIR/checkpoints, if there is one) or a checkpoint folder."
    )
    overwrite_output_dir: bool = option(
        False, "Delete the checkpoints in OUTPUT_DIR/checkpoints that this run would not continue "
        "(all of them on a fresh start) instead of refusing to start."
    )
    push_to_hub: bool = option(False, "Upload the model folder (without checkpoints) to --hub_model_id.")
    hub_model_id: Optional[str] = option(None, "Hub repository: 'name' or 'owner/name'.")
    hub_token: Optional[str] = option(None, "Hub token (default: the saved login or HF_TOKEN).")
    report_to: Optional[str] = option(
        None, "An accelerate tracker (tensorboard, wandb, ...) or none (default: tensorboard if installed)."
    )

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "eval_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.max_steps <= 0 and self.num_train_epochs < 1:
            raise ValueError("set --max_steps > 0 or --num_train_epochs >= 1")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("--warmup_steps and --weight_decay must be >= 0")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"--save_total_limit must be >= 1, got {self.save_total_limit}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        if self.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(self.resume_from_checkpoint):
            raise ValueError(
                f"--resume_from_checkpoint {self.resume_from_checkpoint} is neither 'latest' nor an existing folder"
            )
        if self.report_to is None:
            self.report_to = "tensorboard" if is_tensorboard_available() else "none"
        if self.report_to == "tensorboard" and not is_tensorboard_available():
            raise ValueError("--report_to tensorboard needs the tensorboard package")


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Flags, or a single .json/.yaml file of them. An invalid value exits with the parser's message."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            return parser.parse_json_file(argv[0])
        if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            return parser.parse_yaml_file(argv[0])
        return parser.parse_args_into_dataclasses(argv)
    except ValueError as error:
        parser.error(str(error))
