"""python -m extract.info <cache.h5>: what a colleague needs to trust a shared cache, checksums verified.

Exit status: 0 when the cache is complete, of the schema version this fedclip reads, and every checksum
(identity attributes, text embeddings, logit scale, every domain's datasets) matches; 1 otherwise (each
problem is listed); 2 when the file cannot be read as HDF5.
"""
from __future__ import annotations

import argparse
import json
import sys

import h5py

from .cache import SCHEMA_VERSION, dataset_sha256
from .identity import identity_sha256, short


def _json_list(a, key) -> list:
    try:
        value = json.loads(a.get(key, "[]"))
        return value if isinstance(value, list) else []
    except (TypeError, ValueError):
        return []


def describe(path: str) -> tuple[list[str], bool]:
    """Return (report lines, ok)."""
    lines, problems = [], []
    with h5py.File(path, "r") as f:
        a = f.attrs
        complete = bool(a.get("complete", False))
        if not complete:
            problems.append("the cache is not complete (re-run extract to finish it)")
        schema = a.get("schema_version")
        if schema != SCHEMA_VERSION:
            problems.append(f"schema version {schema} is not the version this fedclip reads ({SCHEMA_VERSION})")
        classes = _json_list(a, "class_names")
        lines += [
            f"cache:        {path}",
            f"complete:     {complete}" + ("" if complete else "  (unfinished: re-run extract to resume)"),
            f"schema:       {schema}",
            f"model:        {a.get('model_name')} ({short(a.get('model_fingerprint'))}, revision "
            f"{a.get('model_revision')}, {int(a.get('model_num_parameters', 0)):,} parameters, run in "
            f"{a.get('model_dtype')} on {a.get('device')})",
            f"dataset:      {a.get('dataset_name')}  source {a.get('source')}",
            f"embed dim:    {a.get('embed_dim')}  image dtype {a.get('image_dtype')}",
            f"classes ({len(classes)}): {', '.join(map(str, classes))}",
            f"prompts:      {_json_list(a, 'prompt_templates')} with names {_json_list(a, 'prompt_names')}",
            f"created:      {a.get('created_at', '-')}  versions {a.get('versions')}",
            f"preprocessing: {a.get('preprocessing')}",
            "domains:",
        ]
        checked = 0
        if "identity_sha256" not in a:
            problems.append("no checksum for the identity attributes (written by an older fedclip)")
        elif identity_sha256(a) != str(a["identity_sha256"]):
            problems.append("checksum MISMATCH in the identity attributes (model, dataset, domains, classes, "
                            "prompts): an attribute was changed")
        else:
            checked += 1
        checks = []
        for key in ("text/embeddings", "text/logit_scale"):
            if key in f:
                checks.append(f[key])
            else:
                problems.append(f"/{key} is missing")
        for name in _json_list(a, "domains"):
            g = f.get(f"domains/{name}")
            if g is None or any(k not in g for k in ("image_embeddings", "labels", "ids")):
                lines.append(f"  {name:<16} missing")
                problems.append(f"domain {name} is missing or incomplete")
                continue
            skipped = g["skipped/ids"].shape[0] if "skipped/ids" in g else 0
            lines.append(f"  {name:<16} {g['ids'].shape[0]:>7} images  {skipped} skipped")
            if skipped:
                for sid, reason in zip(g["skipped/ids"][()], g["skipped/reasons"][()]):
                    lines.append(f"      skipped {sid.decode()}: {reason.decode()}")
            checks += [g["image_embeddings"], g["labels"], g["ids"]]
            checks += [g[k] for k in ("skipped/ids", "skipped/reasons") if k in g]
        for ds in checks:
            expected = ds.attrs.get("sha256")
            if expected is None:
                problems.append(f"no checksum for {ds.name}")
            elif dataset_sha256(ds) != str(expected):
                problems.append(f"checksum MISMATCH in {ds.name}")
            else:
                checked += 1
        lines += problems
        lines.append(f"checksums:    {'all ' + str(checked) + ' verified' if not problems else 'FAILED'}")
    return lines, not problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extract.info", description=__doc__.splitlines()[0])
    parser.add_argument("cache", help="path to a cache file written by python -m extract")
    args = parser.parse_args(argv)
    try:
        lines, ok = describe(args.cache)
    except (OSError, KeyError) as e:
        print(f"error: cannot read {args.cache} as a fedclip cache: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
