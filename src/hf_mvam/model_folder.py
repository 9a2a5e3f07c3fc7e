"""What a run of ``training/run.py`` writes into its model folder, the part of the output folder
a Hub repository gets: the model and processor (with their remote code), the figures, the eval
results, the model card and the run's arguments (``training_args.json``, without local paths).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from accelerate.utils import DistributedType
from PIL import Image

from . import hub
from .checkpointing import TrainerState
from .data.splits import TRAINING_ARGS_NAME
from .evaluation import evaluate_split
from .visualization import save_figures

__all__ = ["card_inputs", "log_figures", "push_snapshot", "save_model_folder", "whole_model"]


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
        **({"hard_negative_captions": "one per caption (NegCLIP-style)"} if data_args.hard_negatives else {}),
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


def push_snapshot(parent: Path, model, processor, card: dict, recorded: dict, state: TrainerState, train_args) -> None:
    """--hub_strategy every_save: the model folder of this step (without results or figures),
    written to a temporary folder in ``parent`` and pushed, as Trainer pushes at every save."""
    with tempfile.TemporaryDirectory(dir=parent) as folder:
        save_model_folder(Path(folder), model, processor, {}, None, card, recorded, state)
        hub.push_folder_to_hub(folder, train_args.hub_model_id, token=train_args.hub_token,
                               private=train_args.hub_private_repo,
                               commit_message=f"Training in progress, step {state.global_step}")


def evaluate_on_every_process(accelerator, model, processor, split, batch_size: int, progress: bool = False):
    """``evaluate_split`` of the model; call on every process. Under data parallelism each process
    encodes its share of the split and scores its share of the rows (the results equal one
    process's); under FSDP the whole model is gathered and evaluated on the main process. Returns
    the results on the main process, ``None`` elsewhere."""
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.unwrap_model(model) is not model:
        evaluated = whole_model(accelerator, model)
        results = evaluate_split(evaluated, processor, split, batch_size, progress=progress) if evaluated else None
        accelerator.wait_for_everyone()
        return results
    results = evaluate_split(accelerator.unwrap_model(model), processor, split, batch_size,
                             progress=progress and accelerator.is_main_process,
                             distributed=accelerator.num_processes > 1)
    return results if accelerator.is_main_process else None


def whole_model(accelerator, model):
    """The model, whole, on the main process (``None`` elsewhere), for evaluation and saving; call
    on every process. Under FSDP each process holds a shard: the gathered state dict goes into a
    copy (not exercised by the tests: accelerate runs no FSDP on CPUs)."""
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type != DistributedType.FSDP or unwrapped is model:
        return unwrapped if accelerator.is_main_process else None
    state_dict = accelerator.get_state_dict(model)  # gathered onto the main process
    if not accelerator.is_main_process:
        return None
    copy = type(unwrapped)(unwrapped.config)
    copy.load_state_dict(state_dict)
    return copy.to(accelerator.device)
