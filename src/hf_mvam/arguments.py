"""The command-line arguments of ``training/run.py``, as transformers' ``HfArgumentParser``
dataclasses: the model, the data and the training loop (names as in transformers'
``TrainingArguments`` and ``run_clip.py`` where one exists). Every value is checked here, so a bad
one stops the run before anything is loaded; :func:`check_run_setting` adds the checks that need
to know the processes the run has.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from huggingface_hub.utils import validate_repo_id
from transformers import HfArgumentParser, PretrainedConfig

from . import MODEL_CLASSES

__all__ = [
    "DataArguments", "ModelArguments", "TrainingArguments", "check_run_setting", "config_options", "is_local_path",
    "parse_arguments", "recorded_arguments",
]

# transformers.get_scheduler names that need nothing beyond warm-up and total steps.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
OPTIONS_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def option(default, help: str):
    """A dataclass field with its --help text."""
    return field(default=default, metadata={"help": help})


def is_local_path(value) -> bool:
    """A string that names a file or folder here (rather than a Hub id or a plain value)."""
    return isinstance(value, str) and (os.path.isabs(value) or os.path.exists(value))


@dataclass
class ModelArguments:
    model_type: Optional[Literal["mvam", "uarda"]] = option(
        None, "mvam (multi-view dual encoder) or uarda (cross attention, learned relevance threshold); "
        "default mvam, or the type of --model_name_or_path."
    )
    model_name_or_path: Optional[str] = option(
        None, "Fine-tune a trained hf-mvam model (MVAM or UARDA): a folder written by this script or a Hub id; "
        "its processor comes with it."
    )
    # Model options: None leaves the configuration class's default (or the loaded model's value).
    num_views: Optional[int] = option(None, "MVAM: view codes K per modality (default 4; 1 = a plain CLIP-style dual encoder).")
    projection_dim: Optional[int] = option(
        None, "MVAM: width of each view (default 128); the retrieval embedding, config.embedding_dim, is num_views times it."
    )
    diversity_weight: Optional[float] = option(None, "MVAM: weight of the views' diversity loss (default 0.1).")
    embed_dim: Optional[int] = option(None, "UARDA: width of the shared word and region fragment space (default 128).")
    threshold_mode: Optional[Literal["scan", "uarda"]] = option(
        None, "UARDA: learned relevance threshold (uarda, the default) or SCAN's fixed zero threshold (scan)."
    )
    direction: Optional[Literal["t2i", "i2t", "both"]] = option(None, "UARDA: cross-attention direction (default t2i).")
    aggregation: Optional[Literal["lse", "mean"]] = option(None, "UARDA: pooling over the queries (default lse).")
    margin: Optional[float] = option(
        None, "UARDA: margin of the triplet loss (default 0.2). Its negatives come from each process's own batch "
        "(they are not gathered across processes).",
    )
    max_violation: Optional[bool] = option(
        None, "UARDA: only the hardest negative counts in the triplet loss (SCAN); default sums over all negatives."
    )
    # Backbones: from scratch (configs) or pretrained.
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
        None, "Pretrained vision backbone (Hub id or folder; composite CLIP-like checkpoints give their vision "
        "tower), whose image processor is used. UARDA takes its patch or grid tokens as the regions."
    )
    text_model_name_or_path: Optional[str] = option(
        None, "Pretrained text backbone (Hub id or folder), whose tokenizer is used. Either backbone may be "
        "pretrained alone: e.g. a BERT with precomputed region features (UARDA, as the SCAN family trains)."
    )
    freeze_vision_model: bool = option(False, "Train no weight of the vision backbone (as run_clip.py).")
    freeze_text_model: bool = option(False, "Train no weight of the text backbone (as run_clip.py).")
    unfrozen_vision_layers: int = option(
        0, "With --freeze_vision_model: keep the last N blocks (and the norm after them) trainable, as open_clip's "
        "--lock-image-unlocked-groups."
    )
    unfrozen_text_layers: int = option(0, "With --freeze_text_model: keep the last N blocks trainable.")

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
        for side in ("vision", "text"):
            if getattr(self, f"unfrozen_{side}_layers") < 0:
                raise ValueError(f"--unfrozen_{side}_layers must be >= 0")
            if getattr(self, f"unfrozen_{side}_layers") and not getattr(self, f"freeze_{side}_model"):
                raise ValueError(f"--unfrozen_{side}_layers applies to a frozen tower: add --freeze_{side}_model")
            if getattr(self, f"{side}_model_name_or_path") and getattr(self, f"{side}_config"):
                raise ValueError(f"pass either --{side}_model_name_or_path or --{side}_config, not both")
        if self.model_name_or_path is not None:
            backbones = [f"--{name}" for name in ("vision_config", "text_config", "vision_model_name_or_path",
                                                  "text_model_name_or_path") if getattr(self, name)]
            if backbones:
                raise ValueError(f"--model_name_or_path brings its own backbones: drop {', '.join(backbones)}")
            self.model_type = self._type_of_trained_model(self.model_type)
        self.model_type = self.model_type or "mvam"
        options = config_options(self)  # an option the model type does not take is an error now, not later
        if self.model_name_or_path is None:
            check_backbone_configs(self, options)

    def _type_of_trained_model(self, requested: str | None) -> str:
        try:
            found = PretrainedConfig.get_config_dict(self.model_name_or_path)[0].get("model_type")
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load --model_name_or_path {self.model_name_or_path}: {one_line(error)}") from None
        if found not in MODEL_CLASSES:
            raise ValueError(f"--model_name_or_path {self.model_name_or_path} is a {found!r} model, not one of {sorted(MODEL_CLASSES)}")
        if requested not in (None, found):
            raise ValueError(f"--model_type {requested} but --model_name_or_path {self.model_name_or_path} is {found}")
        return found


def config_options(model_args: ModelArguments) -> dict:
    """The model options given (not ``None``) that ``model_args.model_type``'s configuration class
    takes (by its signature), as keyword arguments. An option of another model type is an error:
    it would be silently ignored."""
    config_class = MODEL_CLASSES[model_args.model_type or "mvam"][0]
    accepted = inspect.signature(config_class.__init__).parameters
    not_config = {item.name for item in dataclasses.fields(model_args) if item.default is not None}
    not_config |= {"model_type", "model_name_or_path", "vision_config", "text_config", "vision_model_name_or_path",
                   "text_model_name_or_path"}
    options = {}
    for item in dataclasses.fields(model_args):
        value = getattr(model_args, item.name)
        if item.name in not_config or value is None:
            continue
        if item.name not in accepted:
            raise ValueError(f"--{item.name} does not apply to --model_type {model_args.model_type}")
        options[item.name] = value
    return options


def check_backbone_configs(model_args: ModelArguments, options: dict) -> None:
    """Build the configuration and, on the meta device (no memory), the model of a from-scratch
    backbone, so that a config transformers rejects (e.g. a hidden size the heads do not divide)
    stops the run now, with transformers' reason."""
    if not (model_args.vision_config or model_args.text_config):
        return
    import torch

    config_class, model_class, _ = MODEL_CLASSES[model_args.model_type]
    sub_configs = {name: json.loads(getattr(model_args, name)) for name in ("vision_config", "text_config")
                   if getattr(model_args, name)}
    try:
        with torch.device("meta"):
            model_class(config_class(**sub_configs, **options))
    except Exception as error:  # transformers raises ValueError, strict-dataclass errors, TypeError, ...
        raise ValueError(f"the backbone config is invalid: {one_line(error)}") from None


def one_line(error: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


@dataclass
class DataArguments:
    data: Optional[str] = option(
        None,
        "Image–caption data: a save_to_disk folder, an image folder with metadata.jsonl/csv, a "
        "Karpathy split JSON, a SCAN feature folder or a Hub dataset id (default: the synthetic benchmark).",
    )
    dataset_name: Optional[str] = option(
        None, "The data's name in the model card, training_args.json and the logs (default: the Hub id, or the "
        "file or folder's name: local paths are never uploaded)."
    )
    image_root: Optional[str] = option(None, "Folder of the images a Karpathy JSON (or relative paths) names.")
    image_column: Optional[str] = option(None, "Image column (default: image, else the first Image column).")
    caption_column: Optional[str] = option(None, "Caption column (default: caption, captions, sentences, ...).")
    allow_paths_outside_data_root: bool = option(
        False, "Read image files wherever the data's paths point; by default a path that leaves --image_root "
        "(or the data's folder) is skipped, unread."
    )
    num_train_images: int = option(10_000, "Synthetic benchmark: training images.")
    num_validation_images: int = option(500, "Synthetic benchmark: validation images.")
    num_test_images: int = option(1_000, "Synthetic benchmark: test images (5 captions each).")
    max_train_samples: Optional[int] = option(None, "Train on the first N images only (debugging, quick runs).")
    max_eval_samples: Optional[int] = option(None, "Validate and test on the first N images only.")
    all_pairs: bool = option(
        False, "Train on every (image, caption) pair instead of one random caption per image per epoch."
    )
    hard_negatives: bool = option(
        False, "Add each training caption's NegCLIP-style hard negative (a relation flipped, an attribute or object "
        "word replaced, or two swapped) as an extra caption negative for its image (hf_mvam.data.hard_negatives)."
    )
    streaming: bool = option(
        False, "Stream a Hub dataset or a folder of data files (datasets' IterableDataset, one caption per image "
        "per step) instead of loading the training split; needs --max_steps."
    )

    def __post_init__(self):
        for name in ("num_train_images", "num_validation_images", "num_test_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.streaming and self.data is None:
            raise ValueError("--streaming needs --data: a Hub dataset id or a folder of data files")
        if self.streaming and self.all_pairs:
            raise ValueError("--all_pairs visits every pair of the whole split each epoch: it cannot stream; drop one")
        if self.streaming and self.image_root is not None:
            raise ValueError("--image_root does not apply to --streaming: streamed paths are read relative to --data")

    def source(self) -> dict:
        """The arguments of ``hf_mvam.data.splits.load_splits`` (which data to load)."""
        accepted = _load_splits_parameters()
        return {k: v for k, v in dataclasses.asdict(self).items() if k in accepted}

    def name(self) -> str:
        """What the data is called where the run's files could be uploaded: never a local path."""
        if self.dataset_name:
            return self.dataset_name
        if self.data is None:
            return "hf-mvam synthetic benchmark"
        return os.path.basename(os.path.normpath(self.data)) if is_local_path(self.data) else self.data

    def hub_id(self) -> str | None:
        """The data's Hub id, when it is one."""
        return self.data if self.data is not None and not is_local_path(self.data) else None


def _load_splits_parameters() -> set[str]:
    from .data.splits import load_splits

    return set(inspect.signature(load_splits).parameters)


@dataclass
class TrainingArguments:
    output_dir: str = option("outputs/demo", "The model folder to write (checkpoints go to its checkpoints/).")
    overwrite_output_dir: bool = option(
        False, "Replace model files in OUTPUT_DIR that no run of this script wrote (other files are kept), and "
        "delete the checkpoints in OUTPUT_DIR/checkpoints that this run would not continue, instead of refusing."
    )
    # None until given; typed bool (not Optional) so that a bare --do_train parses as true.
    do_train: bool = option(
        None, "Train (default: train and evaluate when neither --do_train nor --do_eval is given)."
    )
    do_eval: bool = option(
        None, "Evaluate on the test split (or validation). Alone, with --model_name_or_path: evaluate that "
        "model without training, writing OUTPUT_DIR/eval_results.json."
    )
    per_device_train_batch_size: int = option(
        128, "Pairs per process per step. MVAM takes its negatives from every process's batch, UARDA from its own."
    )
    per_device_eval_batch_size: int = option(256, "Images or captions per forward pass in evaluation.")
    learning_rate: float = option(5e-4, "Peak AdamW learning rate.")
    weight_decay: float = option(0.05, "AdamW weight decay (not on biases, norms and scalars).")
    max_grad_norm: float = option(1.0, "Clip the gradients to this global norm (0: no clipping).")
    lr_scheduler_type: Literal[SCHEDULERS] = option("cosine", "transformers.get_scheduler schedule after the warm-up.")
    warmup_steps: int = option(100, "Linear warm-up steps.")
    num_train_epochs: int = option(8, "Epochs (unless --max_steps is given).")
    max_steps: int = option(-1, "Optimizer steps; replaces --num_train_epochs when > 0.")
    gradient_accumulation_steps: int = option(
        1, "Batches per optimizer step (the contrastive negatives still come from one batch)."
    )
    gradient_checkpointing: bool = option(
        False, "Recompute the backbones' activations in the backward pass (for the towers that support it)."
    )
    mixed_precision: Optional[Literal["no", "fp16", "bf16"]] = option(
        None, "Autocast through accelerate (default: accelerate's config or launcher setting). fp16 on a CPU "
        "falls back to no, with a warning; the card records what ran."
    )
    dataloader_num_workers: Optional[int] = option(
        None, "Processes decoding and processing images (default: the CPU cores per training process, minus "
        "one, at most 8; 0 = in the training process)."
    )
    seed: int = option(42, "Seed of the initialisation, the data order and the caption drawn per image.")
    logging_steps: int = option(10, "Log the training scalars, averaged, every N steps (values are read only then).")
    eval_steps: int = option(250, "Evaluate on the validation split every N steps (the test split at the end).")
    save_steps: int = option(250, "Save a checkpoint every N steps and at the end.")
    save_total_limit: Optional[int] = option(2, "Keep only the newest N checkpoints.")
    resume_from_checkpoint: Optional[str] = option(
        None, "'latest' (the newest complete one in OUTPUT_DIR/checkpoints, if there is one) or a checkpoint folder."
    )
    report_to: Optional[str] = option(
        None, "Comma list of accelerate trackers (tensorboard, wandb, mlflow, ...), all, or none "
        "(default: tensorboard). A tracker that is not installed is an error."
    )
    push_to_hub: bool = option(False, "Upload the model folder (without checkpoints) to --hub_model_id.")
    hub_model_id: Optional[str] = option(None, "Hub repository: 'name' or 'owner/name' (also the card's model name).")
    hub_token: Optional[str] = option(None, "Hub token (default: the saved login or HF_TOKEN).")
    hub_private_repo: bool = option(False, "Create the Hub repository as private.")
    hub_strategy: Literal["end", "every_save"] = option(
        "end", "end: push the final model folder; every_save: also push the model at every checkpoint."
    )
    license: Optional[str] = option(None, "License id of the model card (e.g. apache-2.0).")

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "eval_steps", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"--learning_rate must be a finite number > 0, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs < 1:
            raise ValueError("set --max_steps > 0 or --num_train_epochs >= 1")
        if self.warmup_steps < 0:
            raise ValueError("--warmup_steps must be >= 0")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"--save_total_limit must be >= 1, got {self.save_total_limit}")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            raise ValueError(f"--dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")
        if self.do_train is None and self.do_eval is None:
            self.do_train = self.do_eval = True
        self.do_train, self.do_eval = bool(self.do_train), bool(self.do_eval)
        if not (self.do_train or self.do_eval):
            raise ValueError("nothing to do: --do_train and --do_eval are both false")
        if self.hub_model_id is not None:
            validate_repo_id(self.hub_model_id)  # HFValidationError is a ValueError naming the problem
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        if self.hub_strategy != "end" and not self.push_to_hub:
            raise ValueError(f"--hub_strategy {self.hub_strategy} needs --push_to_hub")
        if self.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(self.resume_from_checkpoint):
            raise ValueError(
                f"--resume_from_checkpoint {self.resume_from_checkpoint} is neither 'latest' nor an existing folder"
            )
        self.report_to = trackers(self.report_to)

    def num_workers(self) -> int:
        """--dataloader_num_workers, by default this machine's cores per training process, one left
        to the process itself (at most 8)."""
        if self.dataloader_num_workers is not None:
            return self.dataloader_num_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(0, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def trackers(report_to) -> list[str]:
    """``--report_to`` as a list of installed accelerate tracker names (``[]`` for none)."""
    installed = [str(tracker) for tracker in get_available_trackers()]
    if report_to is None:
        return ["tensorboard"] if "tensorboard" in installed else []
    names = report_to if isinstance(report_to, list) else [n.strip() for n in str(report_to).split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return installed
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"--report_to: unknown tracker {name!r}; choose from {', '.join(LOGGER_TYPE_TO_CLASS)}, all or none")
        if name not in installed:
            raise ValueError(f"--report_to {name}: the {name} package is not installed (pip install {name})")
    return list(dict.fromkeys(names))


def check_run_setting(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments,
                      num_processes: int) -> None:
    """Checks that need the number of processes: a contrastive or triplet loss needs negatives in
    the batch they come from (MVAM gathers every process's batch, UARDA uses its own)."""
    gathered = model_args.model_type == "mvam"  # MVAM gathers every process's batch, UARDA uses its own
    if train_args.do_train and train_args.per_device_train_batch_size * (num_processes if gathered else 1) < 2:
        where = f"the {num_processes} process(es)' batches" if gathered else "each process's batch"
        raise ValueError(
            f"--per_device_train_batch_size {train_args.per_device_train_batch_size}: the loss takes its negatives "
            f"from the other pairs of {where}, and there are none; use at least 2 pairs"
        )
    if train_args.do_eval and not train_args.do_train:
        if model_args.model_name_or_path is None:
            raise ValueError("--do_eval without --do_train evaluates a trained model: pass --model_name_or_path")
        if os.path.realpath(train_args.output_dir) == os.path.realpath(model_args.model_name_or_path):
            raise ValueError("--output_dir is the model folder itself, whose eval_results.json belongs to its card: "
                             "choose another --output_dir for the evaluation")
    if data_args.streaming and train_args.do_train and train_args.max_steps <= 0:
        raise ValueError("--streaming has no epoch length: set --max_steps")


def recorded_arguments(args) -> dict:
    """Every argument but the Hub token, for ``training_args.json`` and the trackers (both may be
    uploaded): a value that names a local file or folder is replaced by its base name, and the
    data by ``DataArguments.name()``. ``local_paths`` (the absolute paths, for this machine only)
    goes beside it into the output folder's private part."""
    model_args, data_args, train_args = args
    groups = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args),
              "training": {k: v for k, v in dataclasses.asdict(train_args).items() if k != "hub_token"}}
    local_paths = {}
    for group, values in groups.items():
        for key, value in values.items():
            if is_local_path(value):
                local_paths[f"{group}.{key}"] = os.path.abspath(value)
                values[key] = os.path.basename(os.path.normpath(value))
    if data_args.data is not None and is_local_path(data_args.data):
        groups["data"]["data"] = data_args.name()
    return {**groups, "local_paths": local_paths}


def tracker_config(recorded: dict) -> dict:
    """The recorded arguments as flat scalars or strings, as trackers take them."""
    flat = {k: v for group in ("model", "data", "training") for k, v in recorded[group].items()}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Flags, optionally after a .json/.yaml file of them (the flags override the file). An invalid
    value exits with the parser's one-line message."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog="run.py")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0].endswith(OPTIONS_FILE_SUFFIXES):
            argv = options_file_flags(parser, argv[0]) + argv[1:]
        return parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except (ValueError, OSError) as error:
        parser.error(one_line(error))


def options_file_flags(parser: HfArgumentParser, path: str) -> list[str]:
    """A .json/.yaml file of options as the flags it stands for, so that the same parser checks
    them and flags given after it override them. ``null`` sets an option to ``None``."""
    with open(path, encoding="utf-8") as file:
        if path.endswith(".json"):
            options = json.load(file)
        else:
            import yaml

            options = yaml.safe_load(file)
    if not isinstance(options, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    known = {item.name for group in parser.dataclass_types for item in dataclasses.fields(group)}
    flags = []
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"{path}: unknown option {key!r}")
        if value is None:
            parser.set_defaults(**{key: None})
        elif isinstance(value, dict):
            flags += [f"--{key}", json.dumps(value)]
        elif isinstance(value, list):
            flags += [f"--{key}", ",".join(map(str, value))]
        else:
            flags += [f"--{key}", str(value)]
    return flags
