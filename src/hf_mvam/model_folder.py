"""What a run of ``training/run.py`` writes into its model folder, the part of the output folder
a Hub repository gets: the model and processor (with their remote code), the figures, the eval
results, the model card and the run's arguments (``training_args.json``, without local paths).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from . import hub
from .checkpointing import TrainerState
from .data.splits import TRAINING_ARGS_NAME
from .visualization import save_figures

__all__ = ["card_inputs", "log_figures", "save_model_folder"]


def save_model_folder(folder: Path, model, processor, results, test_split, card: dict, recorded: dict,
                      state: TrainerState) -> list[str]:
    """Model and processor (with their remote code), figures, eval results, the model card and the
    run's arguments: everything the Hub repository gets. Returns the figures' paths."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    figures = save_figures(model, processor, test_split, folder, state.log_history) if test_split is not None else []
    hyperparameters = {**hub.describe_model(model), **card["hyperparameters"], "steps": state.global_step}
    built = hub.build_model_card(**{**card, "hyperparameters": hyperparameters}, eval_results=results, figures=figures)
    hub.write_model_folder_extras(folder, built, results)
    record = {k: v for k, v in recorded.items() if k != "local_paths"}
    record.update(eval_split=card["dataset_split"], final_step=state.global_step,
                  local_data="data.data" in recorded["local_paths"])
    (folder / TRAINING_ARGS_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return figures


def card_inputs(args, processor, eval_split: str, precision: str, num_processes: int) -> dict:
    """What the model card says beside the model's own settings and the results."""
    model_args, data_args, train_args = args
    sources = (model_args.model_name_or_path, model_args.vision_model_name_or_path, model_args.text_model_name_or_path)
    pretrained = {name: Path(value).name if os.path.exists(value) else value for name, value in zip(
        ("fine_tuned_from", "vision_model_name_or_path", "text_model_name_or_path"), sources) if value}
    frozen = [side for side in ("vision", "text") if getattr(model_args, f"freeze_{side}_model")]
    training = {
        "global_batch_size": num_processes * train_args.gradient_accumulation_steps * train_args.per_device_train_batch_size,
        "learning_rate": train_args.learning_rate,
        "weight_decay": train_args.weight_decay,
        "max_grad_norm": train_args.max_grad_norm,
        "schedule": f"{train_args.warmup_steps} warm-up steps, {train_args.lr_scheduler_type}",
        "captions_per_image_per_epoch": "all" if data_args.all_pairs else 1,
        "mixed_precision": precision,
        **({"frozen_backbones": ", ".join(frozen)} if frozen else {}),
        "seed": train_args.seed,
    }
    name = train_args.hub_model_id or Path(train_args.output_dir).resolve().name
    return dict(
        model_type=model_args.model_type, model_name=name.split("/")[-1], repo_id=name, license=train_args.license,
        dataset_name=data_args.name(), dataset_id=data_args.hub_id(), dataset_split=eval_split,
        base_model=[value for value in sources if value and not os.path.exists(value)],
        hypothesis_template=hub.zero_shot_template(processor.tokenizer),
        hyperparameters={**pretrained, **training},
    )


def log_figures(accelerator, folder: Path, figures: list[str], step: int) -> None:
    """The figures, as images, to every tracker that takes images."""
    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images"):
            continue
        for figure in figures:
            image = np.asarray(Image.open(folder / figure).convert("RGB"))  # [H, W, 3]
            name = f"figures/{Path(figure).stem}"
            if tracker.name == "tensorboard":
                tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({name: [image]}, step=step)
