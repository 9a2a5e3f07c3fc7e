"""The pieces of ``training/run.py`` worth reading (and testing) on their own.

- Data: :func:`load_splits` and :func:`load_recorded_eval_split` live in :mod:`hf_mvam.data.splits`
  and are imported here.
- Loss: :func:`training_loss` of one batch, MVAM's with negatives gathered from every process.
- Checkpoints: :func:`save_checkpoint` writes ``accelerator.save_state`` (weights, optimizer,
  scheduler, RNG states), the processor and a small ``trainer_state.json`` (:class:`TrainerState`)
  into ``checkpoints/checkpoint_<step>`` *atomically*: everything goes into a hidden temporary
  sibling first, which is then renamed, so a process killed while saving never leaves a
  half-written checkpoint that :func:`latest_checkpoint` would pick. It keeps the newest
  ``total_limit``; :func:`load_checkpoint` restores one. Checkpoints are saved under explicit paths
  (not accelerate's automatic naming), so accelerate's iteration counter plays no part.
- The model folder: :func:`save_figures` (case-study figures), :func:`threshold_statistics` (what
  UARDA's learned threshold logs) and :func:`summary_table`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import visualization
from .data.splits import SYNTHETIC_BENCHMARK_SEED, TRAINING_ARGS_NAME, load_recorded_eval_split, load_splits  # noqa: F401 (re-exported)
from .losses import contrastive_loss

__all__ = [
    "TrainerState",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_recorded_eval_split",
    "load_splits",
    "save_checkpoint",
    "save_figures",
    "summary_table",
    "threshold_statistics",
    "training_loss",
]

CHECKPOINT_PREFIX = "checkpoint_"
TRAINER_STATE_NAME = "trainer_state.json"
PROCESSOR_DIR = "processor"  # inside every checkpoint: a trained tokenizer must come back as it was
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


# --------------------------------------------------------------------------- trainer state


@dataclass
class TrainerState:
    """Where training stands; saved as ``trainer_state.json`` in every checkpoint.

    Attributes:
        global_step: optimizer steps taken.
        epoch: the current epoch (0-based).
        batch_in_epoch: batches of the current epoch already consumed (per process), skipped on resume.
        threshold_history: UARDA: ``[step, threshold]`` after every step, for the trajectory figure.
    """

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    threshold_history: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TrainerState":
        return cls(**json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- checkpoints


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


def save_checkpoint(
    accelerator, checkpoints_dir: str | os.PathLike, state: TrainerState, total_limit: int | None, processor
) -> Path:
    """Save the full training state at ``state.global_step``; call on every process.

    Model, optimizer, scheduler, gradient-accumulation counter and every process's RNG states go
    through ``accelerator.save_state`` into ``.tmp-checkpoint_<step>``; the main process adds
    ``trainer_state.json`` and the processor (``processor/``: a tokenizer trained for the run
    must be reused as it was) and renames the folder to ``checkpoint_<step>`` (replacing one of the
    same step), then deletes all but the newest ``total_limit`` complete checkpoints (by step; never
    the new one; ``None``: keep all).

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


# --------------------------------------------------------------------------- the loss


def training_loss(model, unwrapped, batch: dict) -> torch.Tensor:
    """The training loss of one local batch (image ``b`` pairs with caption ``b``).

    MVAM: ``contrastive_loss(image_embeds, text_embeds, logit_scale, gather_distributed=True) +
    diversity_weight * diversity_loss``. The contrastive part takes its negatives from the batches
    of every process, with gradients (a no-op in one process), so W processes with batch B train
    exactly like one process with batch W*B. It is computed in float32 whatever the autocast dtype.

    UARDA: the model's own triplet loss (all in-batch negatives, or the hardest with max_violation), with the negatives of the local batch
    (its forward also updates the learned relevance threshold).

    Args:
        model: the model as prepared by accelerate (called, so DDP syncs its gradients).
        unwrapped: the same model without wrappers (for its config and logit scale).
        batch: the collated batch.
    """
    out = model(**batch, return_loss=True)
    if unwrapped.config.model_type == "uarda":
        return out.loss
    contrastive = contrastive_loss(
        out.image_embeds.float(), out.text_embeds.float(), unwrapped.logit_scale, gather_distributed=True
    )
    return contrastive + unwrapped.config.diversity_weight * out.diversity_loss.float()


# CLIP's cap on the contrastive inverse temperature exp(logit_scale): 100.
MAX_LOGIT_SCALE = math.log(100)


@torch.no_grad()
def clamp_logit_scale(unwrapped) -> None:
    """Keep MVAM's learned logit scale in [0, log 100] after an optimizer step (CLIP and
    open_clip do the same: an unbounded temperature makes the contrastive loss unstable).
    UARDA has no logit scale."""
    if unwrapped.config.model_type == "mvam":
        unwrapped.logit_scale.clamp_(0, MAX_LOGIT_SCALE)


def threshold_statistics(model) -> dict[str, float]:
    """UARDA's learned threshold and the Gaussians it separates (before the first fit the means
    and stds are NaN and left out)."""
    module = model.relevance_threshold
    names = ("threshold", "relevant_mean", "relevant_std", "irrelevant_mean", "irrelevant_std")
    values = {f"relevance/{name}": float(getattr(module, name)) for name in names}
    return {name: value for name, value in values.items() if math.isfinite(value)}


# --------------------------------------------------------------------------- the output folder


@torch.no_grad()
def save_figures(model, processor, split, folder: str | os.PathLike, threshold_history=()) -> list[str]:
    """Case-study figures of the first example of ``split`` under ``folder/figures``.

    MVAM: where each view looks in the image and its first caption
    (:func:`~hf_mvam.visualization.plot_view_attention`). UARDA: the relevant/irrelevant similarity
    histograms with the learned threshold (from the samples the threshold was fitted on), the
    threshold over training (from ``threshold_history``, ``[[step, threshold], ...]``) and each
    word's attention over the regions (images only, not precomputed features).

    Returns:
        the figure paths relative to ``folder`` (for the model card).
    """
    folder = Path(folder)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    example = split[0]
    caption = example["captions"][0]
    tokens = processor(text=[caption], return_tensors="pt").to(device)
    words = processor.tokenizer.convert_ids_to_tokens(tokens["input_ids"][0].tolist())
    image = example.get("image")
    written = []

    if model.config.model_type == "mvam":
        pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"].to(device)
        images = model.encode_images(pixel_values)
        texts = model.encode_texts(tokens["input_ids"], tokens["attention_mask"])
        written.append(
            visualization.plot_view_attention(
                image, images.view_attentions[0], images.grid_size, words, texts.view_attentions[0],
                folder / "figures" / "view_attention.png", title=caption,
            )
        )
    else:
        module = model.relevance_threshold
        seen = min(int(module.relevant_seen), int(module.irrelevant_seen), module.capacity)
        if seen > 0:
            fitted = math.isfinite(float(module.relevant_std))
            written.append(
                visualization.plot_relevance_histograms(
                    module.relevant_samples[:seen], module.irrelevant_samples[:seen], float(module.threshold),
                    folder / "figures" / "relevance_histograms.png",
                    relevant_stats=(float(module.relevant_mean), float(module.relevant_std)) if fitted else None,
                    irrelevant_stats=(float(module.irrelevant_mean), float(module.irrelevant_std)) if fitted else None,
                )
            )
        if threshold_history:
            steps, thresholds = zip(*threshold_history)
            written.append(
                visualization.plot_threshold_trajectory(steps, thresholds, folder / "figures" / "threshold_trajectory.png")
            )
        if image is not None:
            pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"].to(device)
            regions = model.encode_images(pixel_values=pixel_values)[0]  # [R, D]
            fragments, mask = model.encode_texts(tokens["input_ids"], tokens["attention_mask"])  # [1, L, D], [1, L]
            attention, relevant = model.word_region_attention(regions, fragments[0], mask[0])  # [L, R] each
            written.append(
                visualization.plot_word_region_attention(
                    image, words, attention, None, folder / "figures" / "word_region_attention.png",
                    threshold_mask=relevant, title=caption,
                )
            )
    model.train(was_training)
    return [path.relative_to(folder).as_posix() for path in written]


def summary_table(results: dict[str, float], wall_time_s: float) -> str:
    """A plain-text table of Recall@K, rSum, minimal-pair accuracies and the wall time."""
    rows = [("", "R@1", "R@5", "R@10")]
    for name, prefix in (("image→text", "i2t"), ("text→image", "t2i")):
        rows.append((name, *(f"{results[f'{prefix}_R@{k}']:.2f}" for k in (1, 5, 10))))
    width = max(len(row[0]) for row in rows)
    lines = ["  ".join(f"{cell:>{width if i == 0 else 6}}" for i, cell in enumerate(row)) for row in rows]
    lines.append(f"{'rSum':>{width}}  {results['rsum']:.2f}")
    if "coco1k_rsum" in results:
        lines.append(f"{'rSum 1K':>{width}}  {results['coco1k_rsum']:.2f} (COCO 5-fold 1K)")
    pairs = {key.split("/", 1)[1]: value for key, value in results.items() if key.startswith("pair_acc/")}
    if pairs:
        lines.append("minimal-pair accuracy (text→image): " + ", ".join(f"{k} {v:.1f}%" for k, v in pairs.items()))
    minutes, seconds = divmod(int(round(wall_time_s)), 60)
    lines.append(f"wall time: {minutes} min {seconds:02d} s")
    return "\n".join(lines)
