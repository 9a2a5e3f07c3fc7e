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

Entry points, and the module each lives in:

* :class:`SyntheticConfig` (``config``) — the difficulty knobs (image size, object counts,
  colours, shapes, sizes, relations, minimal-pair fraction, backgrounds).
* :func:`generate_synthetic_benchmark` / :func:`minimal_pairs` (``dataset``) — a
  ``datasets.DatasetDict`` with ``train``, ``validation`` and ``test`` splits, optionally cached
  on disk, and the minimal pairs of one split.
* :func:`draw_scene` (``render``) / :func:`scene_captions` (``captions``) — draw or caption one
  scene dictionary; :func:`relation_holds` (``scene``) — the geometric meaning of each relation.

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

from .captions import RELATION_PHRASES, SIZE_SYNONYMS, scene_captions
from .config import CHANGE_KINDS, KNOWN_RELATIONS, KNOWN_SHAPES, SyntheticConfig
from .dataset import GENERATOR_VERSION, default_cache_dir, generate_synthetic_benchmark, minimal_pairs, synthetic_features
from .render import draw_scene
from .scene import relation_holds

__all__ = [
    "CHANGE_KINDS",
    "GENERATOR_VERSION",
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
