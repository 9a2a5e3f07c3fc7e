"""Run every benchmark and collect their tables into benchmarks/results/summary.md.

    python benchmarks/run_all.py            # the full set (make bench), 1-2 hours on 2 cores (benchmarks/README.md)
    python benchmarks/run_all.py --tiny     # every script in a seconds-long configuration (used by the tests)

Each benchmark runs its contenders side by side in one process and writes its own table
(<name>.md) and raw numbers (<name>.json) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHMARKS = [  # (script, extra flags, the table it writes)
    ("bench_uarda_scorer.py", [], "uarda_scorer"),
    ("bench_uarda_scorer.py", ["--coco"], "uarda_scorer_coco"),
    ("bench_mvam_speed.py", [], "mvam_speed"),
    ("bench_regions.py", [], "regions"),
    ("bench_finetune.py", [], "finetune"),
    ("bench_retrieval.py", [], "retrieval"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the tables (tiny runs: use a scratch folder)")
    args = parser.parse_args()
    sections = []
    for script, flags, name in BENCHMARKS:
        start = time.perf_counter()
        command = [sys.executable, str(HERE / script), *flags, "--out-dir", str(args.results), *(["--tiny"] if args.tiny else [])]
        print(f"== {script}", flush=True)
        subprocess.run(command, check=True)
        table = (args.results / f"{name}.md").read_text()
        sections.append(f"## {script} {' '.join(flags)} ({time.perf_counter() - start:.0f} s)\n\n{table}")
    (args.results / "summary.md").write_text("# Benchmark results\n\n" + "\n".join(sections))
    print(f"wrote {args.results / 'summary.md'}")


if __name__ == "__main__":
    main()
