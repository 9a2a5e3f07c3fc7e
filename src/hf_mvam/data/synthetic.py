"""A fine-grained synthetic image–caption benchmark with minimal pairs.

Small natural-looking retrieval sets saturate quickly (Recall@5 near 100 %) and cannot tell
retrieval methods apart. This module draws scenes of 1–4 coloured shapes whose five captions name
every object (colour, shape, size) and enough spatial relations to pin the layout down, and it
pairs many images with a *minimal-pair variant*: a copy that differs in exactly one attribute of
one object (colour, shape or size) or in one relation (two objects swap places, so "A left of B"
becomes "B left of A"). Telling such pairs apart needs fine detail, and the pairs give a
per-attribute accuracy beside Recall@K.

Everything is deterministic from a seed (``numpy`` ``SeedSequence`` / ``random.Random``
instances, no global random state): the same arguments give byte-identical PNGs and captions.

Entry points:

* :class:`SyntheticConfig` — the difficulty knobs (image size, object counts, colours, shapes,
  sizes, relations, minimal-pair fraction, backgrounds).
* :func:`generate_synthetic_benchmark` — a ``datasets.DatasetDict`` with ``train``,
  ``validation`` and ``test`` splits, optionally cached on disk.
* :func:`draw_scene` / :func:`scene_captions` — draw or caption one scene dictionary.

Column layout of every split:

``image``       ``datasets.Image()`` (PNG bytes, RGB, ``image_size`` × ``image_size``)
``captions``    list of exactly 5 strings
``scene``       JSON string: ``{"image_size", "background", "objects": [{"colour", "shape",
                "size", "box": [x0, y0, x1, y1]}], "relations": [[i, relation, j], ...]}``;
                boxes are half-open pixel boxes, ``[i, "left of", j]`` means objects[i] is left
                of objects[j]; these are the relations every caption states.
``variant_of``  int64: index, within the same split, of the image this one is a minimal-pair
                variant of; -1 if none
``changed``     ``"colour"``, ``"shape"``, ``"size"``, ``"relation"``, or ``""`` if none
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CHANGE_KINDS",
    "KNOWN_RELATIONS",
    "KNOWN_SHAPES",
    "RELATION_PHRASES",
    "SIZE_SYNONYMS",
    "SyntheticConfig",
    "default_cache_dir",
    "draw_scene",
    "generate_synthetic_benchmark",
    "minimal_pairs",
    "relation_holds",
    "scene_captions",
    "synthetic_features",
]

#: Bump when the drawing or captioning changes, so old caches are not reused.
GENERATOR_VERSION = "1"

KNOWN_SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")
KNOWN_RELATIONS = ("left of", "right of", "above", "below", "next to")
CHANGE_KINDS = ("colour", "shape", "size", "relation")

#: What each relation becomes when subject and object are swapped.
_INVERSE = MappingProxyType(
    {"left of": "right of", "right of": "left of", "above": "below", "below": "above", "next to": "next to"}
)

#: Ways a caption may phrase each relation (all mean the same thing for the checker).
RELATION_PHRASES = MappingProxyType(
    {
        "left of": ("left of", "to the left of", "on the left of"),
        "right of": ("right of", "to the right of", "on the right of"),
        "above": ("above", "over", "higher than"),
        "below": ("below", "under", "beneath", "lower than"),
        "next to": ("next to", "beside", "near"),
    }
)

#: Words a caption may use for each default size name (other size names are used as they are).
SIZE_SYNONYMS = MappingProxyType({"small": ("small", "little", "tiny"), "large": ("large", "big")})

_DEFAULT_COLOURS = (
    ("red", (220, 30, 30)),
    ("orange", (245, 140, 20)),
    ("yellow", (240, 225, 30)),
    ("green", (30, 160, 50)),
    ("cyan", (40, 210, 220)),
    ("blue", (30, 60, 220)),
    ("purple", (140, 50, 190)),
    ("pink", (250, 120, 190)),
)
_DEFAULT_SIZES = (("small", 0.2), ("large", 0.34))
# Neutral greys and near-greys: far from every default object colour.
_DEFAULT_BACKGROUNDS = (
    (25, 25, 25),
    (70, 72, 78),
    (120, 120, 120),
    (175, 172, 165),
    (215, 215, 220),
    (240, 236, 228),
)
_BACKGROUND_STYLES = ("plain", "noise", "gradient")
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

_INTROS_ONE = ("there is", "the image shows", "a picture of", "we can see", "one shape:", "a single shape:")
_SUFFIXES_ONE = ("", "", " on its own", " and nothing else")
_INTROS_MANY = (
    "there are {count} shapes:",
    "the image shows",
    "a picture of",
    "we can see",
    "{count} objects:",
    "this scene contains",
)
_STATEMENT_SEPARATORS = (". ", "; ", ", and ")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty knobs of the synthetic benchmark.

    Mappings given for ``colours`` and ``sizes`` are stored as tuples of pairs so that the
    config stays immutable and hashable. Every argument is checked; a bad one raises
    ``ValueError`` naming it.

    Args:
        image_size: width and height of the square images in pixels.
        min_objects: fewest objects in a scene (>= 1).
        max_objects: most objects in a scene (>= min_objects).
        colours: object colour names and their exact RGB fill (drawn without anti-aliasing, so
            an object's pixels have exactly this value).
        shapes: object shapes, a subset of :data:`KNOWN_SHAPES`.
        sizes: size names and the side of an object's box as a fraction of ``image_size``.
        relations: relations captions may state, a subset of :data:`KNOWN_RELATIONS`; at least
            one of left of / right of / above / below.
        changes: which minimal-pair kinds to make, a subset of :data:`CHANGE_KINDS`.
        minimal_pair_fraction: fraction of each split's images that are a minimal-pair variant of
            another image of the split, in [0, 0.5] (0.5: every image belongs to a pair).
        backgrounds: base RGB colours of the background; each must differ clearly from every
            object colour.
        background_styles: background kinds to draw from: "plain", "noise" (light grey noise)
            and "gradient" (a linear brightness ramp, with light noise).
        background_noise: standard deviation of the background noise, in grey levels.
        min_gap: smallest gap in pixels between two objects along the axis that separates them;
            every pair of objects is separated along an axis of a stated relation.
        next_to_gap: two objects are "next to" each other when their boxes are at most this
            fraction of ``image_size`` apart along both axes.
        next_to_probability: chance that a true "next to" is stated instead of a direction
            (never for the pair a relation variant swaps).
    """

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    colours: Any = _DEFAULT_COLOURS
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
    sizes: Any = _DEFAULT_SIZES
    relations: tuple[str, ...] = KNOWN_RELATIONS
    changes: tuple[str, ...] = CHANGE_KINDS
    minimal_pair_fraction: float = 0.5
    backgrounds: tuple[tuple[int, int, int], ...] = _DEFAULT_BACKGROUNDS
    background_styles: tuple[str, ...] = _BACKGROUND_STYLES
    background_noise: float = 6.0
    min_gap: int = 2
    next_to_gap: float = 0.15
    next_to_probability: float = 0.3

    def __post_init__(self) -> None:
        def freeze(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        freeze("colours", _pairs("colours", self.colours))
        freeze("sizes", _pairs("sizes", self.sizes))
        for name in ("shapes", "relations", "changes", "background_styles"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ValueError(f"{name} must be a sequence of strings, got {value!r}")
            freeze(name, tuple(value))
        freeze("backgrounds", tuple(tuple(int(c) for c in rgb) for rgb in self.backgrounds))
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {self.image_size!r}")
        if not isinstance(self.min_objects, int) or self.min_objects < 1:
            raise ValueError(f"min_objects must be an int >= 1, got {self.min_objects!r}")
        if not isinstance(self.max_objects, int) or self.max_objects < self.min_objects:
            raise ValueError(
                f"max_objects ({self.max_objects!r}) must be an int >= min_objects ({self.min_objects})"
            )
        _check_subset("shapes", self.shapes, KNOWN_SHAPES)
        _check_subset("relations", self.relations, KNOWN_RELATIONS)
        _check_subset("changes", self.changes, CHANGE_KINDS)
        _check_subset("background_styles", self.background_styles, _BACKGROUND_STYLES)
        if not set(self.relations) & {"left of", "right of", "above", "below"}:
            raise ValueError("relations must contain at least one of 'left of', 'right of', 'above', 'below'")
        for name, rgb in self.colours:
            if not re.fullmatch(r"[a-z]+", name):
                raise ValueError(f"colours: colour names must be single lower-case words, got {name!r}")
            if len(rgb) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in rgb):
                raise ValueError(f"colours: {name!r} must map to three ints in 0..255, got {rgb!r}")
        if len({rgb for _, rgb in self.colours}) != len(self.colours):
            raise ValueError("colours: two colour names share the same RGB value")
        if len(self.colours) * len(self.shapes) < self.max_objects:
            raise ValueError(
                "colours/shapes: too few colour-shape combinations for max_objects distinct objects"
            )
        for name, fraction in self.sizes:
            if not re.fullmatch(r"[a-z]+", name):
                raise ValueError(f"sizes: size names must be single lower-case words, got {name!r}")
            if not (isinstance(fraction, (int, float)) and 0 < fraction <= 0.5):
                raise ValueError(f"sizes: {name!r} must map to a fraction in (0, 0.5], got {fraction!r}")
            if round(fraction * self.image_size) < 5:
                raise ValueError(f"sizes: {name!r} is under 5 pixels at image_size {self.image_size}")
        if len({self._side(n) for n, _ in self.sizes}) != len(self.sizes):
            raise ValueError("sizes: two size names give the same pixel size")
        vocabulary_clash = {n for n, _ in self.colours} & {n for n, _ in self.sizes}
        if vocabulary_clash or set(self.shapes) & {n for n, _ in self.colours}:
            raise ValueError("colours/sizes/shapes: a word is used in two of them")
        if not self.backgrounds or any(len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb) for rgb in self.backgrounds):
            raise ValueError("backgrounds must be a non-empty sequence of RGB triples in 0..255")
        for rgb in self.backgrounds:
            for name, colour in self.colours:
                if _distance(rgb, colour) < 80:
                    raise ValueError(
                        f"backgrounds: {rgb} is too close to object colour {name!r} {colour} (distance < 80)"
                    )
        if not 0.0 <= self.minimal_pair_fraction <= 0.5:
            raise ValueError(f"minimal_pair_fraction must be in [0, 0.5], got {self.minimal_pair_fraction!r}")
        if self.minimal_pair_fraction > 0 and not self.changes:
            raise ValueError("changes must not be empty when minimal_pair_fraction > 0")
        if "relation" in self.changes and self.max_objects < 2:
            raise ValueError("changes: 'relation' needs max_objects >= 2")
        if "size" in self.changes and len(self.sizes) < 2:
            raise ValueError("changes: 'size' needs at least two sizes")
        if "shape" in self.changes and len(self.shapes) < 2:
            raise ValueError("changes: 'shape' needs at least two shapes")
        if "colour" in self.changes and len(self.colours) < 2:
            raise ValueError("changes: 'colour' needs at least two colours")
        if not 0 <= self.background_noise <= 20:
            raise ValueError(f"background_noise must be in [0, 20], got {self.background_noise!r}")
        if not isinstance(self.min_gap, int) or self.min_gap < 1:
            raise ValueError(f"min_gap must be an int >= 1, got {self.min_gap!r}")
        if not 0 <= self.next_to_gap <= 0.5:
            raise ValueError(f"next_to_gap must be in [0, 0.5], got {self.next_to_gap!r}")
        if not 0 <= self.next_to_probability <= 1:
            raise ValueError(f"next_to_probability must be in [0, 1], got {self.next_to_probability!r}")
        largest = max(self._side(n) for n, _ in self.sizes) + self.min_gap
        if self.max_objects * largest * largest > 0.6 * self.image_size**2:
            raise ValueError(
                "max_objects: this many objects of the largest size do not fit reliably in "
                f"{self.image_size}x{self.image_size} pixels; lower max_objects or the sizes"
            )

    # -- helpers used by the generator ------------------------------------------------------

    def _side(self, size_name: str) -> int:
        return int(round(dict(self.sizes)[size_name] * self.image_size))

    @property
    def colour_values(self) -> Mapping[str, tuple[int, int, int]]:
        """Colour name -> RGB fill, as a read-only mapping."""
        return MappingProxyType(dict(self.colours))

    @property
    def size_pixels(self) -> Mapping[str, int]:
        """Size name -> side of the object's box in pixels, as a read-only mapping."""
        return MappingProxyType({name: self._side(name) for name, _ in self.sizes})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (what the cache key is made from)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def vocabulary(self) -> list[str]:
        """Every lower-cased word a caption can contain, sorted.

        Captions also contain the punctuation ``, . ; :`` and start with a capital letter.
        """
        texts = list(_INTROS_ONE) + list(_SUFFIXES_ONE) + list(_INTROS_MANY) + list(_STATEMENT_SEPARATORS)
        texts += ["a the is which", *_COUNT_WORDS[: self.max_objects + 1]]
        texts += [name for name, _ in self.colours] + list(self.shapes)
        for name, _ in self.sizes:
            texts += list(SIZE_SYNONYMS.get(name, (name,)))
        for relation in self.relations:
            texts += list(RELATION_PHRASES[relation])
        words = set()
        for text in texts:
            words.update(re.findall(r"[a-z]+", text.lower().replace("{count}", "")))
        if self.max_objects >= len(_COUNT_WORDS):
            words.update(str(n) for n in range(len(_COUNT_WORDS), self.max_objects + 1))
        return sorted(words)


def _pairs(name: str, value: Any) -> tuple:
    if isinstance(value, Mapping):
        value = tuple(value.items())
    try:
        pairs = tuple((str(k), tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a mapping or a sequence of (name, value) pairs, got {value!r}") from None
    if not pairs:
        raise ValueError(f"{name} must not be empty")
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError(f"{name}: duplicate names")
    return pairs


def _check_subset(name: str, values: tuple, known: tuple) -> None:
    if not values and name in ("shapes", "relations", "background_styles"):
        raise ValueError(f"{name} must not be empty")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: duplicate entries in {values!r}")
    for value in values:
        if value not in known:
            raise ValueError(f"{name}: unknown value {value!r}; known: {', '.join(known)}")


def _distance(a: Sequence[int], b: Sequence[int]) -> float:
    return math.sqrt(sum((int(x) - int(y)) ** 2 for x, y in zip(a, b)))


# --------------------------------------------------------------------------------------------
# Layout and relations
# --------------------------------------------------------------------------------------------


def _gaps(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """Signed gaps between boxes a and b along x and y (negative when the extents overlap)."""
    gap_x = max(b[0] - a[2], a[0] - b[2])
    gap_y = max(b[1] - a[3], a[1] - b[3])
    return gap_x, gap_y


def relation_holds(a: Sequence[int], relation: str, b: Sequence[int], image_size: int, next_to_gap: float) -> bool:
    """Whether box ``a`` stands in ``relation`` to box ``b`` (boxes are ``[x0, y0, x1, y1]``).

    ``left of``: a ends before b starts along x (a.x1 <= b.x0); ``right of``, ``above``, ``below``
    alike; ``next to``: the boxes are at most ``next_to_gap * image_size`` apart along both axes
    and do not overlap.
    """
    if relation == "left of":
        return a[2] <= b[0]
    if relation == "right of":
        return b[2] <= a[0]
    if relation == "above":
        return a[3] <= b[1]
    if relation == "below":
        return b[3] <= a[1]
    if relation == "next to":
        gap_x, gap_y = _gaps(a, b)
        limit = next_to_gap * image_size
        return max(gap_x, gap_y) >= 0 and gap_x <= limit and gap_y <= limit
    raise ValueError(f"relation: unknown relation {relation!r}")


def _separated(a: Sequence[int], b: Sequence[int], config: SyntheticConfig) -> bool:
    """Boxes a and b are apart by at least min_gap along an axis some allowed relation reads."""
    gap_x, gap_y = _gaps(a, b)
    horizontal = bool({"left of", "right of"} & set(config.relations))
    vertical = bool({"above", "below"} & set(config.relations))
    return (horizontal and gap_x >= config.min_gap) or (vertical and gap_y >= config.min_gap)


def _layout_ok(boxes: Sequence[Sequence[int]], config: SyntheticConfig) -> bool:
    size = config.image_size
    for box in boxes:
        if box[0] < 1 or box[1] < 1 or box[2] > size - 1 or box[3] > size - 1:
            return False
    return all(_separated(boxes[i], boxes[j], config) for i in range(len(boxes)) for j in range(i))


def _place(sides: Sequence[int], config: SyntheticConfig, rng: random.Random) -> list[list[int]] | None:
    """Random non-overlapping boxes of the given sides, or None if this attempt got stuck."""
    boxes: list[list[int]] = []
    for side in sides:
        for _ in range(200):
            x0 = 1 + int(rng.random() * (config.image_size - 1 - side))
            y0 = 1 + int(rng.random() * (config.image_size - 1 - side))
            box = [x0, y0, x0 + side, y0 + side]
            if all(_separated(box, other, config) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _direction(a: Sequence[int], b: Sequence[int], config: SyntheticConfig, rng: random.Random) -> tuple[str, bool]:
    """A directional relation that holds between a and b, as (relation, a_is_subject).

    Uses the axis along which the boxes are further apart (the more obvious description).
    """
    gap_x, gap_y = _gaps(a, b)
    allowed = set(config.relations)
    horizontal = [r for r in ("left of", "right of") if r in allowed]
    vertical = [r for r in ("above", "below") if r in allowed]
    use_x = bool(horizontal) and gap_x >= config.min_gap and (not vertical or gap_y < config.min_gap or gap_x >= gap_y)
    if use_x:
        true_for_a = "left of" if a[2] <= b[0] else "right of"
    else:
        true_for_a = "above" if a[3] <= b[1] else "below"
    options = [(true_for_a, True), (_INVERSE[true_for_a], False)]
    options = [(r, s) for r, s in options if r in allowed]
    return _pick(rng, options)


def _edge(i: int, j: int, boxes, config: SyntheticConfig, rng: random.Random, allow_next_to: bool) -> list:
    """One stated relation between objects i and j, as [subject, relation, object]."""
    # Draw every random number up front so the stream consumption never depends on the layout.
    u_next = rng.random()
    relation, i_first = _direction(boxes[i], boxes[j], config, rng)
    if (
        allow_next_to
        and "next to" in config.relations
        and u_next < config.next_to_probability
        and relation_holds(boxes[i], "next to", boxes[j], config.image_size, config.next_to_gap)
    ):
        return [i, "next to", j]
    return [i, relation, j] if i_first else [j, relation, i]


def _pick(rng: random.Random, options: Sequence):
    """One element of ``options``, consuming exactly one draw of ``rng`` whatever its length."""
    return options[min(int(rng.random() * len(options)), len(options) - 1)]


# --------------------------------------------------------------------------------------------
# Scenes and minimal pairs
# --------------------------------------------------------------------------------------------


def _random_objects(n: int, config: SyntheticConfig, rng: random.Random) -> list[dict]:
    colours = [name for name, _ in config.colours]
    size_names = [name for name, _ in config.sizes]
    objects, used = [], set()
    while len(objects) < n:
        colour, shape = _pick(rng, colours), _pick(rng, config.shapes)
        if (colour, shape) in used:
            continue
        used.add((colour, shape))
        objects.append({"colour": colour, "shape": shape, "size": _pick(rng, size_names)})
    return objects


def _random_background(config: SyntheticConfig, rng: random.Random) -> dict:
    style = _pick(rng, config.background_styles)
    background = {"style": style, "colour": list(_pick(rng, config.backgrounds)), "seed": int(rng.random() * 2**31)}
    if style == "gradient":
        background["angle"] = _pick(rng, (0, 45, 90, 135, 180, 225, 270, 315))
        background["delta"] = _pick(rng, (-40, -25, 25, 40))
    return background


def _base_scene(n: int, config: SyntheticConfig, rng: random.Random, swap_pair: bool) -> tuple[dict, tuple[int, int] | None]:
    """A random scene of n objects and, when swap_pair, two objects whose places can be swapped."""
    for _ in range(100):
        objects = _random_objects(n, config, rng)
        boxes = _place([config._side(o["size"]) for o in objects], config, rng)
        if boxes is None:
            continue
        pair = None
        if swap_pair:
            candidates = [(i, j) for i in range(n) for j in range(i + 1, n) if _swap(boxes, i, j, config) is not None]
            if not candidates:
                continue
            pair = _pick(rng, candidates)
        for obj, box in zip(objects, boxes):
            obj["box"] = box
        scene = {"image_size": config.image_size, "background": _random_background(config, rng), "objects": objects}
        # A chain over the objects in random order states n - 1 relations that connect them all;
        # the pair a relation variant swaps is made adjacent in the chain.
        order = list(range(n))
        rng.shuffle(order)
        if pair is not None:
            order.remove(pair[1])
            order.insert(order.index(pair[0]) + 1, pair[1])
        edge_seed = rng.random()
        scene["relations"] = _chain_relations(order, boxes, config, edge_seed, keep_directional=pair)
        scene["_chain"] = order
        scene["_edge_seed"] = edge_seed
        return scene, pair
    raise RuntimeError("could not place the objects; lower max_objects or the object sizes")


def _chain_relations(order, boxes, config: SyntheticConfig, edge_seed: float, keep_directional=None) -> list:
    rng = random.Random(edge_seed)
    edges = []
    for a, b in zip(order, order[1:]):
        directional_only = keep_directional is not None and {a, b} == set(keep_directional)
        edges.append(_edge(a, b, boxes, config, rng, allow_next_to=not directional_only))
    return edges


def _swap(boxes, i: int, j: int, config: SyntheticConfig):
    """Boxes with objects i and j moved to each other's centre, or None if that breaks the layout."""
    a, b = boxes[i], boxes[j]
    side_a, side_b = a[2] - a[0], b[2] - b[0]
    new_a = _centred(b[0] + b[2], b[1] + b[3], side_a)
    new_b = _centred(a[0] + a[2], a[1] + a[3], side_b)
    new_boxes = [list(box) for box in boxes]
    new_boxes[i], new_boxes[j] = new_a, new_b
    if not _layout_ok(new_boxes, config):
        return None
    # The direction between the pair must flip on the axis a caption would state.
    relation, first = _direction(a, b, config, random.Random(0))
    relation = relation if first else _INVERSE[relation]
    if not relation_holds(new_a, _INVERSE[relation], new_b, config.image_size, config.next_to_gap):
        return None
    return new_boxes


def _centred(cx2: int, cy2: int, side: int) -> list[int]:
    """A box of the given side whose doubled centre is (cx2, cy2)."""
    x0, y0 = (cx2 - side) // 2, (cy2 - side) // 2
    return [x0, y0, x0 + side, y0 + side]


def _variant(scene: dict, change: str, config: SyntheticConfig, rng: random.Random, pair) -> dict | None:
    """A copy of scene differing in exactly one attribute or relation, or None if none fits."""
    variant = json.loads(json.dumps(scene))
    objects = variant["objects"]
    boxes = [o["box"] for o in objects]
    if change == "relation":
        i, j = pair
        new_boxes = _swap(boxes, i, j, config)
        for obj, box in zip(objects, new_boxes):
            obj["box"] = box
        variant["relations"] = _chain_relations(scene["_chain"], new_boxes, config, scene["_edge_seed"], keep_directional=pair)
        return variant
    index = int(rng.random() * len(objects))
    obj = objects[index]
    taken = {(o["colour"], o["shape"]) for o in objects}
    if change == "colour":
        options = [c for c, _ in config.colours if (c, obj["shape"]) not in taken]
        if not options:
            return None
        obj["colour"] = _pick(rng, options)
    elif change == "shape":
        options = [s for s in config.shapes if (obj["colour"], s) not in taken]
        if not options:
            return None
        obj["shape"] = _pick(rng, options)
    elif change == "size":
        options = [s for s, _ in config.sizes if s != obj["size"]]
        obj["size"] = _pick(rng, options)
        box = obj["box"]
        obj["box"] = _centred(box[0] + box[2], box[1] + box[3], config._side(obj["size"]))
        new_boxes = [o["box"] for o in objects]
        if not _layout_ok(new_boxes, config):
            return None
        # Keep every stated relation word: only the size may differ between the captions.
        relations = _chain_relations(scene["_chain"], new_boxes, config, scene["_edge_seed"])
        if relations != scene["relations"]:
            return None
    return variant


def _family(config: SyntheticConfig, seed_words: Sequence[int], change: str | None) -> list[dict]:
    """One scene (change None) or a base scene and its minimal-pair variant, with captions."""
    seed = int(np.random.SeedSequence(list(seed_words)).generate_state(1, dtype=np.uint64)[0])
    rng = random.Random(seed)
    low = max(config.min_objects, 2) if change == "relation" else config.min_objects
    for _ in range(200):
        n = low + int(rng.random() * (config.max_objects - low + 1))
        scene, pair = _base_scene(n, config, rng, swap_pair=change == "relation")
        scenes = [scene]
        if change is not None:
            variant = _variant(scene, change, config, rng, pair)
            if variant is None:
                continue
            scenes.append(variant)
        break
    else:
        raise RuntimeError(f"could not make a {change!r} minimal pair; the config leaves too little room")
    for s in scenes:
        s.pop("_chain", None)
        s.pop("_edge_seed", None)
    caption_lists = _family_captions(scenes, config, rng)
    return [dict(scene=s, captions=c) for s, c in zip(scenes, caption_lists)]


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _polygon(shape: str, box: Sequence[int]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    # Pillow draws polygon vertices inclusively: use the last pixel, not the half-open end.
    r0, r1 = x1 - 1, y1 - 1
    cx, cy = (x0 + r0) / 2, (y0 + r1) / 2
    radius = (r0 - x0) / 2
    if shape == "triangle":
        return [(cx, y0), (r0, r1), (x0, r1)]
    if shape == "diamond":
        return [(cx, y0), (r0, cy), (cx, r1), (x0, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle) + radius * 0.1))
        return points
    if shape == "hexagon":
        return [(cx + radius * math.cos(k * math.pi / 3), cy + radius * math.sin(k * math.pi / 3)) for k in range(6)]
    return None


def _draw_background(background: dict, size: int, noise_std: float) -> np.ndarray:
    base = np.asarray(background["colour"], dtype=np.float32)
    pixels = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if background["style"] == "gradient":
        angle = math.radians(background["angle"])
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        ramp = (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle)
        pixels = pixels + (ramp * background["delta"])[..., None]
    if background["style"] in ("noise", "gradient") and noise_std > 0:
        noise_rng = np.random.default_rng(background["seed"])
        scale = noise_std if background["style"] == "noise" else noise_std / 2
        pixels = pixels + (noise_rng.standard_normal((size, size), dtype=np.float32) * scale)[..., None]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def draw_scene(scene: Mapping | str, config: SyntheticConfig | None = None) -> Image.Image:
    """Draw a scene (a dict or its JSON string, as in the ``scene`` column) as an RGB image.

    Objects are filled with their exact RGB colour and no anti-aliasing, inside their box.
    """
    config = config or SyntheticConfig()
    if isinstance(scene, str):
        scene = json.loads(scene)
    size = scene["image_size"]
    image = Image.fromarray(_draw_background(scene["background"], size, config.background_noise), "RGB")
    draw = ImageDraw.Draw(image)
    colours = config.colour_values
    for obj in scene["objects"]:
        fill = tuple(colours[obj["colour"]])
        x0, y0, x1, y1 = obj["box"]
        shape = obj["shape"]
        if shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif shape == "square":
            inset = max(1, (x1 - x0) // 10)  # a full-box square looks bigger than the other shapes
            draw.rectangle([x0 + inset, y0 + inset, x1 - 1 - inset, y1 - 1 - inset], fill=fill)
        elif shape == "cross":
            side = x1 - x0
            arm = max(2, int(round(side * 0.34)))
            start = x0 + (side - arm) // 2
            draw.rectangle([start, y0, start + arm - 1, y1 - 1], fill=fill)
            start = y0 + (side - arm) // 2
            draw.rectangle([x0, start, x1 - 1, start + arm - 1], fill=fill)
        else:
            draw.polygon(_polygon(shape, obj["box"]), fill=fill)
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=3)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _caption(scene: dict, config: SyntheticConfig, rng: random.Random) -> str:
    """One caption naming every object (size, colour, shape) and every stated relation.

    All random choices are drawn first and in a fixed number, so two scenes with the same
    structure (a minimal pair) given the same seed get captions that differ only in the changed
    words.
    """
    objects = scene["objects"]
    n = len(objects)
    relations = scene["relations"]
    # Fixed-size draws: per object a size synonym and a definite-article size flag, per relation
    # a phrase, an inversion flag; then template choices.
    size_u = [rng.random() for _ in range(n)]
    ref_u = [rng.random() for _ in range(n)]
    list_order_u = [rng.random() for _ in range(n)]
    edge_u = [(rng.random(), rng.random()) for _ in relations]
    edge_order_u = [rng.random() for _ in relations]
    template_u, intro_u, separator_u, suffix_u = (rng.random() for _ in range(4))

    def size_word(k: int) -> str:
        options = SIZE_SYNONYMS.get(objects[k]["size"], (objects[k]["size"],))
        return _pick_u(size_u[k], options)

    def describe(k: int) -> str:
        o = objects[k]
        return f"a {size_word(k)} {o['colour']} {o['shape']}"

    def refer(k: int) -> str:
        o = objects[k]
        return f"the {size_word(k)} {o['colour']} {o['shape']}" if ref_u[k] < 0.3 else f"the {o['colour']} {o['shape']}"

    def statement(edge_index: int) -> tuple[int, str, int]:
        subject, relation, obj = relations[edge_index]
        phrase_u, invert_u = edge_u[edge_index]
        if invert_u < 0.5 and _INVERSE[relation] in config.relations:
            subject, relation, obj = obj, _INVERSE[relation], subject
        return subject, _pick_u(phrase_u, RELATION_PHRASES[relation]), obj

    if n == 1:
        text = f"{_pick_u(intro_u, _INTROS_ONE)} {describe(0)}{_pick_u(suffix_u, _SUFFIXES_ONE)}"
        return _sentence_case(text) + "."

    count = _COUNT_WORDS[n] if n < len(_COUNT_WORDS) else str(n)
    template = _pick_u(template_u, ("list", "list", "statements", "chain"))
    separator = _pick_u(separator_u, _STATEMENT_SEPARATORS)
    if template == "list":
        order = sorted(range(n), key=lambda k: list_order_u[k])
        items = [describe(k) for k in order]
        listed = ", ".join(items[:-1]) + " and " + items[-1]
        intro = _pick_u(intro_u, _INTROS_MANY).format(count=count)
        clauses = []
        for e in sorted(range(len(relations)), key=lambda e: edge_order_u[e]):
            subject, phrase, obj = statement(e)
            clauses.append(f"{refer(subject)} is {phrase} {refer(obj)}")
        return _sentence_case(f"{intro} {listed}. " + separator.join(clauses)) + "."
    if template == "chain":
        # "a small red circle left of a large blue square, which is above a tiny green star";
        # falls back to statements when a relation cannot be phrased in path direction.
        chain = _chain_text(objects, relations, config, edge_u, describe)
        if chain is not None:
            return _sentence_case(chain) + "."
    # "statements": the first mention of an object describes it, later mentions refer to it.
    mentioned: set[int] = set()
    clauses = []
    for e in range(len(relations)):
        subject, phrase, obj = statement(e)
        parts = []
        for k in (subject, obj):
            parts.append(refer(k) if k in mentioned else describe(k))
            mentioned.add(k)
        clauses.append(f"{parts[0]} is {phrase} {parts[1]}")
    return _sentence_case(separator.join(clauses)) + "."


def _chain_text(objects, relations, config: SyntheticConfig, edge_u, describe) -> str | None:
    path = _path_from_edges(relations, len(objects))
    if path is None:
        return None
    parts = []
    for e, (a, b) in enumerate(zip(path, path[1:])):
        edge_index = _edge_index(relations, a, b)
        subject, relation, _ = relations[edge_index]
        if subject != a:
            relation = _INVERSE[relation]
            if relation not in config.relations:
                return None
        phrase = _pick_u(edge_u[edge_index][0], RELATION_PHRASES[relation])
        parts.append(f"{describe(a)} {phrase} {describe(b)}" if e == 0 else f", which is {phrase} {describe(b)}")
    return "".join(parts)


def _pick_u(u: float, options: Sequence):
    return options[min(int(u * len(options)), len(options) - 1)]


def _path_from_edges(relations, n: int) -> list[int] | None:
    """The objects in path order if the stated relations form a path over all n objects."""
    neighbours = {k: [] for k in range(n)}
    for a, _, b in relations:
        neighbours[a].append(b)
        neighbours[b].append(a)
    ends = [k for k, v in neighbours.items() if len(v) == 1]
    if len(relations) != n - 1 or len(ends) != 2:
        return None
    path = [min(ends)]
    while len(path) < n:
        nxt = [k for k in neighbours[path[-1]] if k not in path]
        if not nxt:
            return None
        path.append(nxt[0])
    return path


def _edge_index(relations, a: int, b: int) -> int:
    for e, (s, _, o) in enumerate(relations):
        if {s, o} == {a, b}:
            return e
    raise KeyError((a, b))


def _sentence_case(text: str) -> str:
    """Capitalise the first letter and every letter after '. '."""
    parts = text.split(". ")
    return ". ".join(p[:1].upper() + p[1:] for p in parts)


def scene_captions(scene: Mapping | str, config: SyntheticConfig | None = None, seed: int = 0, count: int = 5) -> list[str]:
    """``count`` distinct captions for one scene (dict or JSON string), deterministic in ``seed``."""
    config = config or SyntheticConfig()
    if isinstance(scene, str):
        scene = json.loads(scene)
    return _family_captions([dict(scene)], config, random.Random(seed), count)[0]


def _family_captions(scenes: list[dict], config: SyntheticConfig, rng: random.Random, count: int = 5) -> list[list[str]]:
    """``count`` distinct captions per scene; caption k of every scene uses the same random draws."""
    results: list[list[str]] = [[] for _ in scenes]
    for _ in range(400):
        sub_seed = int(rng.random() * 2**53)
        candidates = [_caption(scene, config, random.Random(sub_seed)) for scene in scenes]
        if all(c not in r for c, r in zip(candidates, results)):
            for c, r in zip(candidates, results):
                r.append(c)
            if len(results[0]) == count:
                return results
    raise RuntimeError("could not phrase enough distinct captions")


# --------------------------------------------------------------------------------------------
# Splits, datasets and cache
# --------------------------------------------------------------------------------------------


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
        family = _family(config, (seed, split_id, k), change)
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
        columns["image"].append({"bytes": _png(draw_scene(row["scene"], config)), "path": None})
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
