"""The benchmark scripts run end to end in their tiny configuration, so they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_run_all_tiny_writes_every_table(tmp_path):
    env = {**os.environ, "HF_MVAM_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "benchmarks/run_all.py", "--tiny", "--results", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("uarda_scorer", "uarda_scorer_coco", "mvam_speed", "quality", "uarda_training", "summary"):
        assert (tmp_path / f"{name}.md").stat().st_size > 0, name
    speed = json.loads((tmp_path / "mvam_speed.json").read_text())
    assert speed["ratios"]["encode_images_ratio"] > 0
    quality = json.loads((tmp_path / "quality.json").read_text())
    assert set(quality) >= {"K=1 (CLIP-style)", "MVAM K=4", "SCAN (scan mode)", "UARDA (uarda mode)", "ablation K=8"}
    assert 0 <= quality["ablation K=8"]["image_overlap"] <= 1
    timing = quality["uarda retrieval time"]  # the trained UARDA model scored in both modes
    assert timing["scan"]["skipped"] == 0 and 0 <= timing["uarda"]["skipped"] <= 1
    scorer = json.loads((tmp_path / "uarda_scorer.json").read_text())
    sweep = [row for row in scorer["rows"] if "(sweep)" in row["contender"]]
    assert len(sweep) == 3 and all(0 <= row["skipped_word_queries"] <= 1 for row in sweep)
    training = json.loads((tmp_path / "uarda_training.json").read_text())
    assert set(training["runs"]) == {"SCAN (scan mode), mean", "UARDA (uarda mode), mean"}
    modes = [row["mode"] for row in training["sweep"]["rows"]]
    assert modes[0] == "scan" and modes.count("uarda") >= 3  # three fixed thresholds (+ the learned one)
    assert all(row["skipped"] == 0 for row in training["sweep"]["rows"] if row["mode"] == "scan")
    uarda_rows = [row for row in training["sweep"]["rows"] if row["mode"] == "uarda"]  # ascending thresholds
    skipped = [row["skipped"] for row in uarda_rows]
    assert skipped == sorted(skipped), "a higher threshold cannot skip fewer word queries"
    summary = (tmp_path / "summary.md").read_text()
    assert "| MVAM K=4 |" in summary and "rSum" in summary
