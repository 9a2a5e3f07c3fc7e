"""What the quality benchmarks (bench_regions.py, bench_finetune.py) share: `training/run.py` runs in
subprocesses, one thread each and a few side by side, their validation curves, and mean ± std.

On a 2-core machine torch's default two threads per process ran 3-4x slower than one thread per
process (thread start-up and spin-waits on tiny tensors), so every run gets OMP_NUM_THREADS=1 and
``--jobs`` runs share the cores.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RECALLS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
ATTRIBUTES = ["colour", "shape", "size", "relation", "all"]
# A seconds-long text tower for the --tiny runs.
TINY_TEXT_CONFIG = {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "max_position_embeddings": 64, "pad_token_id": 0}
RUN_RECORD = "benchmark_run.json"  # in each run's folder: the command that made it (for --reuse)


@dataclass
class Run:
    """One training run: a contender's name, its seed, run.py's flags and the folder it writes."""

    name: str
    seed: int
    flags: list[str]
    output_dir: Path
    result: dict = field(default_factory=dict)


def run_training(run: Run, reuse: bool = False) -> dict:
    """Train and evaluate ``run`` with training/run.py in a subprocess (log in OUTPUT_DIR/train.log).

    Returns its eval_results.json plus ``wall_s``, ``cpu_s`` (the process's user + system time,
    which is what the run costs on a machine of its own) and ``curve`` (the validation rSum at
    every ``--eval_steps`` step). With ``reuse``, a folder that an identical command already
    completed is read instead of trained again.
    """
    command = [sys.executable, str(ROOT / "training" / "run.py"), *run.flags, "--seed", str(run.seed),
               "--output_dir", str(run.output_dir), "--report_to", "none", "--overwrite_output_dir",
               "--dataloader_num_workers", "0"]
    record = run.output_dir / RUN_RECORD
    if reuse and record.is_file() and json.loads(record.read_text())["command"] == command[1:]:
        return json.loads(record.read_text())["result"]
    run.output_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with open(run.output_dir / "train.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = (run.output_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"{run.name} (seed {run.seed}) failed, exit code {process.returncode}:\n{tail}")
    result = json.loads((run.output_dir / "eval_results.json").read_text())
    result.update(wall_s=round(time.perf_counter() - started, 1), cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
                  curve=validation_curve(run.output_dir))
    record.write_text(json.dumps({"command": command[1:], "result": result}, indent=2))
    return result


def train_all(runs: list[Run], jobs: int, reuse: bool = False) -> None:
    """Train every run, ``jobs`` at a time, in the order given (fill ``run.result``)."""

    def one(run: Run) -> None:
        run.result = {**run_training(run, reuse), "seed": run.seed}
        print(f"  {run.name} seed {run.seed}: rSum {run.result['rsum']:.1f} "
              f"({run.result['wall_s']:.0f} s wall, {run.result['cpu_s']:.0f} s CPU)", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, run) for run in runs]:
            future.result()


def validation_curve(output_dir: Path) -> list[list[float]]:
    """``[step, validation rSum]`` of every validation during the run, from the final checkpoint's
    trainer state (run.py validates every --eval_steps steps, not at the last one: the test split
    is scored there)."""
    states = sorted((output_dir / "checkpoints").glob("*/trainer_state.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return []
    history = json.loads(states[-1].read_text())["log_history"]
    return [[record["step"], record["eval/rsum"]] for record in history if "eval/rsum" in record]


def mean_std(values: list[float], digits: int = 1) -> str:
    """``mean ± std`` (sample std) of ``values``; one value alone."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def relative_gain(values: list[float], baseline: list[float]) -> str:
    """Relative difference of the means, in percent, and per seed (``values[i]`` and
    ``baseline[i]`` from the same seed)."""
    mean = 100 * (statistics.mean(values) - statistics.mean(baseline)) / statistics.mean(baseline)
    per_seed = ", ".join(f"{100 * (v - b) / b:+.1f}" for v, b in zip(values, baseline))
    return f"{mean:+.1f} % (per seed {per_seed})"


def same_seeds(results: list[dict], baseline: list[dict]) -> tuple[list[float], list[float]]:
    """The rSum of ``results`` and of ``baseline`` on the seeds both have, seed by seed."""
    by_seed = {r["seed"]: r["rsum"] for r in baseline}
    pairs = [(r["rsum"], by_seed[r["seed"]]) for r in results if r["seed"] in by_seed]
    return [v for v, _ in pairs], [b for _, b in pairs]


def results_table(groups: dict[str, list[dict]], baselines: dict[str, str]) -> list[str]:
    """Markdown rows: each contender's seeds, recalls, rSum (mean ± std over its seeds) and rSum
    against its baseline on the same seeds."""
    lines = ["| model | seeds | " + " | ".join(RECALLS) + " | rSum | vs baseline (same seeds) |",
             "|---|---|" + "---:|" * (len(RECALLS) + 2)]
    for name, results in groups.items():
        cells = [mean_std([r[m] for r in results]) for m in RECALLS + ["rsum"]]
        baseline = baselines.get(name)
        gain = f"{relative_gain(*same_seeds(results, groups[baseline]))} vs {baseline}" if baseline else ""
        seeds = ", ".join(str(r["seed"]) for r in results)
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {gain} |")
    return lines


def pair_table(groups: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: minimal-pair accuracy per changed attribute, text→image and image→text."""
    columns = [f"{direction}_pair_acc/{attribute}" for direction in ("t2i", "i2t") for attribute in ATTRIBUTES]
    lines = ["| model | " + " | ".join(c.replace("_pair_acc/", " ") for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, results in groups.items():
        cells = [mean_std([r[c] for r in results]) if c in results[0] else "–" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def curve_table(groups: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: the validation rSum at each validation step (mean over the seeds) and the
    test rSum at the last step."""
    steps = sorted({step for results in groups.values() for r in results for step, _ in r["curve"]})
    lines = ["| model | " + " | ".join(f"step {s}" for s in steps) + " | final (test) |",
             "|---|" + "---:|" * (len(steps) + 1)]
    for name, results in groups.items():
        by_step = [[value for r in results for step, value in r["curve"] if step == s] for s in steps]
        cells = [f"{statistics.mean(v):.1f}" if v else "–" for v in by_step]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(r['rsum'] for r in results):.1f} |")
    return lines


def plot_curves(groups: dict[str, list[dict]], path: Path, title: str) -> Path:
    """The validation rSum of every run over the steps (one colour per contender, one line per seed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, (name, results) in enumerate(groups.items()):
        for seed_index, result in enumerate(results):
            if result["curve"]:
                steps, values = zip(*result["curve"])
                axes.plot(steps, values, color=f"C{index}", alpha=0.8, marker=".",
                          label=name if seed_index == 0 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("validation rSum")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    return path


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")
