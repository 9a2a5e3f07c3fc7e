"""Tests of the built-in synthetic benchmark (hf_mvam.data.synthetic).

The captions are checked against the scene and the pixels by an independent little parser:
every colour named is drawn, every object is named with its size, and every relation a caption
states holds for the object boxes.
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from hf_mvam.data import synthetic
from hf_mvam.data.synthetic import (
    RELATION_PHRASES,
    SIZE_SYNONYMS,
    SyntheticConfig,
    draw_scene,
    generate_synthetic_benchmark,
    minimal_pairs,
)

CONFIG = SyntheticConfig()
SIZES = dict(num_train=40, num_validation=10, num_test=160)
COUNT_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above", "next to": "next to"}


@pytest.fixture(scope="module")
def dataset():
    return generate_synthetic_benchmark(**SIZES, seed=0)


# -- an independent caption checker ---------------------------------------------------------


def _size_words(config):
    words = {}
    for name, _ in config.sizes:
        for word in SIZE_SYNONYMS.get(name, (name,)):
            words[word] = name
    return words


def _mention_pattern(config):
    sizes = "|".join(sorted(_size_words(config), key=len, reverse=True))
    colours = "|".join(name for name, _ in config.colours)
    shapes = "|".join(config.shapes)
    return re.compile(rf"\b(?:({sizes}) )?({colours}) ({shapes})\b")


def _phrase_pattern():
    phrases = sorted(((p, r) for r, ps in RELATION_PHRASES.items() for p in ps), key=lambda x: -len(x[0]))
    lookup = {p: r for p, r in phrases}
    pattern = re.compile(r"\b(" + "|".join(re.escape(p) for p, _ in phrases) + r")\b")
    return pattern, lookup


def box_relation_holds(a, relation, b, config):
    """Relation semantics on half-open boxes, written independently of the generator."""
    if relation == "left of":
        return a[2] <= b[0]
    if relation == "right of":
        return b[2] <= a[0]
    if relation == "above":
        return a[3] <= b[1]
    if relation == "below":
        return b[3] <= a[1]
    assert relation == "next to"
    gap_x = max(b[0] - a[2], a[0] - b[2])
    gap_y = max(b[1] - a[3], a[1] - b[3])
    limit = config.next_to_gap * config.image_size
    return max(gap_x, gap_y) >= 0 and gap_x <= limit and gap_y <= limit


def caption_problems(caption, scene, pixels, config=CONFIG):
    """Everything in ``caption`` that is false of (or missing from) the scene and its pixels."""
    problems = []
    text = caption.lower()
    objects = scene["objects"]
    by_name = {(o["colour"], o["shape"]): k for k, o in enumerate(objects)}
    size_words = _size_words(config)
    mentions = []
    for match in _mention_pattern(config).finditer(text):
        size_word, colour, shape = match.groups()
        k = by_name.get((colour, shape))
        if k is None:
            problems.append(f"names a {colour} {shape} that is not in the scene")
            continue
        if size_word is not None and size_words[size_word] != objects[k]["size"]:
            problems.append(f"calls the {colour} {shape} {size_word}")
        mentions.append((match.start(), match.end(), k, size_word))
    named = {k for _, _, k, _ in mentions}
    if named != set(range(len(objects))):
        problems.append(f"names {len(named)} of {len(objects)} objects")
    if {k for _, _, k, s in mentions if s} != named:
        problems.append("an object is never named with its size")
    for word, number in COUNT_WORDS.items():
        if re.search(rf"\b{word} (shapes|objects)\b", text) and number != len(objects):
            problems.append(f"says {word} objects")
    # Relations: a relation phrase between two consecutive mentions links them.
    pattern, lookup = _phrase_pattern()
    stated = set()
    for (_, end, a, _), (start, _, b, _) in zip(mentions, mentions[1:]):
        found = pattern.findall(text[end:start])
        if not found:
            continue
        relation = lookup[found[0]]
        stated.add((a, relation, b))
        if not box_relation_holds(objects[a]["box"], relation, objects[b]["box"], config):
            problems.append(f"states object {a} {relation} object {b}, which is false")
    expected = {tuple(r) for r in scene["relations"]}
    normalised = {(a, r, b) if (a, r, b) in expected else (b, INVERSE[r], a) for a, r, b in stated}
    if normalised != expected:
        problems.append(f"states relations {sorted(stated)}, scene lists {sorted(expected)}")
    # Colours named must be drawn, exactly (objects are filled without anti-aliasing).
    flat = pixels.reshape(-1, 3)
    for name, rgb in config.colours:
        if re.search(rf"\b{name}\b", text) and (flat == np.array(rgb)).all(axis=1).sum() < 10:
            problems.append(f"names {name}, which is not drawn")
    return problems


def _pixels(row):
    return np.asarray(row["image"].convert("RGB"))


# -- tests ----------------------------------------------------------------------------------


def test_split_sizes_columns_and_five_captions(dataset):
    assert set(dataset) == {"train", "validation", "test"}
    for split, n in zip(("train", "validation", "test"), (40, 10, 160)):
        part = dataset[split]
        assert part.num_rows == n
        assert part.column_names == ["image", "captions", "scene", "variant_of", "changed"]
        assert part.features == synthetic.synthetic_features()
        assert all(len(c) == 5 and len(set(c)) == 5 for c in part["captions"])
    row = dataset["test"][0]
    assert row["image"].size == (64, 64) and row["image"].mode == "RGB"


def test_default_test_split_is_flickr_sized():
    data = generate_synthetic_benchmark(num_train=0, num_validation=0, seed=3)
    test = data["test"]
    assert test.num_rows == 1000 and sum(len(c) for c in test["captions"]) == 5000
    assert data["train"].num_rows == 0 and data["validation"].num_rows == 0
    pairs = minimal_pairs(test)
    assert len(pairs) == 500  # every image belongs to a minimal pair by default
    kinds = [c for _, _, c in pairs]
    assert {k: kinds.count(k) for k in set(kinds)} == {"colour": 125, "shape": 125, "size": 125, "relation": 125}
    counts = [len(json.loads(s)["objects"]) for s in test["scene"]]
    assert set(counts) == {1, 2, 3, 4}


def test_deterministic_from_seed():
    from datasets import Image as ImageFeature

    sizes = dict(num_train=6, num_validation=4, num_test=8)
    a = generate_synthetic_benchmark(**sizes, seed=5)
    b = generate_synthetic_benchmark(**sizes, seed=5)
    c = generate_synthetic_benchmark(**sizes, seed=6)
    raw = {k: {s: d[s].cast_column("image", ImageFeature(decode=False)) for s in d} for k, d in zip("abc", (a, b, c))}
    for split in a:
        raw_a, raw_b, raw_c = raw["a"][split], raw["b"][split], raw["c"][split]
        assert [x["bytes"] for x in raw_a["image"]] == [x["bytes"] for x in raw_b["image"]]
        assert a[split]["captions"] == b[split]["captions"]
        assert a[split]["scene"] == b[split]["scene"] and a[split]["variant_of"] == b[split]["variant_of"]
        assert [x["bytes"] for x in raw_a["image"]] != [x["bytes"] for x in raw_c["image"]]
        assert a[split]["captions"] != c[split]["captions"]
    # Splits use independent streams: the test split does not depend on the train size.
    d = generate_synthetic_benchmark(num_train=9, num_validation=4, num_test=8, seed=5)
    assert d["test"]["captions"] == a["test"]["captions"]


def test_image_is_the_drawn_scene(dataset):
    for row in dataset["validation"]:
        scene = json.loads(row["scene"])
        assert np.array_equal(np.asarray(draw_scene(scene)), _pixels(row))
        size = scene["image_size"]
        boxes = [o["box"] for o in scene["objects"]]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        for i in range(len(boxes)):  # no overlaps: every pair is apart along some axis
            for j in range(i):
                a, b = boxes[i], boxes[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        # Background never uses an object colour.
        corner = _pixels(row)[0, 0]
        assert all(tuple(corner) != rgb for _, rgb in CONFIG.colours)


def test_captions_agree_with_scene_and_pixels(dataset):
    for split in ("train", "test"):
        for row in dataset[split]:
            scene = json.loads(row["scene"])
            pixels = _pixels(row)
            for name, rgb in CONFIG.colours:  # every object colour is drawn
                if any(o["colour"] == name for o in scene["objects"]):
                    assert (pixels.reshape(-1, 3) == np.array(rgb)).all(axis=1).sum() >= 10
            assert len(scene["relations"]) == len(scene["objects"]) - 1
            for a, relation, b in scene["relations"]:
                assert box_relation_holds(scene["objects"][a]["box"], relation, scene["objects"][b]["box"], CONFIG)
            for caption in row["captions"]:
                assert caption_problems(caption, scene, pixels) == [], caption


def test_minimal_pairs_differ_in_exactly_the_stated_change(dataset):
    for split in ("train", "test"):
        part = dataset[split]
        pairs = minimal_pairs(part)
        assert len(pairs) == part.num_rows // 2
        assert {c for _, _, c in pairs} == {"colour", "shape", "size", "relation"}
        assert all(part[j]["variant_of"] == -1 and part[j]["changed"] == "" for _, j, _ in pairs)
        for i, j, change in pairs:
            variant, base = part[i], part[j]
            s_var, s_base = json.loads(variant["scene"]), json.loads(base["scene"])
            assert s_var["background"] == s_base["background"]
            objs_v, objs_b = s_var["objects"], s_base["objects"]
            assert len(objs_v) == len(objs_b)
            diffs = [
                (k, {key for key in objs_b[k] if objs_b[k][key] != objs_v[k][key]}) for k in range(len(objs_b))
            ]
            diffs = [(k, keys) for k, keys in diffs if keys]
            if change in ("colour", "shape"):
                assert [keys for _, keys in diffs] == [{change}]
                assert s_var["relations"] == s_base["relations"]
            elif change == "size":
                assert [keys for _, keys in diffs] == [{"size", "box"}]
                (k, _), = diffs
                old, new = objs_b[k]["box"], objs_v[k]["box"]
                assert abs((old[0] + old[2]) - (new[0] + new[2])) <= 1  # same centre
                assert abs((old[1] + old[3]) - (new[1] + new[3])) <= 1
                assert s_var["relations"] == s_base["relations"]
            else:
                assert [keys for _, keys in diffs] == [{"box"}, {"box"}]
                (a, _), (b, _) = diffs
                # the two objects swapped places (centres exchanged, up to rounding)
                centre = lambda box: np.array([box[0] + box[2], box[1] + box[3]])  # noqa: E731
                assert np.abs(centre(objs_v[a]["box"]) - centre(objs_b[b]["box"])).max() <= 1
                assert np.abs(centre(objs_v[b]["box"]) - centre(objs_b[a]["box"])).max() <= 1
                # the base states a direction between them, and it is false in the variant
                (edge,) = [r for r in s_base["relations"] if {r[0], r[2]} == {a, b}]
                assert edge[1] != "next to"
                assert not box_relation_holds(objs_v[edge[0]]["box"], edge[1], objs_v[edge[2]]["box"], CONFIG)
            assert not set(variant["captions"]) & set(base["captions"])
            # each caption is true of its own image and false of its partner
            for caption in base["captions"]:
                assert caption_problems(caption, s_var, _pixels(variant)), (change, caption)
            for caption in variant["captions"]:
                assert caption_problems(caption, s_base, _pixels(base)), (change, caption)
            if change != "relation":  # caption k of the pair differs only in the changed word
                words = {
                    "colour": {n for n, _ in CONFIG.colours},
                    "shape": set(CONFIG.shapes),
                    "size": set(_size_words(CONFIG)),
                }[change]
                for c_var, c_base in zip(variant["captions"], base["captions"]):
                    w_var, w_base = c_var.lower().split(), c_base.lower().split()
                    assert len(w_var) == len(w_base)
                    changed = [(x, y) for x, y in zip(w_var, w_base) if x != y]
                    assert changed and all(x.strip(".,;:") in words and y.strip(".,;:") in words for x, y in changed)


def test_vocabulary_covers_captions(dataset):
    vocabulary = set(CONFIG.vocabulary())
    words = {w for c in dataset["test"]["captions"] for caption in c for w in re.findall(r"[a-z]+", caption.lower())}
    assert words <= vocabulary
    assert {"red", "circle", "left", "small"} <= vocabulary


def test_cache_round_trip(tmp_path, monkeypatch):
    sizes = dict(num_train=6, num_validation=2, num_test=4)
    first = generate_synthetic_benchmark(**sizes, seed=1, cache_dir=tmp_path)
    entries = os.listdir(tmp_path)
    assert len(entries) == 1 and entries[0].startswith("synthetic-")

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated instead of loading the cache")

    monkeypatch.setattr(synthetic.dataset, "_split_rows", no_generation)
    second = generate_synthetic_benchmark(**sizes, seed=1, cache_dir=tmp_path)
    for split in first:
        assert first[split]["captions"] == second[split]["captions"]
        assert first[split]["scene"] == second[split]["scene"]
        assert first[split]["variant_of"] == second[split]["variant_of"]
        assert [np.asarray(x).tobytes() for x in first[split]["image"]] == [
            np.asarray(x).tobytes() for x in second[split]["image"]
        ]
    with pytest.raises(AssertionError, match="regenerated"):  # other arguments -> another key
        generate_synthetic_benchmark(**sizes, seed=2, cache_dir=tmp_path)


def test_interrupted_write_leaves_no_cache(tmp_path, monkeypatch):
    from datasets import DatasetDict

    original = DatasetDict.save_to_disk

    def crash(self, path, **kwargs):
        original(self, path, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetDict, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_benchmark(num_train=2, num_validation=2, num_test=2, cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(DatasetDict, "save_to_disk", original)
    data = generate_synthetic_benchmark(num_train=2, num_validation=2, num_test=2, cache_dir=tmp_path)
    assert data["test"].num_rows == 2


def test_config_knobs():
    config = SyntheticConfig(
        image_size=96,
        min_objects=2,
        max_objects=3,
        colours={"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 50)},
        shapes=("circle", "hexagon"),
        sizes={"small": 0.15, "medium": 0.22, "large": 0.3},
        relations=("left of", "above"),
        changes=("size", "relation"),
        minimal_pair_fraction=0.25,
    )
    data = generate_synthetic_benchmark(num_train=0, num_validation=0, num_test=40, config=config)
    test = data["test"]
    assert sum(v >= 0 for v in test["variant_of"]) == 10
    assert set(test["changed"]) == {"", "size", "relation"}
    for row in test:
        scene = json.loads(row["scene"])
        assert row["image"].size == (96, 96)
        assert 2 <= len(scene["objects"]) <= 3
        assert {r for _, r, _ in scene["relations"]} <= {"left of", "above"}
        for caption in row["captions"]:
            assert caption_problems(caption, scene, _pixels(row), config) == [], caption
            assert not re.search(r"right of|below|under|beneath|lower|next to|beside|near", caption)
    assert "medium" in config.vocabulary() and "right" not in config.vocabulary()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_test=-1), "num_test"),
        (dict(num_train=-5), "num_train"),
        (dict(num_validation=1.5), "num_validation"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_sizes_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_synthetic_benchmark(**{**dict(num_train=1, num_validation=1, num_test=1), **kwargs})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(min_objects=3, max_objects=2), "max_objects"),
        (dict(min_objects=0), "min_objects"),
        (dict(relations=("left of", "inside")), "relations"),
        (dict(relations=("next to",)), "relations"),
        (dict(shapes=("circle", "blob")), "shapes"),
        (dict(changes=("texture",)), "changes"),
        (dict(minimal_pair_fraction=0.8), "minimal_pair_fraction"),
        (dict(backgrounds=((225, 35, 35),)), "backgrounds"),
        (dict(max_objects=12), "max_objects"),
        (dict(image_size=8), "image_size"),
    ],
)
def test_bad_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SyntheticConfig(**kwargs)


def test_config_must_be_a_synthetic_config():
    with pytest.raises(ValueError, match="config"):
        generate_synthetic_benchmark(num_train=1, num_validation=1, num_test=1, config={"image_size": 64})


def test_png_bytes_are_stored(dataset):
    from datasets import Image as ImageFeature

    raw = dataset["validation"].cast_column("image", ImageFeature(decode=False))[0]["image"]
    assert raw["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(raw["bytes"])).format == "PNG"
