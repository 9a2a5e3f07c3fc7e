"""Figures for MVAM and UARDA case studies, saved as PNG files.

The functions take plain tensors or arrays (torch tensors are detached and moved to the CPU), so
this module does not depend on the model classes. Each function builds its own
:class:`matplotlib.figure.Figure` on an Agg canvas (no pyplot, no global backend switch, nothing
left open), saves it to ``path`` (parent folders are created) and returns ``path`` as a
:class:`pathlib.Path`.

- :func:`plot_view_attention` -- MVAM: where each of the K views looks in the image and the caption.
- :func:`plot_relevance_histograms` -- UARDA: relevant vs irrelevant word–region similarities and
  the learned threshold.
- :func:`plot_threshold_trajectory` -- UARDA: the learned threshold over training steps.
- :func:`plot_word_region_attention` -- UARDA: each word's attention over the image regions.
- :func:`plot_training_curves` -- both: the training loss and the validation rSum over the steps.
- :func:`save_figures` -- the case-study figures of a trained model, as every training run writes
  them into its model folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .image_loading import load_image

__all__ = [
    "plot_relevance_histograms",
    "plot_threshold_trajectory",
    "plot_training_curves",
    "plot_view_attention",
    "plot_word_region_attention",
    "save_figures",
]

_HEATMAP = "jet"
_DPI = 100


def plot_view_attention(
    image: Any,
    image_attention: Any,
    grid_size: tuple[int, int] | None,
    words: Sequence[str],
    text_attention: Any,
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """MVAM case study: what each of the K views attends to in an image and in its caption.

    The top row shows the image, then one heat map per view over the image (the view's attention
    over the patch/grid tokens, bilinearly upsampled to the image size and overlaid). The bottom
    panel is a K × L table of each view's weights over the caption's words.

    Args:
        image: the input image: anything :func:`~hf_mvam.image_loading.load_image` takes (a PIL
            image, a path, a ``datasets`` image dict, ...) or an H × W [× C] array.
        image_attention: [K, T_img] attention of each view over the image tokens. If
            T_img == h·w + 1 the first token is taken to be a CLS token and dropped.
        grid_size: (h, w) of the patch/grid tokens; ``None`` infers a square grid from T_img
            (T_img = n² or n² + 1).
        words: the caption's L words/tokens, padding already removed.
        text_attention: [K, L] attention of each view over the words.
        path: where to write the PNG.
        title: optional figure title.

    Raises:
        ValueError: non-2-D attentions, different K in the two attentions, T_img not matching
            the grid, or L not matching ``words``.
    """
    image_attention = _as_2d(image_attention, "image_attention")
    text_attention = _as_2d(text_attention, "text_attention")
    num_views = image_attention.shape[0]
    if text_attention.shape[0] != num_views:
        raise ValueError(
            f"image_attention has {num_views} views but text_attention has {text_attention.shape[0]} "
            f"(shapes {image_attention.shape} and {text_attention.shape})"
        )
    words = list(words)
    if text_attention.shape[1] != len(words):
        raise ValueError(
            f"text_attention has {text_attention.shape[1]} columns but words has {len(words)} entries"
        )
    maps = _to_grid(image_attention, grid_size, "image_attention")  # [K, h, w]
    rgb = _as_rgb(image)

    columns = num_views + 1
    width = max(2.3 * columns, 0.55 * len(words) + 2.0)
    table_height = 0.45 * num_views + 1.2
    fig = _figure((width, 2.6 + table_height))
    grid = fig.add_gridspec(2, columns, height_ratios=[2.6, table_height], hspace=0.35)

    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(rgb)
    ax.set_title("image", fontsize=9)
    ax.set_axis_off()
    for k in range(num_views):
        ax = fig.add_subplot(grid[0, k + 1])
        _overlay(ax, rgb, maps[k])
        ax.set_title(f"view {k + 1} (max {maps[k].max():.2f})", fontsize=9)

    ax = fig.add_subplot(grid[1, :])
    mesh = ax.imshow(text_attention, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(words)), labels=words, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(num_views), labels=[f"view {k + 1}" for k in range(num_views)], fontsize=8)
    if text_attention.size <= 200:
        threshold = (text_attention.max() + text_attention.min()) / 2
        for (k, i), value in np.ndenumerate(text_attention):
            color = "black" if value > threshold else "white"
            ax.text(i, k, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(mesh, ax=ax, fraction=0.03, pad=0.01)
    ax.set_title("view attention over the caption", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_relevance_histograms(
    relevant: Any,
    irrelevant: Any,
    threshold: float,
    path: str | os.PathLike,
    title: str | None = None,
    *,
    relevant_stats: tuple[float, float] | None = None,
    irrelevant_stats: tuple[float, float] | None = None,
    bins: int = 50,
) -> Path:
    """UARDA: histograms of relevant and irrelevant word–region similarities with the threshold.

    Both histograms share the bins and are density-normalised, so they are comparable with the
    fitted Gaussians drawn when ``relevant_stats`` / ``irrelevant_stats`` = (mean, std) are given.
    The learned threshold is a vertical line.

    Args:
        relevant: similarities of relevant word–region pairs (any shape; flattened, non-finite
            values dropped).
        irrelevant: similarities of irrelevant pairs.
        threshold: the learned relevance threshold.
        path: where to write the PNG.
        title: optional axes title.
        relevant_stats: optional (mean, std) of the Gaussian fitted to the relevant similarities.
        irrelevant_stats: optional (mean, std) for the irrelevant ones.
        bins: number of histogram bins.

    Raises:
        ValueError: both samples empty, a non-finite threshold, or stats that are not
            (mean, std > 0).
    """
    relevant = _finite_1d(relevant)
    irrelevant = _finite_1d(irrelevant)
    if relevant.size == 0 and irrelevant.size == 0:
        raise ValueError("relevant and irrelevant are both empty: nothing to plot")
    threshold = _scalar(threshold, "threshold")
    stats = {
        "relevant_stats": _check_stats(relevant_stats, "relevant_stats"),
        "irrelevant_stats": _check_stats(irrelevant_stats, "irrelevant_stats"),
    }

    values = np.concatenate([relevant, irrelevant, [threshold]])
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)

    fig = _figure((6.4, 4.0))
    ax = fig.add_subplot()
    series = (
        ("relevant", relevant, "tab:green", stats["relevant_stats"]),
        ("irrelevant", irrelevant, "tab:red", stats["irrelevant_stats"]),
    )
    for label, sample, color, fitted in series:
        if sample.size:
            ax.hist(sample, bins=edges, density=True, alpha=0.45, color=color, label=f"{label} (n={sample.size})")
        if fitted is not None:
            mean, std = fitted
            xs = np.linspace(low, high, 400)
            pdf = np.exp(-0.5 * ((xs - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
            ax.plot(xs, pdf, color=color, linewidth=1.5, label=f"N({mean:.2f}, {std:.2f}²)")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1.5, label=f"threshold t = {threshold:.3f}")
    ax.set_xlabel("word–region similarity")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    ax.set_title(title or "relevant vs irrelevant word–region similarities")
    return _save(fig, path)


def plot_threshold_trajectory(
    steps: Any,
    thresholds: Any,
    path: str | os.PathLike,
    title: str | None = None,
    *,
    baseline: float | None = 0.0,
) -> Path:
    """UARDA: the learned relevance threshold over training steps.

    Args:
        steps: [N] training steps.
        thresholds: [N] threshold value at each step.
        path: where to write the PNG.
        title: optional axes title.
        baseline: a reference threshold drawn as a dotted line (default 0, SCAN's fixed ReLU
            threshold); ``None`` draws none.

    Raises:
        ValueError: empty or non-1-D inputs, or ``steps`` and ``thresholds`` of different length.
    """
    steps = _as_array(steps, "steps").astype(float)
    thresholds = _as_array(thresholds, "thresholds").astype(float)
    if steps.ndim != 1 or thresholds.ndim != 1:
        raise ValueError(f"steps and thresholds must be 1-D, got shapes {steps.shape} and {thresholds.shape}")
    if steps.size != thresholds.size:
        raise ValueError(f"steps has {steps.size} entries but thresholds has {thresholds.size}")
    if steps.size == 0:
        raise ValueError("steps and thresholds are empty: nothing to plot")

    fig = _figure((6.4, 3.6))
    ax = fig.add_subplot()
    ax.plot(steps, thresholds, marker="o" if steps.size <= 50 else None, markersize=3, label="learned threshold")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle=":", label=f"fixed threshold {baseline:g}")
    ax.set_xlabel("training step")
    ax.set_ylabel("relevance threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "relevance threshold during training")
    return _save(fig, path)


def plot_training_curves(log_history: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """The training loss (left axis) and the validation rSum (right axis) over the steps, from a
    run's ``TrainerState.log_history`` records (``train/loss`` and ``eval/rsum`` entries).

    Raises:
        ValueError: no record has a ``train/loss``.
    """
    loss = [(record["step"], record["train/loss"]) for record in log_history if "train/loss" in record]
    rsum = [(record["step"], record["eval/rsum"]) for record in log_history if "eval/rsum" in record]
    if not loss:
        raise ValueError("log_history has no train/loss records: nothing to plot")
    fig = _figure((6.4, 3.6))
    ax = fig.add_subplot()
    steps, values = zip(*loss)
    ax.plot(steps, values, color="tab:blue", label="training loss")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.grid(alpha=0.3)
    if rsum:
        right = ax.twinx()
        steps, values = zip(*rsum)
        right.plot(steps, values, color="tab:orange", marker="o", markersize=3, label="validation rSum")
        right.set_ylabel("validation rSum", color="tab:orange")
    ax.set_title(title or "training loss and validation rSum")
    return _save(fig, path)


def plot_word_region_attention(
    image: Any,
    words: Sequence[str],
    attention: Any,
    grid_size: tuple[int, int] | None,
    path: str | os.PathLike,
    threshold_mask: Any = None,
    *,
    max_words: int = 8,
    title: str | None = None,
) -> Path:
    """UARDA: each word's attention over the image's region grid, overlaid on the image.

    One panel per word, for the first ``max_words`` words. Words with no region above the
    relevance threshold (skipped by UARDA) are shown greyed out with "skipped" in their title.

    Args:
        image: the input image: anything :func:`~hf_mvam.image_loading.load_image` takes (a PIL
            image, a path, a ``datasets`` image dict, ...) or an H × W [× C] array.
        words: the caption's L words.
        attention: [L, R] attention of each word over the R = h·w regions (R = h·w + 1 drops a
            leading CLS token).
        grid_size: (h, w) of the region grid; ``None`` infers a square grid.
        path: where to write the PNG.
        threshold_mask: optional booleans, True = above the threshold: either [L] (per word: was
            the word kept?) or [L, R] (per word–region pair; a word is skipped when its row has
            no True, and the kept regions are marked with dots).
        max_words: at most this many words are drawn.
        title: optional figure title.

    Raises:
        ValueError: ``attention`` rows not matching ``words``, regions not matching the grid, or a
            ``threshold_mask`` whose shape matches neither [L] nor [L, R].
    """
    attention = _as_2d(attention, "attention")
    words = list(words)
    if attention.shape[0] != len(words):
        raise ValueError(f"attention has {attention.shape[0]} rows but words has {len(words)} entries")
    if not words:
        raise ValueError("words is empty: nothing to plot")
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    maps = _to_grid(attention, grid_size, "attention")  # [L, h, w]
    h, w = maps.shape[1:]
    kept, region_mask = _word_mask(threshold_mask, attention.shape, (h, w))
    rgb = _as_rgb(image)

    shown = min(len(words), max_words)
    columns = min(shown, 4)
    rows = math.ceil(shown / columns)
    fig = _figure((2.5 * columns, 2.6 * rows + (0.4 if title or shown < len(words) else 0)))
    for i in range(shown):
        ax = fig.add_subplot(rows, columns, i + 1)
        if kept[i]:
            _overlay(ax, rgb, maps[i])
            ax.set_title(words[i], fontsize=10)
            if region_mask is not None:
                ys, xs = np.nonzero(region_mask[i])
                height, width = rgb.shape[:2]
                ax.scatter((xs + 0.5) * width / w, (ys + 0.5) * height / h, s=8, c="white", edgecolors="black")
        else:
            gray = rgb.mean(axis=2, keepdims=True).repeat(3, axis=2)
            ax.imshow(np.clip(0.35 * gray + 0.65 * 255, 0, 255).astype(np.uint8))
            ax.text(0.5, 0.5, "skipped", transform=ax.transAxes, ha="center", va="center", color="dimgray")
            ax.set_title(f"{words[i]} (skipped)", fontsize=10, color="gray")
            ax.set_axis_off()
    heading = title or ""
    if shown < len(words):
        heading = f"{heading} (first {shown} of {len(words)} words)".strip()
    if heading:
        fig.suptitle(heading)
    return _save(fig, path)


# --------------------------------------------------------------------------- helpers


def save_figures(model, processor, split, folder: str | os.PathLike, log_history: Sequence[dict] = ()) -> list[str]:
    """Case-study figures of the first example of ``split`` under ``folder/figures``, for the
    model's type (see ``_FIGURES``), and the training curves when ``log_history`` has them.

    Args:
        model: a trained hf-mvam model (figures are drawn in eval mode; its mode is restored).
        processor: its processor.
        split: a split with ``captions`` and ``image`` (or ``image_features``) columns.
        folder: the model folder.
        log_history: the run's logged records (``TrainerState.log_history``), for curves.

    Returns:
        the figure paths relative to ``folder`` (for the model card).
    """
    import torch

    folder = Path(folder)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            written = _FIGURES[model.config.model_type](model, processor, split[0], folder / "figures", log_history)
    finally:
        model.train(was_training)
    if any("train/loss" in record for record in log_history):
        written.append(plot_training_curves(log_history, folder / "figures" / "training_curves.png"))
    return [path.relative_to(folder).as_posix() for path in written]


def _example_inputs(model, processor, example):
    """The first caption's tokens and words, and the example's image inputs, on the model's device
    (``example["image"]`` is decoded in place, for drawing)."""
    device = next(model.parameters()).device
    caption = example["captions"][0]
    tokens = processor(text=[caption], return_tensors="pt").to(device)
    words = processor.tokenizer.convert_ids_to_tokens(tokens["input_ids"][0].tolist())
    if "image_features" in example:
        import torch

        images = {"image_features": torch.as_tensor(np.asarray(example["image_features"]))[None].to(device)}
    else:
        example["image"] = load_image(example["image"])
        images = {"pixel_values": processor(images=[example["image"]], return_tensors="pt")["pixel_values"].to(device)}
    return caption, tokens, words, images


def _mvam_figures(model, processor, example, figures: Path, log_history) -> list[Path]:
    """Where each view looks in the image and in its first caption (images only)."""
    if "image" not in example:
        return []
    caption, tokens, words, images = _example_inputs(model, processor, example)
    image = model.encode_images(**images, output_attentions=True)
    text = model.encode_texts(tokens["input_ids"], tokens["attention_mask"], output_attentions=True)
    return [
        plot_view_attention(
            example["image"], image.view_attentions[0], image.grid_size, words, text.view_attentions[0],
            figures / "view_attention.png", title=caption,
        )
    ]


def _uarda_figures(model, processor, example, figures: Path, log_history) -> list[Path]:
    """The relevant/irrelevant similarity histograms with the learned threshold (from the samples
    it was fitted on), the threshold over training, and each word's attention over the regions
    (images only)."""
    written = []
    module = model.relevance_threshold
    seen = min(int(module.relevant_seen), int(module.irrelevant_seen), module.capacity)
    if seen > 0:
        fitted = math.isfinite(float(module.relevant_std))
        written.append(
            plot_relevance_histograms(
                module.relevant_samples[:seen], module.irrelevant_samples[:seen], float(module.threshold),
                figures / "relevance_histograms.png",
                relevant_stats=(float(module.relevant_mean), float(module.relevant_std)) if fitted else None,
                irrelevant_stats=(float(module.irrelevant_mean), float(module.irrelevant_std)) if fitted else None,
            )
        )
    trajectory = [(record["step"], record["train/threshold"]) for record in log_history if "train/threshold" in record]
    if trajectory:
        steps, thresholds = zip(*trajectory)
        written.append(plot_threshold_trajectory(steps, thresholds, figures / "threshold_trajectory.png"))
    if "image" in example:
        caption, tokens, words, images = _example_inputs(model, processor, example)
        regions = model.encode_images(**images).image_fragments[0]  # [R, D]
        text = model.encode_texts(tokens["input_ids"], tokens["attention_mask"])
        attention, relevant = model.word_region_attention(regions, text.text_fragments[0], text.text_mask[0])  # [L, R]
        written.append(
            plot_word_region_attention(
                example["image"], words, attention, None, figures / "word_region_attention.png",
                threshold_mask=relevant, title=caption,
            )
        )
    return written


#: The figures of each model type.
_FIGURES = {"mvam": _mvam_figures, "uarda": _uarda_figures}


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI, bbox_inches="tight")
    fig.clear()
    return path


def _as_array(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch
        values = values.detach().cpu().float().numpy()
    try:
        return np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric, got {type(values).__name__}") from None


def _as_2d(values: Any, name: str) -> np.ndarray:
    array = _as_array(values, name)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {array.shape}")
    if array.size and not np.isfinite(array).all():
        raise ValueError(f"{name} contains non-finite values")
    return array


def _finite_1d(values: Any) -> np.ndarray:
    array = _as_array(values, "similarities").reshape(-1)
    return array[np.isfinite(array)]


def _scalar(value: Any, name: str) -> float:
    array = _as_array(value, name)
    if array.size != 1 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be one finite number, got {value!r}")
    return float(array.reshape(()))


def _check_stats(stats: Any, name: str) -> tuple[float, float] | None:
    if stats is None:
        return None
    array = _as_array(stats, name).reshape(-1)
    if array.size != 2 or not np.isfinite(array).all() or array[1] <= 0:
        raise ValueError(f"{name} must be (mean, std) with std > 0, got {stats!r}")
    return float(array[0]), float(array[1])


def _to_grid(attention: np.ndarray, grid_size: tuple[int, int] | None, name: str) -> np.ndarray:
    """[N, T] token attention -> [N, h, w] maps, dropping a leading CLS token when T = h·w + 1."""
    tokens = attention.shape[1]
    if grid_size is None:
        for candidate in (tokens, tokens - 1):
            side = math.isqrt(max(candidate, 0))
            if candidate > 0 and side * side == candidate:
                grid_size = (side, side)
                break
        else:
            raise ValueError(
                f"{name} has {tokens} tokens, which is neither n² nor n² + 1 (CLS); pass grid_size=(h, w)"
            )
    if len(grid_size) != 2 or min(grid_size) < 1:
        raise ValueError(f"grid_size must be (h, w) with positive sizes, got {grid_size!r}")
    h, w = (int(v) for v in grid_size)
    if tokens == h * w + 1:
        attention = attention[:, 1:]
    elif tokens != h * w:
        raise ValueError(f"{name} has {tokens} tokens, but grid_size {(h, w)} needs {h * w} (or {h * w + 1} with CLS)")
    return attention.reshape(-1, h, w)


def _word_mask(
    mask: Any, shape: tuple[int, int], grid: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-word kept flags and, for a per-region mask, the [L, h, w] region mask."""
    words, tokens = shape
    if mask is None:
        return np.ones(words, dtype=bool), None
    mask = _as_array(mask, "threshold_mask") != 0
    if mask.shape == (words,):
        return mask, None
    if mask.ndim == 2 and mask.shape[0] == words:
        h, w = grid
        if mask.shape[1] == h * w + 1 and tokens == h * w + 1:
            mask = mask[:, 1:]
        if mask.shape[1] == h * w:
            return mask.any(axis=1), mask.reshape(words, h, w)
    raise ValueError(
        f"threshold_mask has shape {mask.shape}, expected [{words}] (per word) or [{words}, {tokens}] (per region) "
        f"to match attention"
    )


def _as_rgb(image: Any) -> np.ndarray:
    if isinstance(image, (Image.Image, str, os.PathLike, bytes, dict)):
        return np.asarray(load_image(image))  # decoded as the processor decodes it
    array = _as_array(image, "image")
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = array.transpose(1, 2, 0)  # C × H × W tensor
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be a PIL image or an H × W [× 3] array, got shape {array.shape}")
    if array.max() <= 1.0:
        array = array * 255.0
    return np.clip(array, 0, 255).astype(np.uint8)


def _upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of an h × w map to (height, width)."""
    height, width = size
    as_image = Image.fromarray(grid.astype(np.float32))  # 32-bit float mode "F"
    resized = as_image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def _overlay(ax, rgb: np.ndarray, grid: np.ndarray) -> None:
    heat = _upsample(grid, rgb.shape[:2])
    low, high = float(heat.min()), float(heat.max())
    heat = (heat - low) / (high - low) if high - low > 1e-12 else np.zeros_like(heat)
    ax.imshow(rgb)
    ax.imshow(heat, cmap=_HEATMAP, alpha=0.5, vmin=0.0, vmax=1.0)
    ax.set_axis_off()
