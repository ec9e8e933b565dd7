"""The dataset card (README.md) of an exported cache: written with huggingface_hub's `DatasetCard` and the
`datasets` library's own YAML writers (`configs` with `data_files`, `dataset_info` with the features), read
back with `DatasetCard`, and checked: its `fedclip` provenance block (layout.read_manifest) and the subsets
and features it declares to `load_dataset` must agree.
"""
from __future__ import annotations

import json
from pathlib import Path

from .layout import (CARD, IMAGES, MAX_CARD_BYTES, PROMPTS, TEXT, Damaged, Manifest, image_features,
                     prompt_features, read_manifest)

TAGS = ["fedclip", "clip", "embeddings", "federated-learning", "domain-generalization"]


def versions() -> dict:
    import importlib.metadata as metadata

    out = {}
    for name in ("fedclip", "datasets", "pyarrow", "huggingface_hub", "h5py", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def plan_card(writing: list[str]) -> str:
    """The card an export writes first: it names every file the export may write, so a folder left by an
    interrupted export is still known as the tool's."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from .layout import FORMAT

    data = DatasetCardData(fedclip={"format": FORMAT, "complete": False, "writing": writing})
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\nAn export by `python -m extract.hub export` that has not "
                           "finished: run it again.\n"))


def _size_category(rows: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M")):
        if rows < limit:
            return name
    return "10M<n<100M"


def card_data(images: dict, prompts: list, sizes: dict, class_names, embed_dim: int, image_dtype: str,
              text_dtype: str, license: str | None = None, pretty_name: str | None = None):
    """The card's YAML without the provenance: the subsets and features `load_dataset` reads. `images`:
    each domain's files in row order; `sizes`: file -> (bytes, rows)."""
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    subsets = {IMAGES: [p for paths in images.values() for p in paths], PROMPTS: list(prompts)}
    rows = {name: sum(sizes[p][1] for p in paths) for name, paths in subsets.items()}
    data = DatasetCardData(license=license or "unknown", pretty_name=pretty_name, tags=list(TAGS),
                           size_categories=[_size_category(rows[IMAGES])])
    MetadataConfigs({
        IMAGES: {"data_files": [{"split": "train", "path": subsets[IMAGES]}], "default": True},
        PROMPTS: {"data_files": [{"split": "train", "path": subsets[PROMPTS]}]},
    }).to_dataset_card_data(data)
    features = {IMAGES: image_features(class_names, embed_dim, image_dtype),
                PROMPTS: prompt_features(class_names, embed_dim, text_dtype)}
    infos = {}
    for name, paths in subsets.items():
        size = sum(sizes[p][0] for p in paths)  # Parquet written plain: about the size in Arrow too
        splits = SplitDict()
        splits.add(SplitInfo(name="train", num_bytes=size, num_examples=rows[name]))
        infos[name] = DatasetInfo(features=features[name], splits=splits, download_size=size)
    DatasetInfosDict(infos).to_dataset_card_data(data)
    return data


def final_card(block: dict, header, src, image_dtype: str, text_dtype: str, *, repo_id: str | None,
               license: str | None) -> str:
    from huggingface_hub import DatasetCard

    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in src.f.attrs.items()}
    known = source_dataset(header.dataset_name)
    sizes = {p: (r["bytes"], r["rows"]) for p, r in block["files"].items()}
    data = card_data(block["images"], block["prompts"], sizes, header.class_names, header.embed_dim, image_dtype,
                     text_dtype, license=license or known.get("license"),
                     pretty_name=f"{header.dataset_name} CLIP embeddings ({header.model_name})")
    data.fedclip = block
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n" + _prose(block, header, attrs, repo_id, known)))


def source_dataset(name: str) -> dict:
    """The license and citation that fedclip's config of the dataset `name` gives (conf/dataset/*.yaml)."""
    try:
        from omegaconf import OmegaConf

        from federate.cli import CONF_DIR
    except ImportError:
        return {}
    for path in sorted((CONF_DIR / "dataset").glob("*.yaml")):
        try:
            cfg = OmegaConf.load(path)
        except Exception:  # an unreadable config names no license
            continue
        if cfg.get("name") == name:
            return {k: cfg.get(k) for k in ("license", "citation") if cfg.get(k)}
    return {}


def _prose(block: dict, header, attrs: dict, repo_id: str | None, known: dict) -> str:
    repo = repo_id or "<repo_id>"
    datasets = block["cache"]["datasets"]
    lines = [
        f"\n# {header.dataset_name}: CLIP embeddings of `{header.model_name}`\n",
        "The image and prompt embeddings of a fedclip cache: CLIP run once over the "
        "dataset by `python -m extract`, exported by `python -m extract.hub export`. The `fedclip` block of this "
        "card's YAML is the cache's provenance: every HDF5 attribute with its type, every dataset's dtype, shape "
        "and sha256, and the sha256 of every file here, so that `python -m extract.hub pull` rebuilds the cache bit "
        "for bit, with the same identity.\n",
        "| | |", "|---|---|",
        f"| model | `{header.model_name}` (fingerprint `{attrs.get('model_fingerprint', 'none')}`, revision "
        f"`{attrs.get('model_revision', '-')}`) |",
        f"| embeddings | {header.embed_dim} dims, images in {attrs.get('image_dtype', 'float32')} |",
        f"| cache identity | `{block['cache']['identity_sha256']}` |",
        f"| source | `{attrs.get('source', '-')}` |",
        f"| classes | {len(header.class_names)} |",
        f"| created | {attrs.get('created_at', '-')} |",
        "",
        "| domain | images | skipped |", "|---|---|---|",
    ]
    for d in header.domains:
        skipped = datasets.get(f"/domains/{d}/skipped/ids", {}).get("shape", [0])[0]
        lines.append(f"| {d} | {datasets[f'/domains/{d}/ids']['shape'][0]} | {skipped} |")
    lines += [
        "", "## Load with `datasets`", "", "```python", "from datasets import load_dataset", "",
        f'images = load_dataset("{repo}", "{IMAGES}", split="train")    # id, label, domain, embedding',
        f'prompts = load_dataset("{repo}", "{PROMPTS}", split="train")  # template, label, prompt_name, prompt, embedding',
        "```", "",
        f"Each domain's rows are in their own files (`data/{IMAGES}/<domain>/`), so one domain loads alone with "
        f"`load_dataset(\"{repo}\", data_files=\"data/{IMAGES}/<domain>/*.parquet\")`. "
        f"The `{PROMPTS}` rows are template-major: row `t * {len(header.class_names)} + c` is template `t` of class "
        f"`c` ({TEXT} of the cache).", "",
        "## Use with fedclip", "", "```bash",
        f"python -m extract.hub pull {repo}@<commit or tag>     # verified, rebuilt as an HDF5 cache in cache/hub/",
        f"python -m federate cache_file=hf://{repo}@<commit or tag> model.name={header.model_name}",
        "```", "",
    ]
    if known.get("citation") or known.get("license"):
        lines += ["## Source dataset", ""]
        if known.get("license"):
            lines += [f"License of the source images: {known['license']}.", ""]
        if known.get("citation"):
            lines += ["Cite the dataset:", "", "```bibtex", str(known["citation"]).strip(), "```", ""]
    return "\n".join(lines)


# --- reading ------------------------------------------------------------------------------------------------

def read_card(path: Path):
    """The card at `path` as a `DatasetCard`; Damaged when it is not a readable card with YAML."""
    from huggingface_hub import DatasetCard

    try:
        if not path.is_file():
            raise Damaged("is missing" if not path.exists() else "is not a regular file")
        if path.stat().st_size > MAX_CARD_BYTES:
            raise Damaged(f"is {path.stat().st_size:,} bytes, more than a card holds ({MAX_CARD_BYTES:,})")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise Damaged("is not UTF-8 text") from None
    except OSError as e:
        raise Damaged(f"cannot be read ({e.strerror or e})") from None
    if not text.startswith("---"):
        raise Damaged("has no YAML block (it must start with ---)")
    try:
        return DatasetCard(text)
    except Exception as e:  # yaml.YAMLError, a metadata block that is not a mapping, ...
        raise Damaged(f"has YAML that does not parse ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None


def read_block(path: Path):
    """The `fedclip` block of the card at `path`, or None (tolerant: used to recognise the tool's folder)."""
    try:
        return read_card(path).data.to_dict().get("fedclip")
    except Damaged:
        return None


def load_manifest(folder: Path) -> Manifest:
    """The checked provenance of the folder's card, and the card's subsets and features checked against it.
    Raises Damaged (the caller names README.md)."""
    card = read_card(folder / CARD)
    data = card.data.to_dict()
    if "fedclip" not in data:
        raise Damaged("has no fedclip provenance block (fedclip: in its YAML); it was not written by python -m "
                      "extract.hub export")
    try:
        manifest = read_manifest(data["fedclip"])
    except Damaged:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # a shape no check foresaw
        raise Damaged(f"has a fedclip block that cannot be read ({type(e).__name__}: {e})") from None
    m = manifest
    image_dtype = m.datasets[f"/domains/{m.domains[0]}/image_embeddings"].dtype
    expected = card_data(m.image_files, m.prompt_files, {p: (r.size, r.rows) for p, r in m.files.items()},
                         m.class_names, m.embed_dim, image_dtype, m.datasets[TEXT].dtype).to_dict()
    for key in ("configs", "dataset_info"):
        if _plain(data.get(key)) != _plain(expected.get(key)):
            raise Damaged(f"declares {key} (the subsets and features load_dataset reads) that differ from its "
                          "fedclip provenance")
    return manifest


def _plain(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))
