"""Where images come from: a local `<root>/<domain>/<class>/<image>` folder or a hub dataset.

Each domain becomes a `DomainImages`: stable sorted ids, labels, and a picklable way to open image i
(DataLoader workers open and decode the images). Domain names are canonical (`canonical_domain`: Office-Home's
hub domain "Real World" and a folder copy's "Real_World" are both "Real_World"). Every non-hidden file
under a class folder is an input: one that cannot be decoded is skipped and recorded in the cache, never
silently dropped.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .errors import ExtractError, os_errors
from .identity import canonical_domain

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}  # for messages only


@dataclass
class DomainImages:
    name: str
    ids: list[str]
    labels: list[int]
    opener: "FolderOpener | HubOpener"

    def __len__(self) -> int:
        return len(self.ids)

    def open(self, i: int) -> Image.Image:
        return self.opener(i)


@dataclass
class Source:
    name: str
    class_names: list[str]
    prompt_names: list[str]
    domains: list[DomainImages]
    provenance: dict = field(default_factory=dict)


@dataclass
class FolderOpener:
    root: Path
    ids: list[str]

    def __call__(self, i: int) -> Image.Image:
        return Image.open(self.root / self.ids[i])


@dataclass
class HubOpener:
    table: object  # datasets.Dataset with its image column left undecoded
    rows: list[int]

    def __call__(self, i: int) -> Image.Image:
        image = self.table[self.rows[i]]["image"]
        if image.get("bytes") is not None:
            return Image.open(io.BytesIO(image["bytes"]))
        return Image.open(image["path"])


def prompt_names_for(class_names: list[str], override) -> list[str]:
    """Class names as written in prompts: "Alarm_Clock" -> "alarm clock" unless given explicitly."""
    if override:
        if len(override) != len(class_names):
            raise ExtractError(f"dataset.prompt_names has {len(override)} names but the dataset has "
                               f"{len(class_names)} classes ({', '.join(class_names)})")
        return list(override)
    return [c.replace("_", " ").replace("-", " ").strip().lower() for c in class_names]


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _pick(kind: str, wanted, available: list[str], where: str) -> list[str]:
    if not wanted:
        return available
    if kind == "domain":
        wanted = [canonical_domain(w) for w in wanted]
    missing = [w for w in wanted if w not in available]
    if missing:
        raise ExtractError(f"{kind} {', '.join(map(str, missing))} not found in {where}; "
                           f"available: {', '.join(available) or 'none'}")
    return list(wanted)


def _canonical_folders(root: Path) -> dict[str, str]:
    """Canonical domain name -> folder name under root."""
    out: dict[str, str] = {}
    for folder in _subdirs(root):
        name = canonical_domain(folder)
        if name in out:
            raise ExtractError(f"folders {out[name]!r} and {folder!r} under {root} are the same domain "
                               f"{name!r} (spaces and underscores are one); rename one of them")
        out[name] = folder
    return out


def folder_source(dataset_cfg) -> Source:
    root = Path(dataset_cfg.root).expanduser()
    if not root.is_dir():
        raise ExtractError(f"dataset.root {root} does not exist or is not a folder "
                           "(expected <root>/<domain>/<class>/<image>)")
    folder_of = _canonical_folders(root)
    domains = _pick("domain", dataset_cfg.domains, sorted(folder_of), str(root))
    found_classes = sorted({c for d in domains for c in _subdirs(root / folder_of[d])})
    classes = list(dataset_cfg.classes) if dataset_cfg.classes else found_classes
    unknown = sorted(set(found_classes) - set(classes))
    if unknown:
        raise ExtractError(f"class folders {', '.join(unknown)} under {root} are not classes of dataset "
                           f"{dataset_cfg.name}; its classes are: {', '.join(classes)}")
    label_of = {c: i for i, c in enumerate(classes)}
    out = []
    for d in domains:
        ids, labels = [], []
        for c in _subdirs(root / folder_of[d]):
            base = root / folder_of[d] / c
            files = sorted(p for p in base.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(base).parts))
            for p in files:
                ids.append(p.relative_to(root).as_posix())
                labels.append(label_of[c])
        out.append(DomainImages(d, ids, labels, FolderOpener(root, ids)))
    if not any(len(d) for d in out):
        raise ExtractError(f"no images under {root} (expected <root>/<domain>/<class>/<image> with "
                           f"suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    name = dataset_cfg.name or root.resolve().name
    return Source(name, classes, prompt_names_for(classes, dataset_cfg.prompt_names), out,
                  {"source": "folder", "root": str(root.resolve())})


def hub_source(dataset_cfg) -> Source:
    import datasets

    try:
        table = datasets.load_dataset(dataset_cfg.hub_id, split=dataset_cfg.hub_split)
    except Exception as e:  # network, auth, missing repo: the datasets library raises many kinds
        raise ExtractError(f"cannot load hub dataset {dataset_cfg.hub_id!r} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); without hub access, point "
                           f"dataset.root at a local <root>/<domain>/<class>/<image> copy") from None
    image_col, label_col = dataset_cfg.get("image_column", "image"), dataset_cfg.get("label_column", "label")
    domain_col = dataset_cfg.get("domain_column", "domain")  # None: a single-domain dataset (CIFAR-10)
    missing = {image_col, label_col, *([domain_col] if domain_col else [])} - set(table.column_names)
    if missing:
        raise ExtractError(f"hub dataset {dataset_cfg.hub_id} lacks columns {sorted(missing)} "
                           f"(has {table.column_names}); set dataset.image_column, dataset.label_column or "
                           f"dataset.domain_column (null: one domain)")
    label_feature = table.features[label_col]
    classes = list(getattr(label_feature, "names", None) or dataset_cfg.classes or [])
    if dataset_cfg.classes and list(dataset_cfg.classes) != classes:
        raise ExtractError(f"hub dataset {dataset_cfg.hub_id} has classes {classes}, the config lists "
                           f"{list(dataset_cfg.classes)}")
    single = canonical_domain(dataset_cfg.name or dataset_cfg.hub_id.split("/")[-1])
    domain_of = [canonical_domain(v) for v in table[domain_col]] if domain_col else [single] * len(table)
    label_of = list(table[label_col])
    domains = _pick("domain", dataset_cfg.domains, sorted(set(domain_of)), dataset_cfg.hub_id)
    fingerprint = getattr(table, "_fingerprint", "")
    table = table.select_columns([image_col]).rename_columns({image_col: "image"} if image_col != "image" else {})
    table = table.cast_column("image", datasets.Image(decode=False))
    out = []
    for d in domains:
        rows = [i for i, v in enumerate(domain_of) if v == d]
        ids = [f"{dataset_cfg.hub_split}/{i}" for i in rows]
        out.append(DomainImages(d, ids, [int(label_of[i]) for i in rows], HubOpener(table, rows)))
    return Source(dataset_cfg.name, classes, prompt_names_for(classes, dataset_cfg.prompt_names), out,
                  {"source": "hub", "hub_id": dataset_cfg.hub_id, "hub_split": dataset_cfg.hub_split,
                   "hub_fingerprint": fingerprint})


def load_source(dataset_cfg) -> Source:
    if dataset_cfg.get("generate"):
        from .demo import ensure_demo_images

        with os_errors(f"generate the demo images in {dataset_cfg.root}"):
            ensure_demo_images(Path(dataset_cfg.root), dataset_cfg.domains, dataset_cfg.classes,
                               **dataset_cfg.generate)
    if dataset_cfg.root:
        return folder_source(dataset_cfg)
    if dataset_cfg.hub_id:
        return hub_source(dataset_cfg)
    name = dataset_cfg.name or "<name>"
    raise ExtractError(f"dataset {name} has no hub copy: it is read from a local folder in the DomainBed "
                       f"layout <root>/<domain>/<class>/<image>; run: python -m extract dataset={name} "
                       f"dataset.root=/path/to/{name}")
