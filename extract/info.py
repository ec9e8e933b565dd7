"""python -m extract.info <cache.h5>: what a colleague needs to trust a shared cache, checksums verified.

Exit status: 0 when the cache is complete, of the schema version this fedclip reads, and every checksum
(identity attributes, text embeddings, logit scale, every domain's datasets) matches; 1 otherwise (each
problem is listed); 2, with one line, when the file does not exist, is not a regular file or not HDF5, or
does not hold all its own data (an external or soft link, a virtual dataset, external raw storage).
Every dataset's dtype, shape and stored size are checked before it is read.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .cache_checks import (SCHEMA_VERSION, CacheFormatError, check_declared, check_domain, check_text, open_cache,
                           read_header, schema_version_of)
from .identity import buffer_sha256, identity_sha256, short, strings_sha256


def dataset_sha256(data) -> str:
    if isinstance(data, np.ndarray) and data.dtype.kind == "O":  # variable-length strings
        return strings_sha256(data)
    return buffer_sha256(np.ascontiguousarray(data))


def _json_list(a, key) -> list:
    try:
        value = json.loads(a.get(key, "[]"))
        return value if isinstance(value, list) else []
    except (TypeError, ValueError):
        return []


def _checked_read(ds, kind: str, shape: tuple, problems: list[str]):
    """The dataset's values once its dtype, shape and stored size are right and its checksum matches;
    None (with the problem listed) otherwise."""
    try:
        check_declared(ds, kind, shape)
    except CacheFormatError as e:
        problems.append(f"the cache {e}")
        return None
    expected = ds.attrs.get("sha256")
    if expected is None:
        problems.append(f"no checksum for {ds.name}")
        return None
    data = ds[()]
    if dataset_sha256(data) != str(expected):
        problems.append(f"checksum MISMATCH in {ds.name}")
        return None
    return data


def describe(path: str) -> tuple[list[str], bool]:
    """Return (report lines, ok). A file that is not a self-contained HDF5 file raises CacheFormatError."""
    lines, problems = [], []
    with open_cache(path) as f:
        a = f.attrs
        complete = bool(a.get("complete", False))
        if not complete:
            problems.append("the cache is not complete (re-run extract to finish it)")
        schema = a.get("schema_version")
        schema = schema.item() if isinstance(schema, np.generic) else schema
        if schema_version_of(a) != SCHEMA_VERSION:
            problems.append(f"schema version {schema!r} is not the version this fedclip reads ({SCHEMA_VERSION})")
        try:
            header = read_header(a)
        except CacheFormatError as e:
            header = None
            problems.append(f"the cache {e}")
        classes = _json_list(a, "class_names")
        lines += [
            f"cache:        {path}",
            f"complete:     {complete}" + ("" if complete else "  (unfinished: re-run extract to resume)"),
            f"schema:       {schema}",
            f"model:        {a.get('model_name')} ({short(a.get('model_fingerprint'))}, revision "
            f"{a.get('model_revision')}, {_int(a.get('model_num_parameters', 0)):,} parameters, run in "
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
        num_classes = len(header.class_names) if header else None
        dim = header.embed_dim if header else None
        for key in ("text/embeddings", "text/logit_scale"):
            if key not in f:
                problems.append(f"/{key} is missing")
        if "text/embeddings" in f and "text/logit_scale" in f:
            text = _checked_read(f["text/embeddings"], "float", (None, num_classes, dim), problems)
            scale = _checked_read(f["text/logit_scale"], "float", (), problems)
            checked += (text is not None) + (scale is not None)
            if text is not None and scale is not None:
                try:
                    check_text(text, scale)
                except CacheFormatError as e:
                    problems.append(f"the cache {e}")
        for name in header.domains if header else ():
            g = f.get(f"domains/{name}")
            if g is None or any(k not in g for k in ("image_embeddings", "labels", "ids")):
                lines.append(f"  {name:<16} missing")
                problems.append(f"domain {name} is missing or incomplete")
                continue
            before = len(problems)
            ids = _checked_read(g["ids"], "str", (None,), problems)
            n = None if ids is None else len(ids)
            labels = _checked_read(g["labels"], "int", (n,), problems)
            feats = _checked_read(g["image_embeddings"], "float", (n, dim), problems)
            has_skipped = "skipped/ids" in g and "skipped/reasons" in g
            sids = _checked_read(g["skipped/ids"], "str", (None,), problems) if has_skipped else []
            reasons = _checked_read(g["skipped/reasons"], "str", (None if sids is None else len(sids),),
                                    problems) if has_skipped else []
            reads = (ids, labels, feats) + ((sids, reasons) if has_skipped else ())
            checked += sum(x is not None for x in reads)
            lines.append(f"  {name:<16} {'?' if n is None else n:>7} images  "
                         f"{'?' if sids is None else len(sids)} skipped")
            if sids is not None and reasons is not None:
                lines += [f"      skipped {_text(sid)}: {_text(reason)}" for sid, reason in zip(sids, reasons)]
            not_text = next((s for s in (ids if ids is not None else []) if not _is_utf8(s)), None)
            if not_text is not None:
                problems.append(f"domain {name} has ids that are not UTF-8 text, e.g. {not_text!r}: rebuild the cache "
                                "with python -m extract")
            if len(problems) == before:
                try:
                    check_domain(name, feats.astype(np.float32), labels, [_text(i) for i in ids], num_classes, path)
                except CacheFormatError as e:
                    problems.append(str(e))
        lines += problems
        lines.append(f"checksums:    {'all ' + str(checked) + ' verified' if not problems else 'FAILED'}")
    return lines, not problems


def _is_utf8(s) -> bool:
    try:
        s.decode("utf-8") if isinstance(s, bytes) else str(s).encode("utf-8")
    except UnicodeError:
        return False
    return True


def _text(s) -> str:
    return s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s)


def _int(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extract.info", description=__doc__.splitlines()[0])
    parser.add_argument("cache", help="path to a cache file written by python -m extract")
    args = parser.parse_args(argv)
    try:
        lines, ok = describe(args.cache)
    except CacheFormatError as e:
        print(f"error: {args.cache} {e}", file=sys.stderr)
        return 2
    except (OSError, KeyError) as e:
        print(f"error: cannot read {args.cache} as a fedclip cache: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
