"""The splits ``training/run.py`` trains and evaluates on, and the same evaluation split loaded
again from what a model folder records (``training/check_folder.py``, the benchmarks)."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import datasets

from ..output_folder import read_local_paths
from .sources import load_image_caption_dataset
from .synthetic import default_cache_dir, generate_synthetic_benchmark

__all__ = ["SYNTHETIC_BENCHMARK_SEED", "TRAINING_ARGS_NAME", "load_recorded_eval_split", "load_splits"]

TRAINING_ARGS_NAME = "training_args.json"  # in the model folder: every argument of the run
SYNTHETIC_BENCHMARK_SEED = 0  # the benchmark stays the same whatever the training seed


def load_splits(
    data: str | None = None,
    image_root: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    num_train_images: int = 10_000,
    num_validation_images: int = 500,
    num_test_images: int = 1_000,
    allow_paths_outside_data_root: bool = False,
):
    """The splits to train and evaluate on, a readable name of the data, and the loader's statistics.

    Images come undecoded (``datasets.Image(decode=False)``): the processor decodes them.

    ``data=None`` gives the built-in synthetic benchmark (seed 0, cached under
    :func:`~hf_mvam.data.synthetic.default_cache_dir`) with the ``num_*_images`` sizes; otherwise
    :func:`~hf_mvam.data.sources.load_image_caption_dataset` loads ``data`` (its errors propagate;
    ``image_root``, the column names and ``allow_paths_outside_data_root`` are its arguments) and
    the statistics are its statistics (``None`` for the synthetic benchmark).
    """
    if data is None:
        splits = generate_synthetic_benchmark(
            num_train=num_train_images,
            num_validation=num_validation_images,
            num_test=num_test_images,
            seed=SYNTHETIC_BENCHMARK_SEED,
            cache_dir=default_cache_dir(),
        )
        # Undecoded, as the loaders give user data: every image goes through the one decoder.
        return splits.cast_column("image", datasets.Image(decode=False)), "hf-mvam synthetic benchmark", None
    splits, stats = load_image_caption_dataset(
        data,
        image_root=image_root,
        image_column=image_column,
        caption_column=caption_column,
        allow_paths_outside_data_root=allow_paths_outside_data_root,
    )
    return splits, data, stats


def load_recorded_eval_split(folder: str | os.PathLike, data: str | None = None, image_root: str | None = None):
    """The split a model folder written by ``training/run.py`` was evaluated on (cut to the run's
    ``max_eval_samples``), loaded again from the data settings its ``training_args.json`` records.

    ``training_args.json`` is uploaded, so it names local data by its file or folder name only; the
    path comes from ``data`` / ``image_root`` when given, else from the run's
    ``.hf_mvam/local_paths.json`` (kept on the machine that trained it, never uploaded).

    Returns:
        ``(split, dataset_name, recorded)``, ``recorded`` being the parsed ``training_args.json``.

    Raises:
        ValueError: the folder records only the name of its local data, and no path is known.
    """
    recorded = json.loads((Path(folder) / TRAINING_ARGS_NAME).read_text())
    # The data arguments also hold sampling options (all_pairs, ...): only load_splits' own count.
    parameters = inspect.signature(load_splits).parameters
    source = {k: v for k, v in recorded["data"].items() if k in parameters}
    local = read_local_paths(folder)
    for key, given in (("data", data), ("image_root", image_root)):
        source[key] = given or local.get(f"data.{key}", source.get(key))
    if recorded.get("local_data") and not (data or "data.data" in local):
        raise ValueError(f"{folder} records only the name of its local data ({source['data']!r}): pass --data "
                         "(and --image_root, if the run had one)")
    splits, dataset_name, _ = load_splits(**source)
    split = splits[recorded["eval_split"]]
    limit = recorded["data"].get("max_eval_samples")
    return (split.select(range(min(limit, len(split)))) if limit else split), dataset_name, recorded
