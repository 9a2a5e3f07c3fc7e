"""Train, evaluate, checkpoint and publish an MVAM or UARDA image–text matching model.

    python training/run.py                                   # MVAM on the built-in synthetic benchmark
    python training/run.py --model_type uarda --output_dir outputs/uarda
    accelerate launch training/run.py --data path/to/dataset_flickr30k.json --image_root path/to/images
    accelerate launch --multi_gpu --num_processes 2 training/run.py --per_device_train_batch_size 64
    python training/run.py my_options.json                   # the same options as a .json / .yaml file

Without ``--data`` it trains on the synthetic benchmark (generated once, then cached). ``main``
tells the story in numbered steps; ``python training/run.py --help`` lists every option
(``hf_mvam.arguments``). ``training/check_folder.py OUTPUT_DIR`` then reloads the folder in a fresh
process and checks it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoTokenizer, get_cosine_schedule_with_warmup

from hf_mvam import MODEL_CLASSES, hub
from hf_mvam.arguments import config_options, parse_arguments
from hf_mvam.backbones import DEFAULT_TEXT_CONFIG, DEFAULT_VISION_CONFIG
from hf_mvam.builders import default_processor, default_text_config
from hf_mvam.checkpointing import (
    CHECKPOINTS_DIR, PROCESSOR_DIR, TRAINER_STATE_NAME, TrainerState, list_checkpoints, load_checkpoint,
    save_checkpoint, stale_checkpoints,
)
from hf_mvam.data.collate import CaptionPairSampler, ImageCaptionCollator, ImageCaptionPairs, flatten_captions
from hf_mvam.data.splits import TRAINING_ARGS_NAME, load_splits
from hf_mvam.evaluation import evaluate_split
from hf_mvam.metrics import summary_table
from hf_mvam.visualization import save_figures

logger = get_logger("hf_mvam.run")


def fail(message: str):
    """Stop before training with a one-line message instead of a traceback."""
    raise SystemExit(f"run.py: error: {message}")


# --------------------------------------------------------------------------- data


def load_data(data_args, accelerator: Accelerator):
    """The splits, a readable name of the data and the name of the evaluation split. The main
    process loads (and caches) first, then the others read the cache."""
    with accelerator.main_process_first():
        try:
            splits, name, stats = load_splits(**data_args.source())
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


def build_train_loader(train_split, processor, data_args, train_args) -> DataLoader:
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


# --------------------------------------------------------------------------- processor and model


def starting_checkpoint(train_args, accelerator: Accelerator) -> Path | None:
    """The checkpoint to resume from: --resume_from_checkpoint's folder, or with 'latest' the newest
    complete one in OUTPUT_DIR/checkpoints (``None``: start afresh). The run refuses to start
    beside checkpoints it would not continue, unless --overwrite_output_dir deletes them."""
    checkpoints = Path(train_args.output_dir) / CHECKPOINTS_DIR
    start = None
    if train_args.resume_from_checkpoint == "latest":
        existing = list_checkpoints(checkpoints)
        start = existing[-1] if existing else None
    elif train_args.resume_from_checkpoint is not None:
        start = Path(train_args.resume_from_checkpoint)
        if not (start / TRAINER_STATE_NAME).is_file() or not (start / PROCESSOR_DIR).is_dir():
            fail(f"--resume_from_checkpoint {start} is not a complete checkpoint of training/run.py")
    stale = stale_checkpoints(checkpoints, start)
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


def build_processor(model_args, train_split, accelerator: Accelerator, checkpoint: Path | None):
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


def build_model(model_args, processor, train_split):
    """The model on pretrained backbones, or from scratch with the text tower sized to the
    tokenizer; on precomputed region features when the data has them."""
    config_class, model_class, _ = MODEL_CLASSES[model_args.model_type]
    options = config_options(model_args)
    if "image_features" in train_split.column_names:
        if model_args.vision_model_name_or_path or model_args.vision_config:
            fail("this data has precomputed image_features: a vision backbone would go unused")
        options["image_feature_dim"] = int(train_split.with_format("numpy")[0]["image_features"].shape[-1])
    if model_args.vision_model_name_or_path:
        model = model_class.from_vision_text_pretrained(
            model_args.vision_model_name_or_path, model_args.text_model_name_or_path, **options
        )
    else:
        vocab_size = len(processor.tokenizer)
        text_config = {**default_text_config(vocab_size), **json.loads(model_args.text_config or "{}")}
        text_config["vocab_size"] = vocab_size
        vision_config = json.loads(model_args.vision_config) if model_args.vision_config else None
        model = model_class(config_class(vision_config=vision_config, text_config=text_config, **options))
    vocab_size = model.config.text_config.vocab_size
    if len(processor.tokenizer) > vocab_size:
        fail(f"the tokenizer has {len(processor.tokenizer)} tokens but the text backbone embeds only {vocab_size}")
    return model


def count_steps(loader: DataLoader, train_args, num_processes: int) -> int:
    """Optimizer steps of the run: --max_steps, or the epochs' worth for each process's share."""
    batches_per_epoch = len(loader) // num_processes
    if batches_per_epoch == 0:
        fail(f"the train split has too few pairs for {num_processes} process(es) x batch "
             f"{train_args.per_device_train_batch_size}")
    if train_args.max_steps > 0:
        return train_args.max_steps
    return train_args.num_train_epochs * math.ceil(batches_per_epoch / train_args.gradient_accumulation_steps)


def build_optimizer_and_schedule(model, train_args, total_steps: int, num_processes: int):
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
    the run continues on exactly the batches it would have seen. Every step logs the loss and the
    scalars the model's output reports (MVAM's loss parts and logit scale, UARDA's threshold);
    ``validate(step)`` runs every ``eval_steps`` steps, and a checkpoint (with the processor) is
    saved every ``save_steps`` steps and at the end.
    """
    checkpoints = Path(args.output_dir) / CHECKPOINTS_DIR
    progress = tqdm(
        total=total_steps, initial=state.global_step, desc="training", disable=not accelerator.is_main_process
    )
    model.train()
    step_outputs = []  # of the batches of the current optimizer step
    while state.global_step < total_steps:
        loader.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = model(**batch, return_loss=True)
                accelerator.backward(outputs.loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            step_outputs.append({k: v.detach() for k, v in outputs.items() if torch.is_tensor(v) and v.dim() == 0})
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            logs = {
                f"train/{name}": accelerator.reduce(torch.stack([o[name] for o in step_outputs]).mean(), "mean").item()
                for name in step_outputs[0]
            }
            logs.update({"train/learning_rate": scheduler.get_last_lr()[0], "train/epoch": state.epoch})
            step_outputs.clear()
            state.log_history.append({"step": state.global_step, **logs})
            accelerator.log(logs, step=state.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
            if state.global_step % args.eval_steps == 0 and state.global_step < total_steps:
                validate(state)
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


def save_model_folder(folder: Path, model, processor, results, test_split, eval_split, dataset_name, args, state,
                      num_processes):
    """Model and processor (with their remote code), figures, eval results, the model card and the
    run's arguments: everything the Hub repository gets."""
    model_args, data_args, train_args = args
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    figures = save_figures(model, processor, test_split, folder, state.log_history)
    training = {
        "global_batch_size": num_processes * train_args.gradient_accumulation_steps * train_args.per_device_train_batch_size,
        "learning_rate": train_args.learning_rate,
        "weight_decay": train_args.weight_decay,
        "schedule": f"{train_args.warmup_steps} warm-up steps, cosine decay",
        "steps": state.global_step,
        "captions_per_image_per_epoch": "all" if data_args.all_pairs else 1,
        "mixed_precision": train_args.mixed_precision or "accelerate default",
        "seed": train_args.seed,
    }
    pretrained = {k: getattr(model_args, k) for k in ("vision_model_name_or_path", "text_model_name_or_path")}
    card = hub.build_model_card(
        model_type=model_args.model_type,
        model_name=train_args.hub_model_id or folder.name,
        eval_results=results,
        dataset_name=dataset_name,
        dataset_id=data_args.data if data_args.data and not os.path.exists(data_args.data) else None,
        dataset_split=eval_split,
        hyperparameters={**hub.describe_model(model), **{k: v for k, v in pretrained.items() if v}, **training},
        figures=figures,
        repo_id=train_args.hub_model_id or str(folder),
    )
    hub.write_model_folder_extras(folder, card, results)
    # training_args.json: every argument but the Hub token, local data paths made absolute (so
    # that check_folder.py finds the same data from anywhere), and the split the results come from.
    local = {k: os.path.abspath(getattr(data_args, k)) for k in ("data", "image_root")
             if getattr(data_args, k) and os.path.exists(getattr(data_args, k))}
    recorded = {
        "model": dataclasses.asdict(model_args),
        "data": {**dataclasses.asdict(data_args), **local},
        "training": {k: v for k, v in dataclasses.asdict(train_args).items() if k != "hub_token"},
        "eval_split": eval_split,
        "final_step": state.global_step,
    }
    (folder / TRAINING_ARGS_NAME).write_text(json.dumps(recorded, indent=2) + "\n")


def tracker_config(args) -> dict:
    """Every argument, as a scalar or a string, for the trackers (never the Hub token)."""
    flat = {k: v for group in args for k, v in dataclasses.asdict(group).items() if k != "hub_token"}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, float]:
    started = time.time()

    # 1. Parse the arguments; set up accelerate (CPU, many processes or GPUs), logging and the seed.
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

    # 2. Load the data: the synthetic benchmark, or the user's (bad items skipped and counted).
    splits, dataset_name, eval_split = load_data(data_args, accelerator)

    # 3. The processor and the model (a resumed run's processor comes from its checkpoint).
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
    state = load_checkpoint(accelerator, checkpoint) if checkpoint is not None else TrainerState()
    if checkpoint is not None:
        logger.info(f"resumed from {checkpoint} at step {state.global_step} (epoch {state.epoch})")

    # 4. Train, validating on the main process (the others wait).
    validation = splits["validation" if "validation" in splits else eval_split]

    def validate(state: TrainerState) -> None:
        if accelerator.is_main_process:
            results = evaluate_split(unwrapped, processor, validation, train_args.per_device_eval_batch_size)
            accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=state.global_step)
            state.log_history.append({"step": state.global_step, **{f"eval/{k}": v for k, v in results.items()}})
            logger.info(f"step {state.global_step}: validation rSum {results['rsum']:.2f}")
        accelerator.wait_for_everyone()

    logger.info(
        f"{model_args.model_type}: {sum(p.numel() for p in unwrapped.parameters()) / 1e6:.2f} M parameters, "
        f"{total_steps} steps of {accelerator.num_processes} process(es) x batch "
        f"{train_args.per_device_train_batch_size}, {len(splits['train'])} training images"
    )
    accelerator.init_trackers("hf_mvam", config=tracker_config(args))
    train(accelerator, model, optimizer, scheduler, loader, processor, state, total_steps, train_args, validate)

    results = {}
    if accelerator.is_main_process:
        # 5. Evaluate on the test split (or the validation split when there is none).
        test = splits[eval_split]
        results = evaluate_split(unwrapped, processor, test, train_args.per_device_eval_batch_size, progress=True)
        accelerator.log({f"test/{k}": v for k, v in results.items()}, step=state.global_step)

        # 6. Save the model folder: model, processor, figures, eval results, card, arguments.
        save_model_folder(output_dir, unwrapped, processor, results, test, eval_split, dataset_name, args, state,
                          accelerator.num_processes)

        # 7. Publish it on the Hub, if asked.
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
