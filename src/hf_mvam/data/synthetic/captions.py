"""Captions of a scene: every object named (size, colour, shape) and every stated relation, in
varied templates and phrasings, deterministic in a ``random.Random`` stream."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from .config import INVERSE_RELATION, SyntheticConfig

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


def caption_vocabulary(config: SyntheticConfig) -> list[str]:
    """Every lower-cased word a caption made with ``config`` can contain, sorted."""
    texts = list(_INTROS_ONE) + list(_SUFFIXES_ONE) + list(_INTROS_MANY) + list(_STATEMENT_SEPARATORS)
    texts += ["a the is which", *_COUNT_WORDS[: config.max_objects + 1]]
    texts += [name for name, _ in config.colours] + list(config.shapes)
    for name, _ in config.sizes:
        texts += list(SIZE_SYNONYMS.get(name, (name,)))
    for relation in config.relations:
        texts += list(RELATION_PHRASES[relation])
    words = set()
    for text in texts:
        words.update(re.findall(r"[a-z]+", text.lower().replace("{count}", "")))
    if config.max_objects >= len(_COUNT_WORDS):
        words.update(str(n) for n in range(len(_COUNT_WORDS), config.max_objects + 1))
    return sorted(words)


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
        if invert_u < 0.5 and INVERSE_RELATION[relation] in config.relations:
            subject, relation, obj = obj, INVERSE_RELATION[relation], subject
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
            relation = INVERSE_RELATION[relation]
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
    return family_captions([dict(scene)], config, random.Random(seed), count)[0]


def family_captions(scenes: list[dict], config: SyntheticConfig, rng: random.Random, count: int = 5) -> list[list[str]]:
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
