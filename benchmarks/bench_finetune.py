"""MVAM as its paper uses it: fine-tuning a pretrained two-stream model (issue 22, part 2).

1. Pretraining data: the synthetic generator with another seed (``PRETRAIN_SEED``), disjoint from
   the benchmark (the script counts identical images between the two: 0 expected), saved with
   ``save_to_disk``.
2. The offline stand-in for CLIP: a K=1 dual encoder on pixels (the default ViT and BERT towers)
   trained there by `training/run.py`, its towers exported as ordinary transformers checkpoints
   (vision tower + image processor, text tower + tokenizer).
3. Fine-tuning on the benchmark through `training/run.py --vision_model_name_or_path ...
   --text_model_name_or_path ...`: K=1, MVAM K=4 with the diversity term and K=4 without it, the
   same steps, learning rate and seeds 0/1/2 (validation every ``steps / 5`` steps).
4. Tables: test recalls and rSum (mean ± std), rSum against the K=1 fine-tune per seed, minimal
   pairs, the validation curves, and the views' overlap (``hf_mvam.losses.attention_overlap`` on
   200 test images and their first captions; 0 = disjoint views, 1 = identical) with and
   without the diversity term.

Usage: python benchmarks/bench_finetune.py [--seeds 0 1 2] [--jobs 2] [--reuse] [--tiny] [--out-dir DIR]
Writes benchmarks/results/finetune.md/.json and figures; runs go to benchmarks/results/tmp/finetune/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from quality_runs import (
    RESULTS, TINY_TEXT_CONFIG, Run, curve_table, mean_std, pair_table, plot_curves, relative_gain, results_table,
    slug, train_all,
)

PRETRAIN_SEED = 1  # the benchmark is seed 0
PRETRAIN = {"num_train": 10_000, "num_validation": 500, "num_test": 500}
PRETRAIN_STEPS = 1500
FINETUNE = {  # name -> (baseline, run.py flags)
    "K=1 fine-tuned": (None, ["--num_views", "1", "--diversity_weight", "0"]),
    "MVAM K=4 + diversity, fine-tuned": ("K=1 fine-tuned", ["--num_views", "4", "--diversity_weight", "0.1"]),
    "MVAM K=4, no diversity, fine-tuned": ("K=1 fine-tuned", ["--num_views", "4", "--diversity_weight", "0"]),
}
FINETUNE_STEPS = 500
FINETUNE_LR = 2e-4
TINY_VISION_CONFIG = {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                      "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
TINY_FLAGS = ["--per_device_train_batch_size", "16", "--warmup_steps", "1", "--per_device_eval_batch_size", "64"]
TINY_DATA = ["--num_train_images", "48", "--num_validation_images", "16", "--num_test_images", "24"]


# --------------------------------------------------------------------------- 1. pretraining data


def pretraining_data(tiny: bool) -> tuple[Path, int]:
    """The pretraining split (saved once under the cache) and the number of its training images
    that also occur (same PNG bytes) in the benchmark the fine-tuning uses."""
    from hf_mvam.data.splits import SYNTHETIC_BENCHMARK_SEED
    from hf_mvam.data.synthetic import default_cache_dir, generate_synthetic_benchmark

    sizes = {"num_train": 48, "num_validation": 16, "num_test": 16} if tiny else PRETRAIN
    cache = Path(default_cache_dir()).parent / "pretraining"
    folder = cache / f"synthetic-seed{PRETRAIN_SEED}-{sizes['num_train']}"
    pretraining = generate_synthetic_benchmark(**sizes, seed=PRETRAIN_SEED, cache_dir=default_cache_dir())
    if not (folder / "dataset_dict.json").is_file():
        pretraining.select_columns(["image", "captions"]).save_to_disk(str(folder))
    benchmark_sizes = {"num_train": 48, "num_validation": 16, "num_test": 24} if tiny else {
        "num_train": 10_000, "num_validation": 500, "num_test": 1_000}
    benchmark = generate_synthetic_benchmark(**benchmark_sizes, seed=SYNTHETIC_BENCHMARK_SEED, cache_dir=default_cache_dir())

    def digests(split) -> set[str]:
        return {hashlib.sha256(image["bytes"]).hexdigest() for image in split.cast_column(
            "image", type(split.features["image"])(decode=False))["image"]}

    seen = set().union(*(digests(benchmark[name]) for name in benchmark))
    return folder, len(digests(pretraining["train"]) & seen)


# --------------------------------------------------------------------------- 2. the pretrained model


def pretrain(data: Path, args) -> tuple[Run, Path]:
    """Train the K=1 pixel dual encoder on the pretraining data, then export its towers."""
    steps = 2 if args.tiny else PRETRAIN_STEPS
    flags = ["--model_type", "mvam", "--num_views", "1", "--diversity_weight", "0", "--data", str(data),
             "--max_steps", str(steps), "--eval_steps", str(max(1, steps // 5)), "--save_steps", str(10**9),
             "--save_total_limit", "1"]
    if args.tiny:
        flags += ["--vision_config", json.dumps(TINY_VISION_CONFIG), "--text_config", json.dumps(TINY_TEXT_CONFIG),
                  *TINY_FLAGS]
    run = Run("K=1 pretrained (seed-1 data)", 0, flags, args.out_dir / "tmp" / "finetune" / "pretrained")
    train_all([run], 1, args.reuse)
    return run, export_towers(run.output_dir)


def export_towers(model_dir: Path) -> Path:
    """The model's vision tower with its image processor and its text tower with its tokenizer, as
    two ordinary transformers checkpoints (what ``--vision/text_model_name_or_path`` take)."""
    from hf_mvam import MVAMModel, MVAMProcessor

    model, processor = MVAMModel.from_pretrained(model_dir), MVAMProcessor.from_pretrained(model_dir)
    towers = model_dir.parent / "pretrained-towers"
    model.vision_model.save_pretrained(towers / "vision")
    processor.image_processor.save_pretrained(towers / "vision")
    model.text_model.save_pretrained(towers / "text")
    processor.tokenizer.save_pretrained(towers / "text")
    return towers


# --------------------------------------------------------------------------- 3. fine-tuning


def finetune_runs(towers: Path, seeds, args) -> list[Run]:
    steps = 2 if args.tiny else FINETUNE_STEPS
    runs = []
    for seed in seeds:
        for name, (_, flags) in FINETUNE.items():
            run_flags = ["--model_type", "mvam", *flags, "--vision_model_name_or_path", str(towers / "vision"),
                         "--text_model_name_or_path", str(towers / "text"), "--max_steps", str(steps),
                         "--learning_rate", str(FINETUNE_LR), "--eval_steps", str(max(1, steps // 5)),
                         "--save_steps", str(10**9), "--save_total_limit", "1", *(TINY_FLAGS + TINY_DATA if args.tiny else [])]
            runs.append(Run(name, seed, run_flags, args.out_dir / "tmp" / "finetune" / f"{slug(name)}-seed{seed}"))
    return runs


@torch.no_grad()
def view_overlap(output_dir: Path, test, num_examples: int) -> dict:
    """Mean view overlap of a trained MVAM folder on ``num_examples`` test images and their first captions."""
    from hf_mvam import MVAMModel, MVAMProcessor
    from hf_mvam.losses import attention_overlap

    model = MVAMModel.from_pretrained(output_dir).eval()
    processor = MVAMProcessor.from_pretrained(output_dir)
    rows = test.select(range(min(num_examples, len(test))))
    batch = processor(text=[c[0] for c in rows["captions"]], images=list(rows["image"]), return_tensors="pt")
    out = model(**batch, output_attentions=True)
    return {"image_overlap": attention_overlap(out.image_view_attentions).mean().item(),
            "text_overlap": attention_overlap(out.text_view_attentions, batch["attention_mask"]).mean().item()}


def write(out_dir: Path, name: str, table: str, record: dict) -> None:
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(table + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="training runs side by side (one thread each)")
    parser.add_argument("--reuse", action="store_true", help="read runs an identical command already finished")
    parser.add_argument("--tiny", action="store_true", help="tiny data and towers, 2 steps: a smoke run")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.tiny:
        args.seeds = args.seeds[:1]
    started = time.perf_counter()

    data, shared_images = pretraining_data(args.tiny)
    pretrained, towers = pretrain(data, args)
    pretrain_s = time.perf_counter() - started
    runs = finetune_runs(towers, args.seeds, args)
    train_all(runs, args.jobs, args.reuse)
    groups = {name: [run.result for run in runs if run.name == name] for name in FINETUNE}
    baselines = {name: spec[0] for name, spec in FINETUNE.items() if spec[0]}

    from hf_mvam.data.splits import load_splits

    sizes = {"num_train_images": 48, "num_validation_images": 16, "num_test_images": 24} if args.tiny else {}
    test = load_splits(None, **sizes)[0]["test"]
    for run in runs:
        if run.name != "K=1 fine-tuned":
            run.result.update(view_overlap(run.output_dir, test, 16 if args.tiny else 200))
    plot_curves(groups, args.out_dir / "finetune-validation_curves.png", "fine-tuning: validation rSum (one line per seed)")

    k1 = [r["rsum"] for r in groups["K=1 fine-tuned"]]
    mvam = [r["rsum"] for r in groups["MVAM K=4 + diversity, fine-tuned"]]
    wins = sum(100 * (m - b) / b >= 5 for m, b in zip(mvam, k1))
    steps = 2 if args.tiny else FINETUNE_STEPS
    cpu = {name: statistics.mean(r["cpu_s"] for r in results) for name, results in groups.items()}
    total_s = time.perf_counter() - started
    pretrained_rsum = pretrained.result["rsum"]
    lines = [
        f"Pretraining: K=1 dual encoder on pixels (default ViT + BERT towers), {2 if args.tiny else PRETRAIN_STEPS} "
        f"steps on the synthetic generator with seed {PRETRAIN_SEED} ({data.name}; {shared_images} of its training "
        f"images also in the benchmark); its own test rSum {pretrained_rsum:.1f}.", "",
        f"Fine-tuning on the benchmark from the exported towers: {steps} steps, batch {16 if args.tiny else 128}, "
        f"learning rate {FINETUNE_LR:g}, seeds {args.seeds}; mean ± std over the seeds (percent).", "",
        *results_table(groups, baselines), "",
        f"MVAM K=4 + diversity ≥ +5 % over K=1 on {wins} of {len(k1)} seeds (target: every seed).", "",
        "Minimal pairs, percent:", "", *pair_table(groups), "",
        "Validation rSum over fine-tuning (mean over seeds; figure finetune-validation_curves.png):", "",
        *curve_table(groups), "",
        "The diversity term at convergence: rSum and view overlap (mean squared cosine between the views' "
        "attention maps, 200 test images and their first captions; 0 = disjoint, 1 = identical):", "",
        "| variant | rSum | image view overlap | text view overlap |", "|---|---:|---:|---:|",
        *[f"| {name} | {mean_std([r['rsum'] for r in groups[name]])} | "
          f"{mean_std([r['image_overlap'] for r in groups[name]], 3)} | {mean_std([r['text_overlap'] for r in groups[name]], 3)} |"
          for name in FINETUNE if name != "K=1 fine-tuned"], "",
        f"Diversity vs none (rSum): {relative_gain(mvam, [r['rsum'] for r in groups['MVAM K=4, no diversity, fine-tuned']])}.", "",
        f"Time: pretraining {pretrain_s:.0f} s (CPU {pretrained.result['cpu_s']:.0f} s), fine-tuning {len(runs)} runs "
        f"({args.jobs} side by side; CPU per run: " + ", ".join(f"{n} {s:.0f} s" for n, s in cpu.items()) +
        f"); total {total_s:.0f} s.",
    ]
    record = {"pretraining": {"data": str(data), "shared_images": shared_images, "result": pretrained.result},
              "steps": steps, "learning_rate": FINETUNE_LR, "runs": groups, "seconds": total_s}
    write(args.out_dir, "finetune", "\n".join(lines), record)


if __name__ == "__main__":
    main()
