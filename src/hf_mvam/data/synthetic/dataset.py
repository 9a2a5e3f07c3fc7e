"""The benchmark as a ``datasets.DatasetDict``: balanced splits from independent seed streams, an
on-disk cache keyed by every argument, and the minimal pairs of a split."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from types import MappingProxyType

import numpy as np

from .config import SyntheticConfig
from .render import draw_scene, encode_png
from .scene import scene_family

#: Bump when the drawing or captioning changes, so old caches are not reused.
GENERATOR_VERSION = "1"


def synthetic_features():
    """The ``datasets.Features`` of every split."""
    from datasets import Features, Image as ImageFeature, List, Value

    return Features(
        {
            "image": ImageFeature(),
            "captions": List(Value("string")),
            "scene": Value("string"),
            "variant_of": Value("int64"),
            "changed": Value("string"),
        }
    )


_SPLIT_IDS = MappingProxyType({"train": 0, "validation": 1, "test": 2})


def _split_rows(name: str, n: int, seed: int, config: SyntheticConfig) -> dict[str, list]:
    """All rows of one split, as column lists."""
    split_id = _SPLIT_IDS[name]
    n_pairs = min(int(round(n * config.minimal_pair_fraction)), n // 2)
    n_single = n - 2 * n_pairs
    # Balanced change kinds: pair k changes changes[k % len(changes)].
    units = [config.changes[k % len(config.changes)] for k in range(n_pairs)] + [None] * n_single
    rows: list[dict] = []
    for k, change in enumerate(units):
        family = scene_family(config, (seed, split_id, k), change)
        for member, item in enumerate(family):
            item["unit"] = k
            item["change"] = change if member == 1 else ""
            item["is_variant"] = member == 1
            rows.append(item)
    # Shuffle the rows so partners are not neighbours; remember the base of each variant.
    permutation = np.random.default_rng(np.random.SeedSequence([seed, split_id, 2**31])).permutation(len(rows))
    position = {int(old): new for new, old in enumerate(permutation)}
    base_position = {row["unit"]: position[i] for i, row in enumerate(rows) if not row["is_variant"]}
    columns: dict[str, list] = {"image": [], "captions": [], "scene": [], "variant_of": [], "changed": []}
    for old in permutation:
        row = rows[int(old)]
        columns["image"].append({"bytes": encode_png(draw_scene(row["scene"], config)), "path": None})
        columns["captions"].append(row["captions"])
        columns["scene"].append(json.dumps(row["scene"], sort_keys=True, separators=(",", ":")))
        columns["variant_of"].append(base_position[row["unit"]] if row["is_variant"] else -1)
        columns["changed"].append(row["change"])
    return columns


def default_cache_dir() -> str:
    """``$HF_MVAM_CACHE/synthetic`` if that variable is set, else ``~/.cache/hf_mvam/synthetic``."""
    root = os.environ.get("HF_MVAM_CACHE")
    if root:
        return os.path.join(root, "synthetic")
    return os.path.join(os.path.expanduser("~"), ".cache", "hf_mvam", "synthetic")


def _cache_key(parameters: dict) -> str:
    text = json.dumps(parameters, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def generate_synthetic_benchmark(
    num_train: int = 10_000,
    num_validation: int = 500,
    num_test: int = 1_000,
    seed: int = 0,
    config: SyntheticConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """Generate (or load from cache) the synthetic benchmark as a ``datasets.DatasetDict``.

    The defaults give the Flickr30K protocol on the test split: 1,000 images × 5 captions.
    With the default ``minimal_pair_fraction`` of 0.5 every image of a split belongs to a
    minimal pair (half are bases, half variants, the kinds of change balanced).

    Args:
        num_train: images in the ``train`` split.
        num_validation: images in the ``validation`` split.
        num_test: images in the ``test`` split.
        seed: the seed; the same arguments give byte-identical images and captions. Splits use
            independent streams, so e.g. the test split does not change with ``num_train``.
        config: the :class:`SyntheticConfig` (defaults to ``SyntheticConfig()``).
        cache_dir: if given, the dataset is saved under ``cache_dir/synthetic-<hash of all
            arguments>`` and loaded from there next time (written to a temporary folder first,
            then renamed, so an interrupted run leaves no broken cache). See
            :func:`default_cache_dir` for the conventional location.

    Returns:
        ``DatasetDict`` with splits ``train``, ``validation``, ``test`` and columns ``image``,
        ``captions``, ``scene``, ``variant_of``, ``changed`` (see the module docstring).

    Raises:
        ValueError: a bad argument; the message names it.
    """
    from datasets import Dataset, DatasetDict, load_from_disk

    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    for name, value in [("num_train", num_train), ("num_validation", num_validation), ("num_test", num_test), ("seed", seed)]:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if config is None:
        config = SyntheticConfig()
    elif not isinstance(config, SyntheticConfig):
        raise ValueError(f"config must be a SyntheticConfig, got {type(config).__name__}")
    parameters = {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_validation": int(num_validation),
        "num_test": int(num_test),
        "seed": int(seed),
        "config": config.to_dict(),
    }

    target = None
    if cache_dir is not None:
        cache_dir = os.fspath(cache_dir)
        target = os.path.join(cache_dir, f"synthetic-{_cache_key(parameters)}")
        if os.path.isfile(os.path.join(target, "dataset_dict.json")):
            return load_from_disk(target)

    features = synthetic_features()
    dataset = DatasetDict(
        {name: Dataset.from_dict(_split_rows(name, int(n), int(seed), config), features=features) for name, n in sizes.items()}
    )
    if target is None:
        return dataset

    os.makedirs(cache_dir, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=".tmp-synthetic-", dir=cache_dir)
    try:
        dataset.save_to_disk(temporary)
        with open(os.path.join(temporary, "parameters.json"), "w") as handle:
            json.dump(parameters, handle, indent=2, sort_keys=True)
        try:
            os.rename(temporary, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "dataset_dict.json")):
                raise  # not a lost race with another writer
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return load_from_disk(target)


def minimal_pairs(dataset) -> list[tuple[int, int, str]]:
    """The minimal pairs of one split as ``(variant index, base index, changed)`` triples.

    Caption k of a variant and caption k of its base were phrased with the same random draws,
    so for colour, shape and size changes they differ only in the changed word.
    """
    variant_of = dataset["variant_of"]
    changed = dataset["changed"]
    return [(i, int(j), str(c)) for i, (j, c) in enumerate(zip(variant_of, changed)) if j >= 0]
