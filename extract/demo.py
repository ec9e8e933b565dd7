"""A small generated multi-domain image set: shapes (classes) drawn in one style per domain."""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "star":
        pts = [(r if k % 2 == 0 else 0.45 * r, angle + k * math.pi / 5) for k in range(10)]
    else:
        n = {"triangle": 3, "square": 4, "circle": 48}.get(shape, 6)
        pts = [(r, angle + 2 * math.pi * k / n) for k in range(n)]
    return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for rad, a in pts]


def draw(shape: str, style: str, size: int, rng: random.Random) -> Image.Image:
    """One image of `shape` in the drawing `style` of a domain (photo, sketch, cartoon, or other)."""
    cx, cy = (rng.uniform(0.35, 0.65) * size for _ in range(2))
    pts = _polygon(shape, cx, cy, rng.uniform(0.2, 0.32) * size, rng.uniform(0, 2 * math.pi))
    color = tuple(rng.randrange(40, 230) for _ in range(3))
    if style == "sketch":
        img = Image.new("RGB", (size, size), (250, 250, 250))
        jitter = [(x + rng.uniform(-1, 1), y + rng.uniform(-1, 1)) for x, y in pts]
        ImageDraw.Draw(img).line(jitter + jitter[:1], fill=(20, 20, 20), width=max(1, size // 40))
        return img
    if style == "cartoon":
        img = Image.new("RGB", (size, size), tuple(rng.choice((60, 200, 250)) for _ in range(3)))
        ImageDraw.Draw(img).polygon(pts, fill=color, outline=(0, 0, 0), width=max(2, size // 20))
        return img
    # photo-like: a gradient background, the shape with a drop shadow, blur and noise
    top, bottom = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    for y in range(size):
        t = y / max(1, size - 1)
        d.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    d.polygon([(x + size * 0.04, y + size * 0.04) for x, y in pts], fill=tuple(c // 3 for c in bottom))
    d.polygon(pts, fill=color)
    img = img.filter(ImageFilter.GaussianBlur(size / 128))
    noise = Image.effect_noise((size, size), 24).convert("RGB")
    return Image.blend(img, noise, 0.12)


def ensure_demo_images(root: Path, domains, classes, images_per_class: int, size: int, seed: int) -> None:
    """Write <root>/<domain>/<class>/<i>.png once; a partial earlier attempt is redone from scratch."""
    marker = root / ".complete"
    if marker.exists():
        return
    log.info("generating the demo image set in %s", root)
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for di, domain in enumerate(domains):
        for ci, cls in enumerate(classes):
            rng = random.Random(seed * 1_000_003 + di * 1009 + ci)
            folder = tmp / domain / cls
            folder.mkdir(parents=True)
            for i in range(images_per_class):
                draw(cls, domain, size, rng).save(folder / f"{i:04d}.png")
    (tmp / ".complete").touch()
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
