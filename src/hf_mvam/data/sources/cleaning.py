"""Cleaning a split in the common format: captions stripped and empty ones dropped, unusable images
(outside the data root, missing, unreadable, non-finite features, left without a caption) skipped
with their reason."""

from __future__ import annotations

import hashlib
import os

import datasets
import numpy as np

from ...image_loading import load_image
from .common import CAPTIONS_FEATURE
from .paths import OUTSIDE_DATA_ROOT, DataRoot


def drop_bad_examples(
    dataset: datasets.Dataset, split: str, root: DataRoot
) -> tuple[datasets.Dataset, list[tuple[str, str, str]], int, list[tuple[str, str]]]:
    """Strip captions, drop empty ones and skip images that are unusable or left uncaptioned.

    An image stored as a path is checked against ``root`` before it is read; a kept one's path is
    replaced by its real path, the file that was checked.

    Returns:
        the cleaned split (``image`` still undecoded), the skipped images as
        ``(split, path or name, reason)``, the number of dropped captions, and for every kept
        image ``(name, sha256 of its encoded bytes)`` (empty for precomputed features).
    """
    # Output types given, so that a first batch without any caption cannot make them null.
    features = datasets.Features(
        {
            **dataset.features,
            "captions": CAPTIONS_FEATURE,
            "_name": datasets.Value("string"),
            "_problem": datasets.Value("string"),
            "_dropped": datasets.Value("int64"),
            "_sha256": datasets.Value("string"),
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
            fn_kwargs={"split": split, "root": root},
            features=features,
            desc=f"Checking {split} images",
        )
    report = checked.select_columns(["_name", "_problem", "_dropped", "_sha256"]).to_dict()
    problems = [
        (split, name, problem)
        for name, problem in zip(report["_name"], report["_problem"])
        if problem
    ]
    hashes = [
        (name, digest)
        for name, problem, digest in zip(report["_name"], report["_problem"], report["_sha256"])
        if digest and not problem
    ]
    kept = checked.filter(
        _is_empty,
        input_columns="_problem",
        batched=True,
        desc=f"Skipping bad {split} examples",
    ).remove_columns(["_name", "_problem", "_dropped", "_sha256"])
    return kept, problems, sum(report["_dropped"]), hashes


def _check_images(
    images: list, captions: list, indices: list[int], split: str, root: DataRoot
) -> dict[str, list]:
    """For a batch: cleaned captions, the images with checked real paths, why each image is
    unusable ("" when it is fine) and the sha256 of its bytes."""
    out = _clean_captions(captions)
    out["image"], out["_name"], out["_problem"], out["_sha256"] = [], [], [], []
    for image, kept, index in zip(images, out["captions"], indices):
        image = dict(image or {})
        name, problem, data = image.get("path") or f"{split}[{index}]", "", image.get("bytes")
        if not data and image.get("path"):  # read from a file: only inside the data root
            name, real = root.locate(image["path"])
            image["path"] = real
            if real is None:
                problem = OUTSIDE_DATA_ROOT
            elif not os.path.isfile(real):
                problem = f"image file not found: {name}"
            else:
                try:
                    with open(real, "rb") as file:
                        data = file.read()
                except OSError as error:
                    problem = f"cannot read image {name}: {error}"
        elif not data:
            problem = "no image"
        if not problem:
            try:
                load_image(data, name=name)  # decodes fully: catches corrupt and truncated files
            except ValueError as error:
                problem = str(error)
        if not problem and not kept:
            problem = "no caption left after dropping empty ones"
        out["image"].append(image)
        out["_name"].append(name)
        out["_problem"].append(problem)
        out["_sha256"].append(hashlib.sha256(data).hexdigest() if data and not problem else "")
    return out


def _check_features(features, captions: list, indices: list[int], split: str) -> dict[str, list]:
    """For a batch of ``[R, D]`` feature arrays: cleaned captions and why each is unusable."""
    out = _clean_captions(captions)
    out["_name"], out["_problem"], out["_sha256"] = [], [], []
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
        out["_sha256"].append("")
    return out


def _clean_captions(captions: list[list[str]]) -> dict[str, list]:
    """Strip captions and drop empty ones; ``_dropped`` counts them per example."""
    cleaned = [[c.strip() for c in example if c and c.strip()] for example in captions]
    dropped = [len(example) - len(kept) for example, kept in zip(captions, cleaned)]
    return {"captions": cleaned, "_dropped": dropped}


def _is_empty(problems: list[str]) -> list[bool]:
    return [not problem for problem in problems]
