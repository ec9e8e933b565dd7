"""A small generated multi-domain image set: shapes (classes) drawn in one style per domain."""
from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from .errors import ExtractError
from .files import UnsafePath, atomic_path, own_folder, write_text

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


MARKER = ".fedclip-demo.json"  # says that fedclip generated the folder, with what settings and which files
LEGACY_MARKER = ".complete"     # the marker of fedclip's earlier demo generator


def _demo_files(domains, classes, images_per_class: int) -> list[str]:
    return [f"{d}/{c}/{i:04d}.png" for d in domains for c in classes for i in range(images_per_class)]


def _read_marker(root: Path) -> dict | None:
    """The marker's content; {} for a legacy marker; None when the folder is not fedclip's."""
    marker = root / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and data.get("generator") == "fedclip demo":
            return data
        return None
    if (root / LEGACY_MARKER).is_file():  # made by fedclip before the marker held its file list
        return {"files": sorted(p.relative_to(root).as_posix() for p in root.glob("*/*/[0-9][0-9][0-9][0-9].png"))}
    return None


def _write_marker(root: Path, settings: dict, files: list[str], complete: bool) -> None:
    write_text(root / MARKER, json.dumps({"generator": "fedclip demo", "complete": complete, "settings": settings,
                                          "files": files}))


def _fresh(root: Path) -> Path:
    """A folder name next to `root` that does not exist yet, for messages to suggest."""
    k = 2
    while root.with_name(f"{root.name}-{k}").exists():
        k += 1
    return root.with_name(f"{root.name}-{k}")


def ensure_demo_images(root: Path, domains, classes, images_per_class: int, size: int, seed: int) -> None:
    """Write <root>/<domain>/<class>/<i>.png unless fedclip already generated them with these settings.

    Only a missing or empty folder, or one that fedclip generated (it holds the marker file), is written
    to; anything else is refused with one line. In a fedclip folder only fedclip's own files (listed in its
    marker) are replaced or removed: nothing that fedclip did not create is deleted or overwritten.
    """
    root = Path(root).expanduser()
    try:
        _generate(root, list(domains), list(classes), images_per_class, size, seed)
    except UnsafePath as e:  # a linked folder: nothing is written through it
        raise ExtractError(f"dataset=demo: {e}") from None


def _generate(root: Path, domains: list, classes: list, images_per_class: int, size: int, seed: int) -> None:
    if root.is_symlink():
        own_folder(root)
    settings = {"domains": domains, "classes": classes, "images_per_class": images_per_class, "size": size,
                "seed": seed}
    files = _demo_files(domains, classes, images_per_class)
    if root.exists() and not root.is_dir():
        raise ExtractError(f"dataset.root {root} is a file; dataset=demo generates its images into a missing "
                           f"or empty folder: pass a new folder, e.g. dataset.root={_fresh(root)}")
    previous = _read_marker(root) if root.is_dir() else None
    if previous and previous.get("complete") and previous.get("settings") == settings \
            and all((root / f).is_file() for f in files):
        return
    if root.is_dir() and previous is None and any(root.iterdir()):
        raise ExtractError(f"dataset.root {root} is not empty and was not generated by fedclip; dataset=demo "
                           "generates images only into a missing or empty folder (or one it generated): pass a new folder "
                           f"(dataset.root={_fresh(root)}), or read this one with dataset=folder dataset.root={root}")
    owned = set((previous or {}).get("files", []))
    for f in files:  # a fedclip folder may hold the user's own files too: never overwrite those
        if f not in owned and (root / f).exists():
            raise ExtractError(f"{root / f} was not generated by fedclip; move it away or pass a new folder "
                               f"(dataset.root={_fresh(root)})")
    log.info("generating the demo image set in %s", root)
    own_folder(root)
    _write_marker(root, settings, sorted(owned | set(files)), complete=False)  # claim before writing
    if previous is not None:
        (root / LEGACY_MARKER).unlink(missing_ok=True)  # fedclip's own, superseded by MARKER
    for di, domain in enumerate(domains):
        for ci, cls in enumerate(classes):
            rng = random.Random(seed * 1_000_003 + di * 1009 + ci)
            own_folder(root / domain)
            folder = own_folder(root / domain / cls)
            for i in range(images_per_class):
                with atomic_path(folder / f"{i:04d}.png") as tmp:
                    draw(cls, domain, size, rng).save(tmp, format="PNG")
    for stale in sorted(owned - set(files)):  # fedclip's files of an earlier generation with other settings
        (root / stale).unlink(missing_ok=True)
        for parent in ((root / stale).parent, (root / stale).parent.parent):
            if parent != root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
    _write_marker(root, settings, files, complete=True)
