"""Train, evaluate, checkpoint and publish an MVAM or UARDA image–text matching model.

    python training/run.py                                   # MVAM on the built-in synthetic benchmark
    python training/run.py --model_type uarda --output_dir outputs/uarda
    accelerate launch training/run.py --data path/to/dataset_flickr30k.json --image_root path/to/images
    accelerate launch --multi_gpu --num_processes 2 training/run.py --per_device_train_batch_size 64
    python training/run.py --model_name_or_path outputs/demo --data my_data --freeze_vision_model
    python training/run.py --do_eval --model_name_or_path outputs/demo --data my_data --output_dir outputs/eval
    python training/run.py my_options.yaml --max_steps 100   # options from a .json / .yaml file, then flags

Without ``--data`` it trains on the synthetic benchmark (generated once, then cached). ``main``
tells the story in numbered steps; ``python training/run.py --help`` lists every option
(``hf_mvam.arguments``). ``training/check_folder.py OUTPUT_DIR`` then reloads the folder in a fresh
process and checks it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from hf_mvam import hub
from hf_mvam.arguments import check_run_setting, one_line, parse_arguments, recorded_arguments, tracker_config
from hf_mvam.checkpointing import (
    CHECKPOINTS_DIR, TrainerState, config_changes, load_checkpoint, save_checkpoint, starting_checkpoint,
)
from hf_mvam.data.collate import CaptionPairSampler, ImageCaptionCollator, ImageCaptionPairs, flatten_captions
from hf_mvam.data.hard_negatives import HardNegativeGenerator
from hf_mvam.data.sources import data_warnings
from hf_mvam.data.splits import load_splits
from hf_mvam.metrics import summary_table
from hf_mvam.model_folder import (
    card_inputs, evaluate_on_every_process, log_figures, push_snapshot, save_model_folder, whole_model,
)
from hf_mvam.output_folder import OutputFolder, OutputFolderError
from hf_mvam.starting_model import build_model, build_processor, prepare_towers
from hf_mvam.streaming import StreamedPairs, load_streaming_splits

logger = get_logger("hf_mvam.run")


def fail(message: str):
    """Stop before training with a one-line message instead of a traceback."""
    raise SystemExit(f"run.py: error: {' '.join(str(message).split())}")


# --------------------------------------------------------------------------- setup


def make_accelerator(train_args) -> tuple[Accelerator, str]:
    """The Accelerator (CPU, many processes or GPUs) and the mixed precision that actually runs:
    a CPU has no fp16 autocast, so fp16 falls back to full precision there, with a warning."""
    on_cpu = not torch.accelerator.is_available()
    asked = train_args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    accelerator = Accelerator(
        # Without a GPU, `accelerate launch --multi_gpu` processes form a (gloo) process group only
        # when the Accelerator is told to use the CPU.
        cpu=on_cpu,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        mixed_precision="no" if on_cpu and asked == "fp16" else asked,
        log_with=train_args.report_to or None,
        project_config=ProjectConfiguration(project_dir=train_args.output_dir,
                                            logging_dir=os.path.join(train_args.output_dir, "logs")),
    )
    precision = accelerator.mixed_precision
    if on_cpu and asked == "fp16":
        logger.warning("--mixed_precision fp16 needs a GPU: training in full precision (a CPU autocasts bf16 only)")
        precision = "no (fp16 asked for; a CPU has no fp16 autocast)"
    return accelerator, precision


@contextlib.contextmanager
def output_folder_held(train_args, accelerator):
    """The output folder, locked by the main process for the whole block (``None`` elsewhere)."""
    folder, error = None, None
    if accelerator.is_main_process:
        folder = OutputFolder(train_args.output_dir, train_args.overwrite_output_dir)
        try:
            for path in folder.claim():
                logger.warning(f"--overwrite_output_dir: {path} in --output_dir was not written by a run; kept "
                               "unless the new model folder has a file of that name")
        except OutputFolderError as problem:
            error = str(problem)
    if error := broadcast_object_list([error])[0]:
        fail(error)
    try:
        yield folder
    finally:
        if folder is not None:
            folder.release()


# --------------------------------------------------------------------------- data


def load_data(data_args, train_args, accelerator: Accelerator):
    """The splits, and the name of the evaluation split. The main process loads (and caches)
    first, then the others read the cache."""
    with accelerator.main_process_first():
        try:
            if data_args.streaming:
                train, evaluation = load_streaming_splits(
                    data_args.data, data_args.image_column, data_args.caption_column, train_args.seed,
                    data_args.max_train_samples, data_args.max_eval_samples,
                    allow_paths_outside_data_root=data_args.allow_paths_outside_data_root,
                )
                splits = {"train": train, **evaluation}
            else:
                splits, _, stats = load_splits(**data_args.source())
                report_data(stats)
        except (ValueError, OSError) as error:
            fail(f"cannot load --data {data_args.name()}: {error}")
    if "train" not in splits or not {"test", "validation"} & set(splits):
        fail(
            f"the data needs a 'train' split and a 'test' or 'validation' split; it has {list(splits)}. "
            "Give an image folder train/ and test/ subfolders (each with its metadata file) or a "
            "'split' column in its metadata; a saved dataset or Hub dataset its splits"
        )
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples),
                         ("test", data_args.max_eval_samples)):
        if split in splits and not isinstance(splits[split], StreamedPairs):
            if limit is not None:
                splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
            if len(splits[split]) == 0:  # e.g. every image skipped: a wrong image_root
                fail(f"the {split} split has no usable image with a caption (see the skipped ones above)")
    return splits, "test" if "test" in splits else "validation"


def report_data(stats: dict | None) -> None:
    """Log what the loader counted, and a warning line per kind of problem it found (skipped
    images and captions, unknown split names, duplicate images, train images in an evaluation split)."""
    if stats is not None:
        logger.info(f"data: {stats['source']}, images {stats['num_images']}, captions {stats['num_captions']}")
        for line in data_warnings(stats):
            logger.warning(line)


def build_train_loader(train_split, processor, data_args, train_args) -> DataLoader:
    """Batches of (image, caption) pairs: one caption drawn per image per epoch, or all pairs, with
    each caption's hard negative when asked. Images are decoded and processed by
    ``--dataloader_num_workers`` worker processes."""
    workers = train_args.num_workers()
    hard_negatives = None
    if data_args.hard_negatives:
        if isinstance(train_split, StreamedPairs):
            fail("--hard_negatives draws replacement words from the whole training split: it cannot stream")
        hard_negatives = HardNegativeGenerator(flatten_captions(train_split)[0], seed=train_args.seed)
    common = dict(batch_size=train_args.per_device_train_batch_size,
                  collate_fn=ImageCaptionCollator(processor, hard_negatives=hard_negatives),
                  drop_last=True,  # equal batches on every process, as the gathered contrastive loss needs
                  num_workers=workers, persistent_workers=workers > 0)
    if isinstance(train_split, StreamedPairs):
        return DataLoader(train_split, **common)
    pairs = ImageCaptionPairs(train_split)
    sampler = CaptionPairSampler(pairs.captions_per_image, seed=train_args.seed, all_pairs=data_args.all_pairs)
    if len(sampler) < train_args.per_device_train_batch_size:
        fail(f"the train split has {len(sampler)} training pairs, fewer than "
             f"--per_device_train_batch_size {train_args.per_device_train_batch_size}")
    # Every new iterator draws a base seed: from a generator of its own it leaves the global RNG
    # (dropout) alone, so a run resumed mid-epoch draws exactly as the original did.
    return DataLoader(pairs, sampler=sampler, generator=torch.Generator().manual_seed(train_args.seed), **common)


def count_steps(loader: DataLoader, train_args, num_processes: int) -> int:
    """Optimizer steps of the run: --max_steps, or the epochs' worth for each process's share."""
    if train_args.max_steps > 0:
        return train_args.max_steps
    batches_per_epoch = len(loader) // num_processes
    if batches_per_epoch == 0:
        fail(f"the train split has too few pairs for {num_processes} process(es) x batch "
             f"{train_args.per_device_train_batch_size}")
    return train_args.num_train_epochs * math.ceil(batches_per_epoch / train_args.gradient_accumulation_steps)


def build_optimizer_and_schedule(model, train_args, total_steps: int, num_processes: int):
    """AdamW (no weight decay on biases, norms and scalars; frozen weights left out), linear
    warm-up, then --lr_scheduler_type. accelerate steps a prepared scheduler once per process at
    each optimizer step, so the schedule is laid out in process-steps (as in accelerate's examples)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": train_args.weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=train_args.learning_rate)
    scheduler = get_scheduler(train_args.lr_scheduler_type, optimizer, train_args.warmup_steps * num_processes,
                              total_steps * num_processes)
    return optimizer, scheduler


# --------------------------------------------------------------------------- training


def train(accelerator, model, optimizer, scheduler, loader, state: TrainerState, total_steps: int, args,
          validate, save):
    """The training loop, from ``state`` (fresh or resumed) to ``total_steps`` optimizer steps.

    Each epoch has its own seeded pair order; a resumed epoch skips the batches it had consumed, so
    the run continues on exactly the batches it would have seen. Gradients are clipped to
    ``max_grad_norm``. Every ``logging_steps`` steps the loss, the scalars the model's output
    reports (MVAM's loss parts and logit scale, UARDA's threshold) and the gradient norm are
    logged, averaged over those steps (tensor values are read only then); ``validate(state)`` runs
    every ``eval_steps`` steps, ``save(state)`` every ``save_steps`` steps and at the end.
    """
    progress = tqdm(total=total_steps, initial=state.global_step, desc="training", disable=not accelerator.is_main_process)
    model.train()
    window = []  # the 0-d outputs of every batch since the last log
    while state.global_step < total_steps:
        loader.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = model(**batch, return_loss=True)
                accelerator.backward(outputs.loss)
                scalars = {k: v.detach() for k, v in outputs.items() if torch.is_tensor(v) and v.dim() == 0}
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    scalars["grad_norm"] = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm).detach()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            window.append(scalars)
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            progress.update(1)
            if state.global_step % args.logging_steps == 0 or state.global_step == total_steps:
                names = dict.fromkeys(name for scalars in window for name in scalars)
                logs = {f"train/{name}": accelerator.reduce(torch.stack([s[name] for s in window if name in s]).mean(),
                                                            "mean").item() for name in names}
                logs.update({"train/learning_rate": scheduler.get_last_lr()[0], "train/epoch": state.epoch})
                window.clear()
                state.log_history.append({"step": state.global_step, **logs})
                accelerator.log(logs, step=state.global_step)
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
            if state.global_step % args.eval_steps == 0 and state.global_step < total_steps:
                validate(state)
            if state.global_step % args.save_steps == 0 or state.global_step == total_steps:
                save(state)
            if state.global_step == total_steps:
                break
        else:  # the epoch ran out
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, float]:
    started = time.time()

    # 1. Parse the arguments; set up accelerate, logging and the seed; hold the output folder.
    args = model_args, data_args, train_args = parse_arguments(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the DataLoader workers fork
    accelerator, precision = make_accelerator(train_args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    logging.getLogger("hf_mvam").setLevel(logging.INFO)
    try:
        check_run_setting(model_args, data_args, train_args, accelerator.num_processes)
    except ValueError as error:
        fail(error)
    set_seed(train_args.seed)
    output_dir = Path(train_args.output_dir)
    with output_folder_held(train_args, accelerator) as output:

        # 2. Load the data: the synthetic benchmark, the user's (bad items skipped and counted), or a stream.
        splits, eval_split = load_data(data_args, train_args, accelerator)

        # 3. The processor and the model: from scratch, on pretrained backbones, or a trained model to
        #    fine-tune (a resumed run's processor comes from its checkpoint); frozen or checkpointed towers.
        checkpoint = None
        try:
            if train_args.do_train:
                checkpoint = starting_checkpoint(accelerator, output_dir, train_args.resume_from_checkpoint,
                                                 train_args.overwrite_output_dir)
            processor = build_processor(model_args, splits["train"], accelerator, checkpoint)
            model = build_model(model_args, processor, splits["train"])
            prepare_towers(model, model_args, train_args)
        except (ValueError, OSError) as error:
            fail(one_line(error))
        if checkpoint is not None and (changes := config_changes(checkpoint, model.config)):
            fail(f"the model options differ from those of {checkpoint} ({'; '.join(changes)}): resume with the same ones")
        recorded = recorded_arguments(args)
        card = card_inputs(args, processor, eval_split, precision, accelerator.num_processes)
        unwrapped = model
        state = TrainerState()
        accelerator.init_trackers("hf_mvam", config=tracker_config(recorded))

        # 4. Train, validating (every process encodes and scores its share) and saving checkpoints.
        validation = splits["validation" if "validation" in splits else eval_split]

        def validate(state: TrainerState) -> None:
            results = evaluate_on_every_process(accelerator, model, processor, validation,
                                                train_args.per_device_eval_batch_size)
            if results is not None:
                accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=state.global_step)
                state.log_history.append({"step": state.global_step, **{f"eval/{k}": v for k, v in results.items()}})
                logger.info(f"step {state.global_step}: validation rSum {results['rsum']:.2f}")
            accelerator.wait_for_everyone()

        def save(state: TrainerState) -> None:
            save_checkpoint(accelerator, output_dir / CHECKPOINTS_DIR, state, train_args.save_total_limit, processor,
                            unwrapped.config)
            if train_args.hub_strategy == "every_save" and (saved := whole_model(accelerator, model)) is not None:
                push_snapshot(output_dir / CHECKPOINTS_DIR, saved, processor, card, recorded, state, train_args)

        if train_args.do_train:
            loader = build_train_loader(splits["train"], processor, data_args, train_args)
            total_steps = count_steps(loader, train_args, accelerator.num_processes)
            optimizer, scheduler = build_optimizer_and_schedule(model, train_args, total_steps, accelerator.num_processes)
            model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
            unwrapped = accelerator.unwrap_model(model)
            if checkpoint is not None:
                state = load_checkpoint(accelerator, checkpoint)
                logger.info(f"resumed from {checkpoint} at step {state.global_step} (epoch {state.epoch})")
            parameters = list(unwrapped.parameters())
            logger.info(f"{model_args.model_type}: {sum(p.numel() for p in parameters) / 1e6:.2f} M parameters "
                        f"({sum(p.numel() for p in parameters if p.requires_grad) / 1e6:.2f} M trained), {total_steps} "
                        f"steps of {accelerator.num_processes} process(es) x batch {train_args.per_device_train_batch_size} "
                        f"on {data_args.name()}")
            train(accelerator, model, optimizer, scheduler, loader, state, total_steps, train_args, validate, save)
        else:
            unwrapped.to(accelerator.device)

        # 5. Evaluate on the test split (or the validation split when there is none), the split's
        #    encoding and scoring shared by the processes.
        test = splits[eval_split]
        results = {}
        if train_args.do_eval:
            results = evaluate_on_every_process(accelerator, model, processor, test,
                                                train_args.per_device_eval_batch_size, progress=True) or {}
        final = whole_model(accelerator, model)
        if accelerator.is_main_process:
            if train_args.do_eval:
                accelerator.log({f"test/{k}": v for k, v in results.items()}, step=state.global_step)

            # 6. Save the model folder (model, processor, figures, results, card, arguments) in place of
            #    the old one at once; evaluating a trained model alone writes only its results.
            if train_args.do_train:
                def write(folder: Path) -> None:
                    figures = save_model_folder(folder, final, processor, results, test, card, recorded, state)
                    log_figures(accelerator, folder, figures, state.global_step)

                for path in output.replace_model_folder(write, recorded["local_paths"]):
                    logger.warning(f"--overwrite_output_dir: replaced {output_dir / path}, which no run had written")
            else:
                output.write_file("eval_results.json", json.dumps(results, indent=2))

            # 7. Publish the model folder on the Hub, if asked.
            if train_args.push_to_hub and train_args.do_train:
                url = hub.push_folder_to_hub(output_dir, train_args.hub_model_id, token=train_args.hub_token,
                                             private=train_args.hub_private_repo)
                logger.info(f"pushed {output_dir} to {url}")
            if results:
                what = model_args.model_name_or_path if not train_args.do_train else f"saved to {output_dir}"
                print(f"\n{model_args.model_type.upper()} on {data_args.name()} ({eval_split} split), {what}")
                print(summary_table(results, time.time() - started))
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
