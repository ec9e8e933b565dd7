"""Where images come from: a local `root/domain/class/image` folder or a hub dataset.

Each domain becomes a `DomainImages`: stable sorted ids, labels, and a picklable way to open image i
(DataLoader workers open and decode the images). Domain names are canonical (`canonical_domain`: Office-Home's
hub domain "Real World" and a folder copy's "Real_World" are both "Real_World"). Every non-hidden regular
file under a class folder is an input: one that cannot be decoded is skipped and recorded in the cache, never
silently dropped. What a folder holds besides inputs is recorded as skipped too, with the reason: a file
outside a class folder, a FIFO or device, a broken link, and a symbolic link to a folder, which is not
followed unless `dataset.follow_symlinks=true` (a link such as `cartoon/dogloop -> ../photo` would copy one
domain's images into another). A file name that is not valid UTF-8 keeps its file; its id writes each
undecodable byte as `\\xNN` (`portable_name`), so the id is valid UTF-8 and still names the file.
"""
from __future__ import annotations

import io
import logging
import os
import socket
import stat
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason): entries that are not inputs

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
    paths: list[str]  # relative to root, as on disk (ids may escape bytes that are not UTF-8)

    def __call__(self, i: int) -> Image.Image:
        return Image.open(self.root / self.paths[i])


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


def portable_name(name: str) -> str:
    """`name` as valid UTF-8: unchanged when it is, otherwise each undecodable byte becomes `\\xNN`."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:  # os functions give such bytes as surrogate escapes
        return os.fsencode(name).decode("utf-8", "backslashreplace")


FOLLOW_HINT = "not followed: dataset.follow_symlinks=true follows symbolic links to folders"


def _is_folder(path: Path, follow: bool) -> bool:
    return path.is_dir() and (follow or not path.is_symlink())


def _subdirs(path: Path, follow: bool = False) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and _is_folder(p, follow))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _entry(path: Path, root: Path, skipped: list) -> str | None:
    """What a non-folder entry is: "file" for an input; otherwise it is recorded in `skipped`."""
    rel = path.relative_to(root).as_posix()
    try:
        mode = os.stat(path).st_mode  # through a link to a file
    except OSError as e:
        why = "a broken symbolic link" if path.is_symlink() else f"cannot be read ({e.strerror})"
        skipped.append((portable_name(rel), why))
        return None
    if stat.S_ISREG(mode):
        return "file"
    skipped.append((portable_name(rel), f"{_kind(mode)}, not an image file"))
    return None


def _class_files(base: Path, root: Path, follow: bool, skipped: list, visited: set) -> list[str]:
    """Every non-hidden regular file under a class folder (recursively), as paths relative to root.
    `visited`: the real paths of the folders read so far in this domain (a followed link to one is a loop)."""
    files = []

    def unreadable(e: OSError):
        skipped.append((portable_name(Path(e.filename).relative_to(root).as_posix()),
                        f"a folder that cannot be read ({e.strerror})"))

    for folder, dirs, names in os.walk(base, onerror=unreadable, followlinks=follow):
        folder = Path(folder)
        visited.add(os.path.realpath(folder))
        keep = []
        for d in sorted(dirs):
            p = folder / d
            if d.startswith("."):
                continue
            if p.is_symlink():
                if not follow:
                    skipped.append((portable_name(p.relative_to(root).as_posix()),
                                    f"a symbolic link to a folder, {FOLLOW_HINT}"))
                    continue
                if os.path.realpath(p) in visited:
                    skipped.append((portable_name(p.relative_to(root).as_posix()),
                                    "a symbolic link to a folder read already (a loop)"))
                    continue
            keep.append(d)
        dirs[:] = keep
        for name in names:
            if not name.startswith(".") and _entry(folder / name, root, skipped) == "file":
                files.append((folder / name).relative_to(root))
    return [p.as_posix() for p in sorted(files)]  # the order of sorted Paths, as before


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


def _canonical_folders(root: Path, follow: bool) -> dict[str, str]:
    """Canonical domain name -> folder name under root."""
    out: dict[str, str] = {}
    for folder in _subdirs(root, follow):
        name = portable_name(canonical_domain(folder))
        if name in out:
            raise ExtractError(f"folders {out[name]!r} and {folder!r} under {root} are the same domain "
                               f"{name!r} (spaces and underscores are one); rename one of them")
        out[name] = folder
    return out


def folder_source(dataset_cfg) -> Source:
    root = Path(dataset_cfg.root).expanduser()
    if not root.is_dir():
        raise ExtractError(f"dataset.root {root} does not exist or is not a folder (expected one folder per "
                           "domain, each holding one folder per class: root/domain/class/image)")
    follow = bool(dataset_cfg.get("follow_symlinks"))
    folder_of = _canonical_folders(root, follow)
    for p in sorted(root.iterdir()):  # no domain to record these in: say so in the log
        if p.name.startswith(".") or _is_folder(p, follow):
            continue
        if p.is_dir():
            log.warning("not a domain: %s is a symbolic link to a folder, %s", portable_name(str(p)), FOLLOW_HINT)
        else:
            log.warning("not an input: %s lies outside any domain folder (images go in root/domain/class/)",
                        portable_name(str(p)))
    domains = _pick("domain", dataset_cfg.domains, sorted(folder_of), str(root))
    class_folders = {d: _subdirs(root / folder_of[d], follow) for d in domains}
    found_classes = sorted({portable_name(c) for d in domains for c in class_folders[d]})
    classes = list(dataset_cfg.classes) if dataset_cfg.classes else found_classes
    unknown = sorted(set(found_classes) - set(classes))
    if unknown:
        raise ExtractError(f"class folders {', '.join(unknown)} under {root} are not classes of dataset "
                           f"{dataset_cfg.name}; its classes are: {', '.join(classes)}")
    label_of = {c: i for i, c in enumerate(classes)}
    out = []
    for d in domains:
        paths, labels, skipped = [], [], []
        domain_dir = root / folder_of[d]
        visited = {os.path.realpath(domain_dir)}
        for p in sorted(domain_dir.iterdir()):  # what lies beside the class folders
            if p.name.startswith(".") or _is_folder(p, follow):
                continue
            rel = portable_name(p.relative_to(root).as_posix())
            if p.is_dir():
                skipped.append((rel, f"a symbolic link to a folder, {FOLLOW_HINT}"))
            elif _entry(p, root, skipped) == "file":
                skipped.append((rel, "not inside a class folder (images go in root/domain/class/)"))
        for c in class_folders[d]:
            files = _class_files(domain_dir / c, root, follow, skipped, visited)
            paths += files
            labels += [label_of[portable_name(c)]] * len(files)
        ids = [portable_name(p) for p in paths]
        if len(set(ids)) != len(ids):
            dup = next(i for k, i in enumerate(ids) if i in ids[:k])
            raise ExtractError(f"two files of domain {d} have the id {dup!r} (a name that is not UTF-8, written with "
                               "\\xNN escapes, equals another file's name); rename one of them")
        for sid, reason in skipped:
            log.warning("not an input of domain %s, recorded as skipped: %s (%s)", d, sid, reason)
        out.append(DomainImages(d, ids, labels, FolderOpener(root, paths), sorted(skipped)))
    if not any(len(d) for d in out):
        raise ExtractError(f"no images under {root} (expected root/domain/class/image with "
                           f"suffixes {', '.join(sorted(IMAGE_SUFFIXES))})")
    name = dataset_cfg.name or portable_name(root.resolve().name)
    return Source(name, classes, prompt_names_for(classes, dataset_cfg.prompt_names), out,
                  {"source": "folder", "root": str(root.resolve())})


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection within `timeout` seconds (name lookup included). Without
    this check the datasets library retries an unreachable hub for half a minute before failing."""
    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True  # a proxy decides what is reachable: let the libraries use it
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    answer: list[bool] = []

    def probe():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a name lookup has no timeout of its own
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answer and answer[0])


@contextmanager
def hub_offline():
    """The datasets library in offline mode (it then reads its local cache only), as HF_HUB_OFFLINE=1 does."""
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def hub_source(dataset_cfg, command: str | None = None) -> Source:
    import datasets
    from huggingface_hub import constants

    local = f"run: {command}" if command else "set dataset.root to it"
    offline = constants.HF_HUB_OFFLINE
    why = "HF_HUB_OFFLINE=1 is set" if offline else None
    if not offline and not hub_reachable():
        offline, why = True, f"the hub ({urlparse(constants.ENDPOINT).hostname}) cannot be reached"
    try:
        with hub_offline() if offline else nullcontext():
            table = datasets.load_dataset(dataset_cfg.hub_id, split=dataset_cfg.hub_split)
    except Exception as e:  # network, auth, missing repo: the datasets library raises many kinds
        if why:
            raise ExtractError(f"cannot load hub dataset {dataset_cfg.hub_id!r}: {why} and the local HF cache has "
                               f"no copy of it; to read a local copy laid out as root/domain/class/image instead, "
                               f"{local}") from None
        raise ExtractError(f"cannot load hub dataset {dataset_cfg.hub_id!r} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); to read a local copy laid out as "
                           f"root/domain/class/image instead, {local}") from None
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


def load_source(dataset_cfg, command: str | None = None) -> Source:
    """The dataset's images. `command`: the user's own extract command with `dataset.root` set
    (extract.commands), which messages suggest when the images cannot be had otherwise."""
    if dataset_cfg.get("generate"):
        from .demo import ensure_demo_images

        with os_errors(f"generate the demo images in {dataset_cfg.root}"):
            ensure_demo_images(Path(dataset_cfg.root), dataset_cfg.domains, dataset_cfg.classes,
                               **dataset_cfg.generate)
    if dataset_cfg.root:
        return folder_source(dataset_cfg)
    if dataset_cfg.hub_id:
        return hub_source(dataset_cfg, command)
    run = f"run: {command}" if command else "set dataset.root to that folder"
    if not dataset_cfg.name:
        raise ExtractError(f"dataset=folder reads a local folder in the DomainBed layout root/domain/class/image, "
                           f"and dataset.root is not set; {run}")
    raise ExtractError(f"dataset {dataset_cfg.name} has no hub copy: it is read from a local folder in the DomainBed "
                       f"layout root/domain/class/image; {run}")
