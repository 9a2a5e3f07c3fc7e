"""The synthetic benchmark's difficulty knobs (:class:`SyntheticConfig`) and the vocabulary of
shapes, relations and minimal-pair kinds it draws from."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

KNOWN_SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")
KNOWN_RELATIONS = ("left of", "right of", "above", "below", "next to")
CHANGE_KINDS = ("colour", "shape", "size", "relation")

#: What each relation becomes when subject and object are swapped.
INVERSE_RELATION = MappingProxyType(
    {"left of": "right of", "right of": "left of", "above": "below", "below": "above", "next to": "next to"}
)

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
        from .captions import caption_vocabulary  # captions.py imports this module

        return caption_vocabulary(self)


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
