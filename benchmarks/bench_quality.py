"""Quality on the built-in synthetic benchmark: each method against its own baseline, same data,
steps and seeds, plus the MVAM ablations.

Contenders (every one trained by the real training script, `training/run.py`, then evaluated on
the 1,000-image / 5,000-caption test split):
- quality: MVAM (K=4 + diversity) vs K=1 without diversity (CLIP-style); UARDA (`uarda`) vs
  SCAN (`scan`); R@1/5/10 both directions, rSum and minimal-pair accuracy, mean ± std over seeds;
- ablations (first seed): K = 1 / 2 / 4 / 8 views, diversity weight 0 vs the default at K = 4,
  with the view-overlap measure (mean squared cosine between the views' attention maps on
  test images and captions; 0 = disjoint, 1 = identical);
- retrieval time (first seed): the trained UARDA model's test fragments scored in scan mode and
  in uarda mode at its learned threshold, in this process (seconds, skipped word queries, rSum).

Usage: python benchmarks/bench_quality.py [--steps 200] [--seeds 0 1 2] [--tiny] [--out-dir DIR]
Writes benchmarks/results/quality.md/.json (and ablations into the same files); the trained
folders go to benchmarks/results/tmp/ (not committed) and their figures are copied next to the tables.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METRICS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]
PAIR_METRICS = ["t2i_pair_acc/colour", "t2i_pair_acc/shape", "t2i_pair_acc/size", "t2i_pair_acc/relation", "t2i_pair_acc/all"]

QUALITY = {  # name -> (baseline name or None, run.py flags)
    "K=1 (CLIP-style)": (None, ["--model_type", "mvam", "--num_views", "1", "--diversity_weight", "0"]),
    "MVAM K=4": ("K=1 (CLIP-style)", ["--model_type", "mvam", "--num_views", "4"]),
    "SCAN (scan mode)": (None, ["--model_type", "uarda", "--threshold_mode", "scan"]),
    "UARDA (uarda mode)": ("SCAN (scan mode)", ["--model_type", "uarda", "--threshold_mode", "uarda"]),
}
ABLATIONS = {
    "K=1, diversity 0": ["--model_type", "mvam", "--num_views", "1", "--diversity_weight", "0"],
    "K=2": ["--model_type", "mvam", "--num_views", "2"],
    "K=4": ["--model_type", "mvam", "--num_views", "4"],
    "K=8": ["--model_type", "mvam", "--num_views", "8"],
    "K=4, diversity 0": ["--model_type", "mvam", "--num_views", "4", "--diversity_weight", "0"],
}
TINY_FLAGS = [
    "--vision_config", json.dumps({"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                                   "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}),
    "--text_config", json.dumps({"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0}),
    "--num_train_images", "64", "--num_validation_images", "16", "--num_test_images", "24",
    "--per_device_train_batch_size", "16", "--warmup_steps", "1",
]


def train(name: str, flags: list[str], seed: int, args) -> dict:
    """Run training/run.py in a subprocess; returns its eval_results.json plus wall time."""
    output_dir = args.out_dir / "tmp" / f"{_slug(name)}-seed{seed}"
    command = [sys.executable, str(ROOT / "training" / "run.py"), *flags, "--seed", str(seed), "--max_steps", str(args.steps),
               "--output_dir", str(output_dir), "--eval_steps", str(10**9), "--save_steps", str(10**9), "--report_to", "none", "--overwrite_output_dir"]
    command += TINY_FLAGS if args.tiny else []
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{name} (seed {seed}) failed:\n{result.stderr[-3000:]}")
    metrics = json.loads((output_dir / "eval_results.json").read_text())
    metrics["wall_s"] = time.perf_counter() - start
    metrics["output_dir"] = str(output_dir)
    print(f"  {name} seed {seed}: rSum {metrics['rsum']:.1f} ({metrics['wall_s']:.0f} s)", flush=True)
    return metrics


@torch.no_grad()
def view_overlap(output_dir: str, num_examples: int = 200) -> dict:
    """Mean view overlap of a trained MVAM folder on test images and their first captions."""
    from hf_mvam import MVAMModel, MVAMProcessor
    from hf_mvam.losses import attention_overlap
    from hf_mvam.data.splits import load_recorded_eval_split

    model = MVAMModel.from_pretrained(output_dir).eval()
    processor = MVAMProcessor.from_pretrained(output_dir)
    test = load_recorded_eval_split(output_dir)[0].select(range(num_examples))
    batch = processor(text=[c[0] for c in test["captions"]], images=list(test["image"]))
    out = model(**batch, output_attentions=True)
    return {
        "image_overlap": attention_overlap(out.image_view_attentions).mean().item(),
        "text_overlap": attention_overlap(out.text_view_attentions, batch["attention_mask"]).mean().item(),
    }


@torch.no_grad()
def score_in_both_modes(output_dir: str, thresholds=()) -> dict:
    """A trained UARDA folder's test fragments, scored in scan mode and then in uarda mode at each
    of ``thresholds`` and at the threshold its RelevanceThreshold learned (ascending), one after
    the other in this process: seconds, skipped word queries and rSum of each."""
    from hf_mvam import UARDAModel, UARDAProcessor
    from hf_mvam.evaluation import encode_split
    from hf_mvam.metrics import retrieval_metrics
    from hf_mvam.data.splits import load_recorded_eval_split

    test = load_recorded_eval_split(output_dir)[0]
    model = UARDAModel.from_pretrained(output_dir).eval()
    encoded = encode_split(model, UARDAProcessor.from_pretrained(output_dir), test)
    learned = float(model.relevance_threshold.threshold)
    rows = []
    for mode, threshold in [("scan", None)] + [("uarda", t) for t in sorted({*thresholds, learned})]:
        model.config.threshold_mode = mode
        if threshold is not None:
            model.relevance_threshold.threshold.fill_(threshold)
        start = time.perf_counter()
        scores, stats = model.score(encoded.images, encoded.texts, return_stats=True)
        rows.append({"mode": mode, "threshold": threshold, "learned": threshold == learned,
                     "seconds": time.perf_counter() - start, "skipped": stats["t2i_skipped_fraction"],
                     "rsum": retrieval_metrics(scores, encoded.text_to_image)["rsum"]})
    return {"learned_threshold": learned, "rows": rows}


def retrieval_time(output_dir: str) -> dict:
    """Test-split retrieval with a trained UARDA folder: the same fragments scored in scan mode and
    in uarda mode at the threshold the model learned (seconds, skipped word queries, rSum)."""
    result = score_in_both_modes(output_dir)
    scan, uarda = result["rows"]
    return {"threshold": result["learned_threshold"], "scan": scan, "uarda": uarda}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (same for every contender)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip_ablations", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny towers and data, 2 steps: a smoke run")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.seeds = 2, args.seeds[:1]

    runs = {name: [] for name in QUALITY}
    for seed in args.seeds:  # seed-major order: an interrupted benchmark still has whole seeds
        for name, (_, flags) in QUALITY.items():
            runs[name].append(train(name, flags, seed, args))

    lines = [f"Synthetic benchmark, {args.steps} steps, seeds {args.seeds}{' [tiny]' if args.tiny else ''}; "
             "mean ± std over seeds (percent)", "",
             "| model | " + " | ".join(METRICS + PAIR_METRICS) + " | rSum vs baseline |",
             "|---|" + "---:|" * (len(METRICS) + len(PAIR_METRICS) + 1)]
    summary = {}
    for name, (baseline, _) in QUALITY.items():
        cells = [_mean_std([r[m] for r in runs[name]]) if m in runs[name][0] else "–" for m in METRICS + PAIR_METRICS]
        rsum = statistics.mean(r["rsum"] for r in runs[name])
        relative = ""
        if baseline is not None:
            base = statistics.mean(r["rsum"] for r in runs[baseline])
            relative = f"{100 * (rsum - base) / base:+.1f} %"
        summary[name] = {"rsum_mean": rsum, "relative_to_baseline": relative, "runs": runs[name]}
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {relative} |")
    lines += ["", "Targets: MVAM >= +5 % relative rSum over K=1; UARDA >= +10 % over scan mode."]

    # Retrieval time of a trained UARDA model: its own test fragments, both modes, same process.
    timing = retrieval_time(runs["UARDA (uarda mode)"][0]["output_dir"])
    summary["uarda retrieval time"] = timing
    scan, uarda = timing["scan"], timing["uarda"]
    lines += ["", f"Test-split retrieval with the trained UARDA model (seed {args.seeds[0]}, learned threshold "
              f"t = {timing['threshold']:.3f}), same fragments scored in both modes:", "",
              "| mode | seconds | word queries skipped | rSum |", "|---|---:|---:|---:|",
              f"| scan | {scan['seconds']:.1f} | {100 * scan['skipped']:.1f} % | {scan['rsum']:.1f} |",
              f"| uarda | {uarda['seconds']:.1f} | {100 * uarda['skipped']:.1f} % | {uarda['rsum']:.1f} |",
              "", f"uarda mode vs scan mode: {scan['seconds'] / uarda['seconds']:.2f}x faster."]

    if not args.skip_ablations:
        seed = args.seeds[0]
        reuse = {"K=1, diversity 0": runs["K=1 (CLIP-style)"][0], "K=4": runs["MVAM K=4"][0]}
        lines += ["", f"MVAM ablations (seed {seed}, {args.steps} steps)", "",
                  "| variant | rSum | R@1 i2t | R@1 t2i | t2i_pair_acc/all | image view overlap | text view overlap |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, flags in ABLATIONS.items():
            run = reuse.get(name) or train(name, flags, seed, args)
            run.update(view_overlap(run["output_dir"], num_examples=8 if args.tiny else 200))
            summary[f"ablation {name}"] = run
            lines.append(f"| {name} | {run['rsum']:.1f} | {run['i2t_R@1']:.1f} | {run['t2i_R@1']:.1f} | "
                         f"{run.get('t2i_pair_acc/all', float('nan')):.1f} | {run['image_overlap']:.3f} | {run['text_overlap']:.3f} |")

    table = "\n".join(lines)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "quality.md").write_text(table + "\n")
    (args.out_dir / "quality.json").write_text(json.dumps(summary, indent=2, default=str))
    if not args.tiny:  # keep one attention figure per method next to the tables
        for name, (_, _) in QUALITY.items():
            figures = Path(runs[name][0]["output_dir"]) / "figures"
            for png in figures.glob("*.png") if figures.is_dir() else []:
                shutil.copy(png, args.out_dir / f"{_slug(name)}-{png.name}")


if __name__ == "__main__":
    main()
