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
    for name in ("uarda_scorer", "uarda_scorer_coco", "mvam_speed", "regions", "finetune", "summary"):
        assert (tmp_path / f"{name}.md").stat().st_size > 0, name
    speed = json.loads((tmp_path / "mvam_speed.json").read_text())
    assert speed["ratios"]["encode_images_ratio"] > 0
    scorer = json.loads((tmp_path / "uarda_scorer.json").read_text())
    sweep = [row for row in scorer["rows"] if "(sweep)" in row["contender"]]
    assert len(sweep) == 3 and all(0 <= row["skipped_word_queries"] <= 1 for row in sweep)
    regions = json.loads((tmp_path / "regions.json").read_text())
    assert set(regions["runs"]) == {"K=1 dual encoder", "MVAM K=4 + diversity", "SCAN (scan mode)", "UARDA (uarda mode)",
                                    "MVAM K=4 + diversity + hard negatives", "K=1 dual encoder + hard negatives",
                                    "MVAM K=4, no diversity"}
    for name in ("MVAM K=4 + diversity", "MVAM K=4, no diversity"):  # the views' overlap, measured
        assert all(0 <= r["image_overlap"] <= 1 and 0 <= r["text_overlap"] <= 1 for r in regions["runs"][name])
    for results in regions["runs"].values():  # minimal pairs scored on the feature folder, both directions
        assert all(0 <= r["t2i_pair_acc/relation"] <= 100 and 0 <= r["i2t_pair_acc/all"] <= 100 for r in results)
        assert all(r["curve"] for r in results)  # the validation curve was read back
    timing = regions["retrieval_time"][0]["rows"]  # the trained UARDA model scored in both modes
    assert [row["mode"] for row in timing] == ["scan"] + ["uarda"] * (len(timing) - 1) and timing[1]["learned"]
    assert timing[0]["skipped"] == 0 and all(0 <= row["skipped"] <= 1 for row in timing)
    skipped = [row["skipped"] for row in timing[2:]]  # ascending retrieval thresholds
    assert skipped == sorted(skipped), "a higher threshold cannot skip fewer word queries"
    for figure in ("regions-mvam-view_attention_boxes", "regions-uarda-word_region_attention_boxes",
                   "regions-uarda-similarities", "regions-validation_curves", "finetune-validation_curves"):
        assert (tmp_path / f"{figure}.png").stat().st_size > 0, figure
    finetune = json.loads((tmp_path / "finetune.json").read_text())
    assert finetune["pretraining"]["shared_images"] == 0  # the pretraining data is disjoint from the benchmark
    assert (Path(finetune["pretraining"]["data"]) / "dataset_dict.json").is_file()
    for name, results in finetune["runs"].items():
        if name != "K=1 fine-tuned":
            assert all(0 <= r["image_overlap"] <= 1 and 0 <= r["text_overlap"] <= 1 for r in results)
    summary = (tmp_path / "summary.md").read_text()
    assert "| MVAM K=4 + diversity |" in summary and "| K=1 fine-tuned |" in summary
