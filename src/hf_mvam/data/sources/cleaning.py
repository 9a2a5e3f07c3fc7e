"""Cleaning a split in the common format: captions stripped and empty ones dropped, unusable images
(unreadable, missing, non-finite features, left without a caption) skipped with their reason."""

from __future__ import annotations

import datasets
import numpy as np

from ...image_loading import load_image
from .common import CAPTIONS_FEATURE


def drop_bad_examples(
    dataset: datasets.Dataset, split: str
) -> tuple[datasets.Dataset, list[tuple[str, str, str]], int]:
    """Strip captions, drop empty ones and skip images that are unusable or left uncaptioned.

    Returns:
        the cleaned split (``image`` still undecoded), the skipped images as
        ``(split, path or name, reason)``, and the number of dropped captions.
    """
    # Output types given, so that a first batch without any caption cannot make them null.
    features = datasets.Features(
        {
            **dataset.features,
            "captions": CAPTIONS_FEATURE,
            "_name": datasets.Value("string"),
            "_problem": datasets.Value("string"),
            "_dropped": datasets.Value("int64"),
        }
    )
    if "image_features" in dataset.column_names:
        checked = dataset.with_format(
            "numpy", columns=["image_features"], output_all_columns=True
        ).map(
            _check_features,
            input_columns=["image_features", "captions"],
            with_indices=True,
            batched=True,
            fn_kwargs={"split": split},
            features=features,
            desc=f"Checking {split} features",
        )
        checked = checked.with_format(None)
    else:
        checked = dataset.map(
            _check_images,
            input_columns=["image", "captions"],
            with_indices=True,
            batched=True,
            fn_kwargs={"split": split},
            features=features,
            desc=f"Checking {split} images",
        )
    report = checked.select_columns(["_name", "_problem", "_dropped"]).to_dict()
    problems = [
        (split, name, problem)
        for name, problem in zip(report["_name"], report["_problem"])
        if problem
    ]
    kept = checked.filter(
        _is_empty,
        input_columns="_problem",
        batched=True,
        desc=f"Skipping bad {split} examples",
    ).remove_columns(["_name", "_problem", "_dropped"])
    return kept, problems, sum(report["_dropped"])


def _check_images(images: list, captions: list, indices: list[int], split: str) -> dict[str, list]:
    """For a batch: cleaned captions, and why each image is unusable ("" when it is fine)."""
    out = _clean_captions(captions)
    out["_name"], out["_problem"] = [], []
    for image, kept, index in zip(images, out["captions"], indices):
        name = (image or {}).get("path") or f"{split}[{index}]"
        problem = ""
        try:
            load_image(image, name=name)  # decodes fully: catches corrupt and truncated files
        except ValueError as error:
            problem = str(error)
        if not problem and not kept:
            problem = "no caption left after dropping empty ones"
        out["_name"].append(name)
        out["_problem"].append(problem)
    return out


def _check_features(features, captions: list, indices: list[int], split: str) -> dict[str, list]:
    """For a batch of ``[R, D]`` feature arrays: cleaned captions and why each is unusable."""
    out = _clean_captions(captions)
    out["_name"], out["_problem"] = [], []
    for region_features, kept, index in zip(features, out["captions"], indices):
        problem = ""
        if region_features is None:
            problem = "no image features"
        elif not np.isfinite(np.asarray(region_features, dtype=np.float32)).all():
            problem = "image features contain NaN or infinite values"
        elif not kept:
            problem = "no caption left after dropping empty ones"
        out["_name"].append(f"{split}[{index}]")
        out["_problem"].append(problem)
    return out


def _clean_captions(captions: list[list[str]]) -> dict[str, list]:
    """Strip captions and drop empty ones; ``_dropped`` counts them per example."""
    cleaned = [[c.strip() for c in example if c and c.strip()] for example in captions]
    dropped = [len(example) - len(kept) for example, kept in zip(captions, cleaned)]
    return {"captions": cleaned, "_dropped": dropped}


def _is_empty(problems: list[str]) -> list[bool]:
    return [not problem for problem in problems]
