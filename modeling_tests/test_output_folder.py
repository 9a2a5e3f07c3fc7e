"""Output folders are never clobbered (issue 19): one run at a time, nothing a user put there
overwritten silently, the model folder replaced as a whole even when the process is killed, and a
corrupt newest checkpoint passed over."""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_mvam.checkpointing import TrainerState, latest_checkpoint, list_checkpoints
from hf_mvam import output_folder
from hf_mvam.output_folder import RUN_DIR, OutputFolder, OutputFolderError
from training_runs import FAST, SYNTHETIC, TINY, fake_checkpoint, synthetic_cache, train, weights  # noqa: F401

# The scripts below load output_folder.py alone (it needs only filelock): a process starts in 0.1 s.
LOAD = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("output_folder", {str(Path(output_folder.__file__))!r})
output_folder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(output_folder)
OutputFolder = output_folder.OutputFolder
"""
HOLD = LOAD + """
import time
folder = OutputFolder(sys.argv[1])  # held while the object lives
folder.claim()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_held_folder_stops_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for flags in ([], ["--overwrite_output_dir"]):  # overwriting never reaches a running run's files
            started = time.time()
            with pytest.raises(SystemExit) as stopped:
                train("--output_dir", out, *TINY, *SYNTHETIC, *FAST, *flags)
            message = str(stopped.value)
            assert message.startswith("run.py: error: --output_dir") and "\n" not in message
            assert f"in use by another run of training/run.py (pid {holder.pid} on {socket.gethostname()}" in message
            assert time.time() - started < 5  # before the data or the model is loaded
        assert sorted(p.name for p in out.iterdir()) == [RUN_DIR]
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone (its lock dies with it), the folder can be used again
    OutputFolder(out).claim()


def test_files_no_run_wrote_are_never_overwritten_silently(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my own notes\n")
    (out / "code").mkdir()
    (out / "code" / "prepare.py").write_text("print('mine')\n")
    with pytest.raises(SystemExit, match=r"holds files no run of training/run.py wrote \(README.md, code/prepare.py\)"):
        train("--output_dir", out, *TINY, *SYNTHETIC, *FAST)
    assert (out / "README.md").read_text() == "my own notes\n" and not (out / "config.json").exists()

    train("--output_dir", out, *TINY, *SYNTHETIC, *FAST, "--overwrite_output_dir")
    assert "trust_remote_code=True" in (out / "README.md").read_text()  # replaced, as asked
    assert (out / "code" / "prepare.py").read_text() == "print('mine')\n"  # kept: the run writes no such file
    written = set(json.loads((out / RUN_DIR / "written_files.json").read_text()))
    assert "README.md" in written and "model.safetensors" in written and "code/prepare.py" not in written


def test_a_kill_at_any_moment_leaves_a_complete_model_folder(tmp_path):
    """A process rewrites the model folder again and again (each version's files carry its number)
    and is killed with SIGKILL at random moments: every time, the folder is one whole version, with
    its checkpoints, and the next claim clears what the killed writer left beside it."""
    out = tmp_path / "out"
    writer = LOAD + """
import itertools
folder = OutputFolder(sys.argv[1])
folder.claim()
print("writing", flush=True)
for version in itertools.count():
    def write(staging, version=version):
        (staging / "figures").mkdir()
        for name in ("config.json", "model.safetensors", "eval_results.json", f"figures/v{version % 3}.png"):
            (staging / name).write_text(str(version) * 20_000)
    folder.replace_model_folder(write)
"""
    (out / "checkpoints" / "checkpoint_1").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint_1" / "model.safetensors").write_text("weights")
    rng = random.Random(0)
    versions = set()
    for _ in range(12):
        process = subprocess.Popen([sys.executable, "-c", writer, str(out)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "writing"
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not (out / "config.json").exists():  # killed before its first swap: the folder as it was
            assert not versions and sorted(p.name for p in out.iterdir()) == [RUN_DIR, "checkpoints"]
            continue
        contents = {(out / name).read_text() for name in ("config.json", "model.safetensors", "eval_results.json")}
        assert len(contents) == 1, "files of different versions side by side"
        text = contents.pop()
        version = int(text[: len(text) // 20_000])
        assert text == str(version) * 20_000  # whole, not cut short
        assert sorted(p.name for p in (out / "figures").iterdir()) == [f"v{version % 3}.png"]
        assert (out / "checkpoints" / "checkpoint_1" / "model.safetensors").read_text() == "weights"
        versions.add(version)
    assert len(versions) >= 2  # the kills fell at different moments
    OutputFolder(out).claim()
    assert not list(tmp_path.glob(".out.*"))  # staging folders of the killed writers are gone


def test_a_corrupt_newest_checkpoint_is_passed_over_with_a_warning(tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    good = fake_checkpoint(checkpoints, 2)
    for damage in ("truncated weights", "bad json", "no weights"):
        newest = fake_checkpoint(checkpoints, 4)
        if damage == "truncated weights":
            data = (newest / "model.safetensors").read_bytes()
            (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
        elif damage == "bad json":
            (newest / "trainer_state.json").write_text('{"global_step": 4,')
        else:
            (newest / "model.safetensors").unlink()
        caplog.clear()
        assert latest_checkpoint(checkpoints, warn=True) == good, damage
        assert any(f"passing over the checkpoint {newest}" in record.getMessage() for record in caplog.records), damage
        shutil.rmtree(newest)
    assert list_checkpoints(checkpoints) == [good]


def test_resuming_beside_a_corrupt_newest_checkpoint_continues_from_the_one_before(tmp_path, caplog):
    """The run resumes from checkpoint_2 when checkpoint_4's weights are cut short, and ends with
    the weights of the uninterrupted run; a changed --num_views is refused before any step."""
    first, second = tmp_path / "a", tmp_path / "b"
    train("--output_dir", first, *TINY, *SYNTHETIC, *FAST)
    shutil.copytree(first / "checkpoints", second / "checkpoints")
    cut = second / "checkpoints" / "checkpoint_4" / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=r"the model options differ from those of .*checkpoint_2 \(.*num_views: 4 -> 2"):
        train("--output_dir", second, *TINY, *SYNTHETIC, *FAST, "--resume_from_checkpoint", "latest", "--num_views", "2")
    caplog.set_level("INFO")
    train("--output_dir", second, *TINY, *SYNTHETIC, *FAST, "--resume_from_checkpoint", "latest")
    messages = [record.getMessage() for record in caplog.records]
    assert any("passing over the checkpoint" in m and "checkpoint_4: model.safetensors is corrupt" in m for m in messages)
    assert any("resumed from" in m and "checkpoint_2 at step 2" in m for m in messages)
    a, b = weights(first), weights(second)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_claim_refuses_others_files_and_replace_keeps_them(tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "events").write_text("curves")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match=r"\(notes.txt\)"):
        OutputFolder(out).claim()
    folder = OutputFolder(out, overwrite=True)
    assert folder.claim() == ["notes.txt"]

    def write(staging):
        (staging / "config.json").write_text("{}")
        (staging / "notes.txt").write_text("the run's")

    assert folder.replace_model_folder(write, {"data.data": "/somewhere"}) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "the run's" and (out / "logs" / "events").read_text() == "curves"
    assert json.loads((out / RUN_DIR / "local_paths.json").read_text()) == {"data.data": "/somewhere"}
    folder.release()
    assert OutputFolder(out).claim() == []  # every file is now a run's
