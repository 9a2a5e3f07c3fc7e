"""Drawing a scene as an RGB image: a plain, noisy or gradient background and flat-filled shapes."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .config import SyntheticConfig


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


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=3)
    return buffer.getvalue()
