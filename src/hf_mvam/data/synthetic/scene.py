"""Scenes: object layouts, the spatial relations that hold between them, and minimal-pair variants
(a copy differing in one attribute of one object, or with two objects swapped)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import numpy as np

from .captions import family_captions
from .config import INVERSE_RELATION, SyntheticConfig

# --- Layout and relations --------------------------------------------------------------------


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
    options = [(true_for_a, True), (INVERSE_RELATION[true_for_a], False)]
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


# --- Scenes and minimal pairs ---------------------------------------------------------------


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
    relation = relation if first else INVERSE_RELATION[relation]
    if not relation_holds(new_a, INVERSE_RELATION[relation], new_b, config.image_size, config.next_to_gap):
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


def scene_family(config: SyntheticConfig, seed_words: Sequence[int], change: str | None) -> list[dict]:
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
    caption_lists = family_captions(scenes, config, rng)
    return [dict(scene=s, captions=c) for s, c in zip(scenes, caption_lists)]
