"""What trains the cross-attention matcher from scratch: pooling over the words, and where the
learned threshold acts (training or only retrieval).

bench_quality.py compares UARDA with SCAN at the config default, LogSumExp pooling over the
words (SCAN's t2i setting). This benchmark adds, for the first seed and the same steps:
- both modes trained with mean pooling over the words (``--aggregation mean``, SCAN's other
  setting and NAAF's), same data, steps and seed;
- the SCAN-trained (mean) model's test fragments scored in uarda mode at several thresholds
  (fixed values and the threshold the model's RelevanceThreshold learned alongside): does skipping
  word queries at retrieval cost accuracy on embeddings that trained well, and what does it save?
  All scorings run in this process, one after the other (seconds, skipped word queries, rSum).

Usage: python benchmarks/bench_uarda_training.py [--steps 200] [--seed 0] [--tiny] [--out-dir DIR]
Writes benchmarks/results/uarda_training.md/.json; the trained folders go to
benchmarks/results/tmp/ (not committed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_quality import RESULTS, score_in_both_modes, train

CONTENDERS = {  # name -> run.py flags
    "SCAN (scan mode), mean": ["--model_type", "uarda", "--threshold_mode", "scan", "--aggregation", "mean"],
    "UARDA (uarda mode), mean": ["--model_type", "uarda", "--threshold_mode", "uarda", "--aggregation", "mean"],
}
FIXED_THRESHOLDS = (0.1, 0.2, 0.4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (as bench_quality.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny towers and data, 2 steps: a smoke run")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.tiny:
        args.steps = 2

    runs = {name: train(name, flags, args.seed, args) for name, flags in CONTENDERS.items()}
    sweep = score_in_both_modes(runs["SCAN (scan mode), mean"]["output_dir"], FIXED_THRESHOLDS)

    lines = [f"Synthetic benchmark, {args.steps} steps, seed {args.seed}{' [tiny]' if args.tiny else ''}: both modes "
             "trained with mean pooling over the words (quality.md has the same seed with LogSumExp pooling, the default)",
             "", "| model | i2t R@1 | t2i R@1 | rSum | t2i_pair_acc/all |", "|---|---:|---:|---:|---:|"]
    for name, run in runs.items():
        lines.append(f"| {name} | {run['i2t_R@1']:.1f} | {run['t2i_R@1']:.1f} | {run['rsum']:.1f} | "
                     f"{run.get('t2i_pair_acc/all', float('nan')):.1f} |")
    scan_seconds = sweep["rows"][0]["seconds"]
    lines += ["", f"The SCAN-trained model (mean pooling) scored in uarda mode: its test fragments, scan mode "
              f"against uarda mode at fixed thresholds and at the threshold its RelevanceThreshold learned "
              f"alongside (t = {sweep['learned_threshold']:.3f}), one after the other in this process:", "",
              "| mode | threshold | word queries skipped | rSum | seconds | speed vs scan mode |",
              "|---|---:|---:|---:|---:|---:|"]
    for row in sweep["rows"]:
        threshold = "–" if row["threshold"] is None else f"{row['threshold']:.3f}{' (learned)' if row['learned'] else ''}"
        lines.append(f"| {row['mode']} | {threshold} | {100 * row['skipped']:.1f} % | {row['rsum']:.1f} | "
                     f"{row['seconds']:.1f} | {scan_seconds / row['seconds']:.2f}x |")

    table = "\n".join(lines)
    print(table)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "uarda_training.md").write_text(table + "\n")
    (args.out_dir / "uarda_training.json").write_text(json.dumps({"runs": runs, "sweep": sweep}, indent=2, default=str))


if __name__ == "__main__":
    main()
