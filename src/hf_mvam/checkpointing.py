"""Training checkpoints of ``training/run.py``: where a run stands, saved and restored exactly.

:func:`save_checkpoint` writes ``accelerator.save_state`` (weights, optimizer, scheduler, RNG
states), the processor and a small ``trainer_state.json`` (:class:`TrainerState`) into
``checkpoints/checkpoint_<step>`` *atomically*: everything goes into a hidden temporary sibling
first, which is then renamed, so a process killed while saving never leaves a half-written
checkpoint that :func:`latest_checkpoint` would pick. It keeps the newest ``total_limit``;
:func:`load_checkpoint` restores one. Checkpoints are saved under explicit paths (not accelerate's
automatic naming), so accelerate's iteration counter plays no part.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CHECKPOINTS_DIR",
    "PROCESSOR_DIR",
    "TRAINER_STATE_NAME",
    "TrainerState",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "stale_checkpoints",
]

CHECKPOINTS_DIR = "checkpoints"  # inside the output folder
CHECKPOINT_PREFIX = "checkpoint_"
TRAINER_STATE_NAME = "trainer_state.json"
PROCESSOR_DIR = "processor"  # inside every checkpoint: a trained tokenizer must come back as it was
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


@dataclass
class TrainerState:
    """Where training stands; saved as ``trainer_state.json`` in every checkpoint.

    Attributes:
        global_step: optimizer steps taken.
        epoch: the current epoch (0-based).
        batch_in_epoch: batches of the current epoch already consumed (per process), skipped on resume.
        log_history: every logged record, ``{"step": N, "train/loss": ..., ...}``, oldest first
            (as transformers' ``TrainerState.log_history``); the figures draw curves from it.
    """

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    log_history: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TrainerState":
        return cls(**json.loads(Path(path).read_text()))


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (``checkpoint_<step>`` with a ``trainer_state.json``), oldest first."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _CHECKPOINT_RE.match(path.name)) and (path / TRAINER_STATE_NAME).is_file()
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or ``None``."""
    checkpoints = list_checkpoints(checkpoints_dir)
    return checkpoints[-1] if checkpoints else None


def stale_checkpoints(checkpoints_dir: str | os.PathLike, start: Path | None) -> list[Path]:
    """The complete checkpoints a run starting from ``start`` (``None``: a fresh start) would not
    continue: all of them on a fresh start or when ``start`` lies elsewhere, the later ones when
    it is one of them. They would shadow the run's own under 'latest' and outrank them when old
    ones are pruned, since both go by step."""
    existing = list_checkpoints(checkpoints_dir)
    resolved = [path.resolve() for path in existing]
    if start is not None and start.resolve() in resolved:
        return existing[resolved.index(start.resolve()) + 1 :]
    return existing


def save_checkpoint(
    accelerator, checkpoints_dir: str | os.PathLike, state: TrainerState, total_limit: int | None, processor
) -> Path:
    """Save the full training state at ``state.global_step``; call on every process.

    Model, optimizer, scheduler, gradient-accumulation counter and every process's RNG states go
    through ``accelerator.save_state`` into ``.tmp-checkpoint_<step>``; the main process adds
    ``trainer_state.json`` and the processor, and renames the folder to ``checkpoint_<step>``
    (replacing one of the same step), then deletes all but the newest ``total_limit`` complete
    checkpoints (by step; never the new one; ``None``: keep all).

    Returns:
        the path of the new checkpoint.
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
    temporary = checkpoints_dir / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a process killed while saving
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        processor.save_pretrained(temporary / PROCESSOR_DIR)
        (temporary / TRAINER_STATE_NAME).write_text(state.to_json())
        # A checkpoint of the same step (a run resumed from its last one saves that step again) is
        # renamed aside, not deleted, until the new one is in place: no moment without a complete one
        # but the one between two renames.
        replaced = checkpoints_dir / f".old-{final.name}"
        shutil.rmtree(replaced, ignore_errors=True)
        if final.exists():
            os.replace(final, replaced)
        os.replace(temporary, final)
        shutil.rmtree(replaced, ignore_errors=True)
        if total_limit is not None:
            for old in list_checkpoints(checkpoints_dir)[:-total_limit]:
                if old != final:  # never the one just written (run.py refuses later ones anyway)
                    shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: str | os.PathLike) -> TrainerState:
    """Restore a checkpoint written by :func:`save_checkpoint` (weights, optimizer, scheduler,
    accumulation counter, RNG states) and return its trainer state."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / TRAINER_STATE_NAME).is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {TRAINER_STATE_NAME})")
    accelerator.load_state(str(checkpoint))
    return TrainerState.from_file(checkpoint / TRAINER_STATE_NAME)
