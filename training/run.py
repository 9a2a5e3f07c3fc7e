"""Train, evaluate, checkpoint and publish an MVAM or UARDA image–text matching model.

    python training/run.py                                   # MVAM on the built-in synthetic benchmark
    python training/run.py --model_type uarda --output_dir outputs/uarda
    accelerate launch training/run.py --data path/to/dataset_flickr30k.json --image_root path/to/images
    accelerate launch --multi_gpu --num_processes 2 training/run.py --per_device_train_batch_size 64
    python training/run.py my_options.json                   # the same options as a .json / .yaml file

Without ``--data`` it trains on the synthetic benchmark (generated once, then cached). The story:
parse the arguments, load the data, build the processor and the model, train (checkpoints and
validation along the way), evaluate on the test split, save the model folder (model, processor,
eval results, figures, model card) and push it to the Hub if asked.
``training/check_folder.py OUTPUT_DIR`` then reloads the folder in a fresh process and checks it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list, is_tensorboard_available, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoTokenizer, HfArgumentParser, get_cosine_schedule_with_warmup

from hf_mvam import MVAMConfig, MVAMModel, MVAMProcessor, UARDAConfig, UARDAModel, UARDAProcessor, hub
from hf_mvam.backbones import DEFAULT_TEXT_CONFIG, DEFAULT_VISION_CONFIG
from hf_mvam.builders import default_processor, default_text_config
from hf_mvam.data.collate import CaptionPairSampler, ImageCaptionCollator, ImageCaptionPairs, flatten_captions
from hf_mvam.evaluation import evaluate_split
from hf_mvam.training_utils import (
    PROCESSOR_DIR,
    TRAINER_STATE_NAME,
    TRAINING_ARGS_NAME,
    TrainerState,
    clamp_logit_scale,
    list_checkpoints,
    load_checkpoint,
    load_splits,
    save_checkpoint,
    save_figures,
    summary_table,
    threshold_statistics,
    training_loss,
)

logger = get_logger("hf_mvam.run")

MODEL_CLASSES = {"mvam": (MVAMConfig, MVAMModel, MVAMProcessor), "uarda": (UARDAConfig, UARDAModel, UARDAProcessor)}


# --------------------------------------------------------------------------- arguments


def option(default, help: str):
    """A dataclass field with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelArguments:
    model_type: Literal["mvam", "uarda"] = option(
        "mvam", "mvam (multi-view dual encoder) or uarda (cross attention, learned relevance threshold)."
    )
    num_views: int = option(4, "MVAM: view codes K per modality (1 = a plain CLIP-style dual encoder).")
    projection_dim: int = option(128, "MVAM: width of each view; UARDA: width of the fragment space.")
    diversity_weight: float = option(0.1, "MVAM: weight of the views' diversity loss.")
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
        None, "Pretrained vision backbone (Hub id or folder), whose image processor is used. MVAM only."
    )
    text_model_name_or_path: Optional[str] = option(
        None, "Pretrained text backbone (Hub id or folder), whose tokenizer is used. MVAM only."
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
        if any(pretrained) and not hasattr(MODEL_CLASSES[self.model_type][1], "from_vision_text_pretrained"):
            raise ValueError(f"pretrained backbones are not supported for --model_type {self.model_type}")


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


def fail(message: str):
    """Stop before training with a one-line message instead of a traceback."""
    raise SystemExit(f"run.py: error: {message}")


# --------------------------------------------------------------------------- data


def load_data(data_args: DataArguments, accelerator: Accelerator):
    """The splits, a readable name of the data and the name of the evaluation split. The main
    process loads (and caches) first, then the others read the cache."""
    with accelerator.main_process_first():
        try:
            fields = {k: v for k, v in dataclasses.asdict(data_args).items() if k != "all_pairs"}
            splits, name, stats = load_splits(**fields)
        except (ValueError, FileNotFoundError) as error:
            fail(f"cannot load --data {data_args.data}: {error}")
    if stats is not None:
        report_skipped(stats)
    if "train" not in splits or not {"test", "validation"} & set(splits):
        fail(
            f"the data needs a 'train' split and a 'test' or 'validation' split; it has {list(splits)}. "
            "Give an image folder train/ and test/ subfolders (each with its metadata file) or a "
            "'split' column in its metadata; a saved dataset or Hub dataset its splits"
        )
    for split in {"train", "validation", "test"} & set(splits):
        if len(splits[split]) == 0:  # e.g. every image skipped: a wrong image_root
            fail(f"the {split} split has no usable image with a caption (see the skipped ones above)")
    return splits, name, "test" if "test" in splits else "validation"


def report_skipped(stats: dict) -> None:
    """Log what the loader skipped: unreadable images, images without captions, empty captions."""
    logger.info(f"data: {stats['source']}, images {stats['num_images']}, captions {stats['num_captions']}")
    if stats["skipped_images"]:
        logger.warning(f"skipped {len(stats['skipped_images'])} unusable image(s):")
        for split, path, reason in stats["skipped_images"]:
            logger.warning(f"  [{split}] {path}: {reason}")
    if stats["skipped_captions"]:
        logger.warning(f"dropped {stats['skipped_captions']} empty caption(s)")


def build_train_loader(train_split, processor, data_args: DataArguments, train_args: TrainingArguments):
    """Batches of (image, caption) pairs: one caption drawn per image per epoch, or all pairs."""
    pairs = ImageCaptionPairs(train_split)
    sampler = CaptionPairSampler(pairs.captions_per_image, seed=train_args.seed, all_pairs=data_args.all_pairs)
    if len(sampler) < train_args.per_device_train_batch_size:
        fail(f"the train split has {len(sampler)} training pairs, fewer than "
             f"--per_device_train_batch_size {train_args.per_device_train_batch_size}")
    return DataLoader(
        pairs,
        batch_size=train_args.per_device_train_batch_size,
        sampler=sampler,
        drop_last=True,  # equal batches on every process, as the gathered contrastive loss needs
        collate_fn=ImageCaptionCollator(processor),
        # Every new iterator draws a base seed: from a generator of its own it leaves the global RNG
        # (dropout) alone, so a run resumed mid-epoch draws exactly as the original did.
        generator=torch.Generator().manual_seed(train_args.seed),
    )


# --------------------------------------------------------------------------- model


def starting_checkpoint(train_args: TrainingArguments, accelerator: Accelerator) -> Path | None:
    """The checkpoint to resume from: --resume_from_checkpoint's folder, or with 'latest' the newest
    complete one in OUTPUT_DIR/checkpoints (``None``: start afresh).

    Checkpoints in OUTPUT_DIR/checkpoints that this run would not continue (all of them on a fresh
    start or when resuming from elsewhere; the later ones when resuming from an earlier one of them)
    would shadow this run's under 'latest' and outrank them when old ones are pruned, since both go
    by step. The run refuses to start beside them, unless --overwrite_output_dir deletes them.
    """
    checkpoints = Path(train_args.output_dir) / "checkpoints"
    existing = list_checkpoints(checkpoints)  # complete ones, by step
    start = None
    if train_args.resume_from_checkpoint == "latest":
        start = existing[-1] if existing else None
    elif train_args.resume_from_checkpoint is not None:
        start = Path(train_args.resume_from_checkpoint)
        if not (start / TRAINER_STATE_NAME).is_file() or not (start / PROCESSOR_DIR).is_dir():
            fail(f"--resume_from_checkpoint {start} is not a complete checkpoint of training/run.py")
    resolved = [path.resolve() for path in existing]
    stale = existing[resolved.index(start.resolve()) + 1:] if start is not None and start.resolve() in resolved else existing
    if stale and not train_args.overwrite_output_dir:
        fail(
            f"{checkpoints} holds checkpoints this run would not continue ({', '.join(p.name for p in stale)}); "
            "pass --resume_from_checkpoint latest to continue the newest, or --overwrite_output_dir to delete them"
        )
    if accelerator.is_main_process:
        for path in stale:
            logger.warning(f"--overwrite_output_dir: removing {path}")
            shutil.rmtree(path)
        if start is None and checkpoints.exists():  # only incomplete leftovers remain
            shutil.rmtree(checkpoints)
    accelerator.wait_for_everyone()
    return start


def build_processor(model_args: ModelArguments, train_split, accelerator: Accelerator, checkpoint: Path | None):
    """A resumed run's processor comes from its checkpoint. Otherwise the main process builds it
    (the pretrained backbones' tokenizer and image processor, or a tokenizer trained on the training
    captions) and sends it to the other processes, so that every process tokenises alike."""
    processor_class = MODEL_CLASSES[model_args.model_type][2]
    if checkpoint is not None:
        return processor_class.from_pretrained(checkpoint / PROCESSOR_DIR)
    processor = None
    if accelerator.is_main_process and model_args.vision_model_name_or_path:
        processor = processor_class(
            image_processor=AutoImageProcessor.from_pretrained(model_args.vision_model_name_or_path),
            tokenizer=AutoTokenizer.from_pretrained(model_args.text_model_name_or_path),
        )
    elif accelerator.is_main_process:
        vision_config = json.loads(model_args.vision_config or "{}")
        image_size = vision_config.get("image_size", DEFAULT_VISION_CONFIG["image_size"])  # e.g. a ResNet has none
        processor = default_processor(processor_class, flatten_captions(train_split)[0], image_size=image_size)
        text_config = {**DEFAULT_TEXT_CONFIG, **json.loads(model_args.text_config or "{}")}
        if "max_position_embeddings" in text_config:  # captions must fit the text tower's positions
            tokenizer = processor.tokenizer
            tokenizer.model_max_length = min(tokenizer.model_max_length, text_config["max_position_embeddings"])
    return broadcast_object_list([processor])[0]


def build_model(model_args: ModelArguments, processor, train_split):
    """MVAM or UARDA on pretrained backbones, or from scratch with the text tower sized to the
    tokenizer (UARDA on precomputed region features when the data has them)."""
    config_class, model_class, _ = MODEL_CLASSES[model_args.model_type]
    features = "image_features" in train_split.column_names
    if model_args.model_type == "mvam":
        if features:
            fail("this data has precomputed image_features, which only --model_type uarda can use")
        options = dict(
            num_views=model_args.num_views,
            projection_dim=model_args.projection_dim,
            diversity_weight=model_args.diversity_weight,
        )
    else:
        options = dict(
            embed_dim=model_args.projection_dim,
            threshold_mode=model_args.threshold_mode,
            direction=model_args.direction,
            aggregation=model_args.aggregation,
            margin=model_args.margin,
            max_violation=model_args.max_violation,
        )
    if model_args.vision_model_name_or_path:
        return model_class.from_vision_text_pretrained(
            model_args.vision_model_name_or_path, model_args.text_model_name_or_path, **options
        )
    vocab_size = len(processor.tokenizer)
    text_config = {**default_text_config(vocab_size), **json.loads(model_args.text_config or "{}")}
    text_config["vocab_size"] = vocab_size
    vision_config = json.loads(model_args.vision_config) if model_args.vision_config else None
    if features:
        options["image_feature_dim"] = int(train_split.with_format("numpy")[0]["image_features"].shape[-1])
    return model_class(config_class(vision_config=vision_config, text_config=text_config, **options))


def count_steps(loader: DataLoader, train_args: TrainingArguments, num_processes: int) -> int:
    """Optimizer steps of the run: --max_steps, or the epochs' worth for each process's share."""
    batches_per_epoch = len(loader) // num_processes
    if batches_per_epoch == 0:
        fail(f"the train split has too few pairs for {num_processes} process(es) x batch "
             f"{train_args.per_device_train_batch_size}")
    if train_args.max_steps > 0:
        return train_args.max_steps
    return train_args.num_train_epochs * math.ceil(batches_per_epoch / train_args.gradient_accumulation_steps)


def build_optimizer_and_schedule(model, train_args: TrainingArguments, total_steps: int, num_processes: int):
    """AdamW (no weight decay on biases, norms and scalars), linear warm-up, cosine decay.
    accelerate steps a prepared scheduler once per process at each optimizer step, so the schedule
    is laid out in process-steps (as in accelerate's examples)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": train_args.weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=train_args.learning_rate)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, train_args.warmup_steps * num_processes, total_steps * num_processes
    )
    return optimizer, scheduler


# --------------------------------------------------------------------------- training


def train(accelerator, model, optimizer, scheduler, loader, processor, state: TrainerState, total_steps: int, args,
          validate):
    """The training loop, from ``state`` (fresh or resumed) to ``total_steps`` optimizer steps.

    Each epoch has its own seeded pair order; a resumed epoch skips the batches it had consumed, so
    the run continues on exactly the batches it would have seen. ``validate(step)`` runs every
    ``eval_steps`` steps, and a checkpoint (with the processor) is saved every ``save_steps`` steps
    and at the end.
    """
    unwrapped = accelerator.unwrap_model(model)
    checkpoints = Path(args.output_dir) / "checkpoints"
    progress = tqdm(
        total=total_steps, initial=state.global_step, desc="training", disable=not accelerator.is_main_process
    )
    model.train()
    losses = []  # of the batches of the current optimizer step
    while state.global_step < total_steps:
        loader.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for batch in batches:
            with accelerator.accumulate(model):
                loss = training_loss(model, unwrapped, batch)
                accelerator.backward(loss)
                optimizer.step()
                clamp_logit_scale(unwrapped)
                scheduler.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            logs = {
                "train/loss": accelerator.reduce(torch.stack(losses).mean(), "mean").item(),
                "train/learning_rate": scheduler.get_last_lr()[0],
                "train/epoch": state.epoch,
            }
            losses.clear()
            if unwrapped.config.model_type == "mvam":
                logs["train/logit_scale"] = unwrapped.logit_scale.exp().item()
            else:
                logs.update(threshold_statistics(unwrapped))
                state.threshold_history.append([state.global_step, logs["relevance/threshold"]])
            accelerator.log(logs, step=state.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
            if state.global_step % args.eval_steps == 0 and state.global_step < total_steps:
                validate(state.global_step)
            if state.global_step % args.save_steps == 0:
                save_checkpoint(accelerator, checkpoints, state, args.save_total_limit, processor)
            if state.global_step == total_steps:
                break
        else:  # the epoch ran out
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()
    if state.global_step % args.save_steps != 0:
        save_checkpoint(accelerator, checkpoints, state, args.save_total_limit, processor)


# --------------------------------------------------------------------------- the model folder


def save_model_folder(
    folder: Path, model, processor, results, test_split, eval_split, dataset_name, args, state, num_processes
):
    """Model and processor (with their remote code), figures, eval results and the model card:
    everything the Hub repository gets."""
    model_args, data_args, train_args = args
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    figures = save_figures(model, processor, test_split, folder, state.threshold_history)
    card = hub.build_model_card(
        model_type=model_args.model_type,
        model_name=train_args.hub_model_id or folder.name,
        eval_results=results,
        dataset_name=dataset_name,
        dataset_id=data_args.data if data_args.data and not os.path.exists(data_args.data) else None,
        dataset_split=eval_split,
        hyperparameters=hyperparameters(model, args, state, num_processes),
        figures=figures,
        repo_id=train_args.hub_model_id or str(folder),
    )
    hub.write_model_folder_extras(folder, card, results)


def save_arguments(folder: Path, args, eval_split: str, final_step: int) -> None:
    """``training_args.json``: every argument but the Hub token, local data paths made absolute (so
    that check_folder.py finds the same data from anywhere), and the split the results come from."""
    model_args, data_args, train_args = args
    paths = {k: getattr(data_args, k) for k in ("data", "image_root")}
    local = {k: os.path.abspath(v) for k, v in paths.items() if v and os.path.exists(v)}
    recorded = {
        "model": dataclasses.asdict(model_args),
        "data": {**dataclasses.asdict(data_args), **local},
        "training": {k: v for k, v in dataclasses.asdict(train_args).items() if k != "hub_token"},
        "eval_split": eval_split,
        "final_step": final_step,
    }
    (folder / TRAINING_ARGS_NAME).write_text(json.dumps(recorded, indent=2) + "\n")


def hyperparameters(model, args, state: TrainerState, num_processes: int) -> dict:
    """The settings the model card lists."""
    model_args, data_args, train_args = args
    shown = {"model_type": model_args.model_type}
    if model_args.model_type == "mvam":
        shown.update(
            num_views=model_args.num_views,
            projection_dim=model_args.projection_dim,
            diversity_weight=model_args.diversity_weight,
        )
    else:
        shown.update(
            threshold_mode=model_args.threshold_mode,
            learned_threshold=round(float(model.relevance_threshold.threshold), 4),
            direction=model_args.direction,
            aggregation=model_args.aggregation,
            margin=model_args.margin,
            max_violation=model_args.max_violation,
            embed_dim=model_args.projection_dim,
        )
    vision = model.config.vision_config
    shown.update(
        vision_backbone=model_args.vision_model_name_or_path or (vision.model_type if vision else "region features"),
        text_backbone=model_args.text_model_name_or_path or model.config.text_config.model_type,
        parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M",
        global_batch_size=num_processes * train_args.gradient_accumulation_steps
        * train_args.per_device_train_batch_size,
        learning_rate=train_args.learning_rate,
        weight_decay=train_args.weight_decay,
        schedule=f"{train_args.warmup_steps} warm-up steps, cosine decay",
        steps=state.global_step,
        captions_per_image_per_epoch="all" if data_args.all_pairs else 1,
        mixed_precision=train_args.mixed_precision or "accelerate default",
        seed=train_args.seed,
    )
    return shown


def tracker_config(args) -> dict:
    """Every argument, as a scalar or a string, for the trackers (never the Hub token)."""
    flat = {k: v for group in args for k, v in dataclasses.asdict(group).items() if k != "hub_token"}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, float]:
    started = time.time()
    args = model_args, data_args, train_args = parse_arguments(argv)
    output_dir = Path(train_args.output_dir)
    accelerator = Accelerator(
        # Without a GPU, `accelerate launch --multi_gpu` processes form a (gloo) process group only
        # when the Accelerator is told to use the CPU.
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        mixed_precision=train_args.mixed_precision,
        log_with=None if train_args.report_to == "none" else train_args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    logging.getLogger("hf_mvam").setLevel(logging.INFO)
    set_seed(train_args.seed)

    # Data, processor, model, optimizer; the state of a resumed run.
    splits, dataset_name, eval_split = load_data(data_args, accelerator)
    checkpoint = starting_checkpoint(train_args, accelerator)
    try:
        processor = build_processor(model_args, splits["train"], accelerator, checkpoint)
        model = build_model(model_args, processor, splits["train"])
    except ValueError as error:
        fail(str(error))
    loader = build_train_loader(splits["train"], processor, data_args, train_args)
    total_steps = count_steps(loader, train_args, accelerator.num_processes)
    optimizer, scheduler = build_optimizer_and_schedule(model, train_args, total_steps, accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    state = TrainerState()
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint)
        logger.info(f"resumed from {checkpoint} at step {state.global_step} (epoch {state.epoch})")

    # Train, validating on the main process (the others wait).
    validation = splits["validation" if "validation" in splits else eval_split]

    def validate(step: int) -> None:
        if accelerator.is_main_process:
            results = evaluate_split(unwrapped, processor, validation, train_args.per_device_eval_batch_size)
            accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=step)
            logger.info(f"step {step}: validation rSum {results['rsum']:.2f}")
        accelerator.wait_for_everyone()

    logger.info(
        f"{model_args.model_type}: {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f} M parameters, "
        f"{total_steps} steps of {accelerator.num_processes} process(es) x batch "
        f"{train_args.per_device_train_batch_size}, {len(splits['train'])} training images"
    )
    accelerator.init_trackers("hf_mvam", config=tracker_config(args))
    train(accelerator, model, optimizer, scheduler, loader, processor, state, total_steps, train_args, validate)

    # Test, save, publish, on the main process.
    results = {}
    if accelerator.is_main_process:
        test = splits[eval_split]
        results = evaluate_split(unwrapped, processor, test, train_args.per_device_eval_batch_size, progress=True)
        accelerator.log({f"test/{k}": v for k, v in results.items()}, step=state.global_step)
        save_model_folder(
            output_dir, unwrapped, processor, results, test, eval_split, dataset_name, args, state,
            accelerator.num_processes,
        )
        save_arguments(output_dir, args, eval_split, state.global_step)
        if train_args.push_to_hub:
            url = hub.push_folder_to_hub(output_dir, train_args.hub_model_id, token=train_args.hub_token)
            logger.info(f"pushed {output_dir} to {url}")
        print(f"\n{model_args.model_type.upper()} on {dataset_name} ({eval_split} split), saved to {output_dir}")
        print(summary_table(results, time.time() - started))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
