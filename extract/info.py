"""python -m extract.info <cache.h5>: what a colleague needs to trust a shared cache, checksums verified.

Exit status: 0 when the cache is complete and every checksum matches, 1 otherwise, 2 when unreadable.
"""
from __future__ import annotations

import argparse
import json
import sys

import h5py

from .cache import dataset_sha256


def describe(path: str) -> tuple[list[str], bool]:
    """Return (report lines, ok)."""
    lines, ok = [], True
    with h5py.File(path, "r") as f:
        a = f.attrs
        complete = bool(a.get("complete", False))
        ok &= complete
        classes = json.loads(a.get("class_names", "[]"))
        lines += [
            f"cache:        {path}",
            f"complete:     {complete}" + ("" if complete else "  (unfinished: re-run extract to resume)"),
            f"schema:       {a.get('schema_version')}",
            f"model:        {a.get('model_name')} (revision {a.get('model_revision')}, "
            f"{int(a.get('model_num_parameters', 0)):,} parameters, run in {a.get('model_dtype')} on {a.get('device')})",
            f"dataset:      {a.get('dataset_name')}  source {a.get('source')}",
            f"embed dim:    {a.get('embed_dim')}  image dtype {a.get('image_dtype')}",
            f"classes ({len(classes)}): {', '.join(classes)}",
            f"prompts:      {json.loads(a.get('prompt_templates', '[]'))} with names "
            f"{json.loads(a.get('prompt_names', '[]'))}",
            f"created:      {a.get('created_at', '-')}  versions {a.get('versions')}",
            f"preprocessing: {a.get('preprocessing')}",
            "domains:",
        ]
        checks = [f["text/embeddings"]] if "text/embeddings" in f else []
        for name in json.loads(a.get("domains", "[]")):
            g = f.get(f"domains/{name}")
            if g is None:
                lines.append(f"  {name:<16} missing")
                ok = False
                continue
            skipped = g["skipped/ids"].shape[0]
            lines.append(f"  {name:<16} {g['ids'].shape[0]:>7} images  {skipped} skipped")
            for sid, reason in zip(g["skipped/ids"][()], g["skipped/reasons"][()]):
                lines.append(f"      skipped {sid.decode()}: {reason.decode()}")
            checks += [g["image_embeddings"], g["labels"], g["ids"]]
        for ds in checks:
            expected = ds.attrs.get("sha256")
            good = expected is not None and dataset_sha256(ds) == expected
            ok &= good
            if not good:
                lines.append(f"checksum MISMATCH in {ds.name}" if expected else f"no checksum for {ds.name}")
        lines.append(f"checksums:    {'all ' + str(len(checks)) + ' verified' if ok else 'FAILED'}")
    return lines, ok


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
