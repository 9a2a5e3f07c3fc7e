"""Helpers for the tests that run ``training/run.py`` in this process: the script as a module, a
``train(*argv)`` that resets accelerate between runs, and tiny settings (a run takes seconds)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file, save_file

from conftest import TINY_TEXT, TINY_VISION

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"training_{name}", REPO / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run = sys.modules.get("training_run") or load_script("run")

TINY = ["--vision_config", json.dumps(TINY_VISION), "--text_config", json.dumps(TINY_TEXT), "--projection_dim", "16"]
TINY_UARDA = ["--vision_config", json.dumps(TINY_VISION), "--text_config", json.dumps(TINY_TEXT), "--embed_dim", "16"]
SYNTHETIC = ["--num_train_images", "32", "--num_validation_images", "8", "--num_test_images", "16"]
FAST = ["--per_device_train_batch_size", "8", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2",
        "--warmup_steps", "1", "--learning_rate", "1e-3", "--report_to", "none", "--logging_steps", "1",
        "--dataloader_num_workers", "0"]


@pytest.fixture(scope="module", autouse=True)
def synthetic_cache(tmp_path_factory):
    """Keep the generated benchmark out of the user's cache (subprocesses inherit it too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_MVAM_CACHE", str(tmp_path_factory.mktemp("hf_mvam_cache")))
        yield


def train(*argv) -> dict:
    """run.py's main in this process; accelerate's process-wide state is reset afterwards."""
    try:
        return run.main([str(arg) for arg in argv])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def fake_checkpoint(checkpoints: Path, step: int) -> Path:
    """A complete checkpoint folder of ``step`` (state, processor folder, a 1 KB weights file)
    without training, for the checkpoint-selection tests."""
    from hf_mvam.checkpointing import TrainerState

    folder = checkpoints / f"checkpoint_{step}"
    (folder / "processor").mkdir(parents=True)
    (folder / "trainer_state.json").write_text(TrainerState(global_step=step).to_json())
    save_file({"weight": torch.ones(256)}, folder / "model.safetensors")
    return folder
