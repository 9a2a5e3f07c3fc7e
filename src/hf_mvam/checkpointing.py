"""Training checkpoints of ``training/run.py``: where a run stands, saved and restored exactly.

:func:`save_checkpoint` writes ``accelerator.save_state`` (weights, optimizer, scheduler, RNG
states), the processor and a small ``trainer_state.json`` (:class:`TrainerState`) into
``checkpoints/checkpoint_<step>`` *atomically*: everything goes into a hidden temporary sibling
first, which is then renamed, so a process killed while saving never leaves a half-written
checkpoint that :func:`latest_checkpoint` would pick. It keeps the newest ``total_limit``;
:func:`load_checkpoint` restores one. Checkpoints are saved under explicit paths (not accelerate's
automatic naming), so accelerate's iteration counter plays no part.

A checkpoint counts as complete only when its trainer state parses, its processor is there and it
holds model weights whose safetensors files are whole (:func:`checkpoint_problem`): a newest
checkpoint left corrupt (a full disk, a copy cut short) is passed over, with a warning naming it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTS_DIR",
    "PROCESSOR_DIR",
    "TRAINER_STATE_NAME",
    "TrainerState",
    "checkpoint_problem",
    "config_changes",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
    "stale_checkpoints",
    "starting_checkpoint",
]

CHECKPOINTS_DIR = "checkpoints"  # inside the output folder
CHECKPOINT_PREFIX = "checkpoint_"
TRAINER_STATE_NAME = "trainer_state.json"
PROCESSOR_DIR = "processor"  # inside every checkpoint: a trained tokenizer must come back as it was
CONFIG_NAME = "config.json"  # inside every checkpoint: the model's configuration, to resume with the same one
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


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (``None``: it is complete): no or unreadable
    ``trainer_state.json``, no processor, no model weights, or a safetensors file that does not
    open whole (a truncated file fails safetensors' own header and size checks)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(checkpoint)
    try:
        TrainerState.from_file(folder / TRAINER_STATE_NAME)
    except (OSError, ValueError, TypeError) as error:
        return f"{TRAINER_STATE_NAME} is missing or unreadable ({type(error).__name__})"
    if not (folder / PROCESSOR_DIR).is_dir():
        return f"no {PROCESSOR_DIR}/"
    # accelerate.save_state writes model.safetensors (model_<i> for more models); FSDP and DeepSpeed a folder.
    weights = [path for pattern in ("model*.safetensors", "pytorch_model*") for path in folder.glob(pattern)]
    if not weights:
        return "no model weights"
    for path in folder.glob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            return f"{path.name} is corrupt ({error})"
    return None


def list_checkpoints(checkpoints_dir: str | os.PathLike, warn: bool = False) -> list[Path]:
    """Complete checkpoints (``checkpoint_<step>`` that :func:`checkpoint_problem` accepts), oldest
    first; with ``warn``, log a warning naming each ``checkpoint_<step>`` passed over and why."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = sorted(
        (int(match.group(1)), path) for path in folder.iterdir() if (match := _CHECKPOINT_RE.match(path.name))
    )
    complete = []
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            complete.append(path)
        elif warn:
            logger.warning(f"passing over the checkpoint {path}: {problem}")
    return complete


def latest_checkpoint(checkpoints_dir: str | os.PathLike, warn: bool = False) -> Path | None:
    """The complete checkpoint with the highest step, or ``None``."""
    checkpoints = list_checkpoints(checkpoints_dir, warn=warn)
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
    accelerator, checkpoints_dir: str | os.PathLike, state: TrainerState, total_limit: int | None, processor,
    config=None,
) -> Path:
    """Save the full training state at ``state.global_step``; call on every process.

    Model, optimizer, scheduler, gradient-accumulation counter and every process's RNG states go
    through ``accelerator.save_state`` into ``.tmp-checkpoint_<step>``; the main process adds
    ``trainer_state.json``, the processor and the model's ``config`` (when given, so that a resumed
    run can check it builds the same model), and renames the folder to ``checkpoint_<step>``
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
        if config is not None:
            config.to_json_file(temporary / CONFIG_NAME)
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
    if (problem := checkpoint_problem(checkpoint)) is not None:
        raise ValueError(f"{checkpoint} is not a complete checkpoint: {problem}")
    accelerator.load_state(str(checkpoint))
    return TrainerState.from_file(checkpoint / TRAINER_STATE_NAME)


# Entries of a config that do not describe the model (they differ between saves of the same one).
_CONFIG_BOOKKEEPING = {"transformers_version", "_name_or_path", "architectures", "auto_map", "dtype", "torch_dtype"}


def config_changes(checkpoint: str | os.PathLike, config) -> list[str]:
    """How ``config`` differs from the model configuration ``checkpoint`` was saved with, as
    ``"name: saved -> now"`` lines (``[]`` when equal, or for a checkpoint without one)."""
    path = Path(checkpoint) / CONFIG_NAME
    if not path.is_file():
        return []
    saved, now = json.loads(path.read_text()), json.loads(config.to_json_string())
    changes = []
    for key in sorted(set(saved) | set(now)):
        if key in _CONFIG_BOOKKEEPING or saved.get(key) == now.get(key):
            continue
        if isinstance(saved.get(key), dict) and isinstance(now.get(key), dict):  # a backbone: name its fields
            changes += [f"{key}.{k}: {saved[key].get(k)!r} -> {now[key].get(k)!r}"
                        for k in sorted(set(saved[key]) | set(now[key]))
                        if k not in _CONFIG_BOOKKEEPING and saved[key].get(k) != now[key].get(k)]
        else:
            changes.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return changes


def starting_checkpoint(accelerator, output_dir: str | os.PathLike, resume_from_checkpoint: str | None,
                        overwrite: bool) -> Path | None:
    """The checkpoint a run resumes from: ``resume_from_checkpoint``'s folder, or with ``"latest"``
    the newest complete one in ``output_dir/checkpoints`` (``None``: start afresh; corrupt newer
    ones are passed over with a warning). The run refuses to start beside complete checkpoints it
    would not continue, unless ``overwrite`` deletes them; incomplete leftovers go on a fresh start.

    Raises:
        ValueError: an incomplete ``resume_from_checkpoint``, or checkpoints the run would not
            continue without ``overwrite``.
    """
    checkpoints = Path(output_dir) / CHECKPOINTS_DIR
    start = None
    if resume_from_checkpoint == "latest":
        start = latest_checkpoint(checkpoints, warn=accelerator.is_main_process)
    elif resume_from_checkpoint is not None:
        start = Path(resume_from_checkpoint)
        if (problem := checkpoint_problem(start)) is not None:
            raise ValueError(f"--resume_from_checkpoint {start} is not a complete checkpoint of training/run.py: {problem}")
    stale = stale_checkpoints(checkpoints, start)
    if stale and not overwrite:
        raise ValueError(
            f"{checkpoints} holds checkpoints this run would not continue ({', '.join(p.name for p in stale)}); "
            "pass --resume_from_checkpoint latest to continue the newest, or --overwrite_output_dir to delete them"
        )
    if accelerator.is_main_process:
        for path in stale:
            logger.warning(f"--overwrite_output_dir: removing {path}")
            shutil.rmtree(path)
        if start is None and checkpoints.exists():  # only incomplete leftovers remain
            shutil.rmtree(checkpoints)
    accelerator.wait_for_everyone()
    return start
