"""python -m extract.hub export|push|pull|import ... (see extract/hub/__init__.py and docs/sharing.md).

Exit status: 0 when done; 2, with one line, on bad input (a damaged, tampered, truncated or incomplete
folder, a folder or file the tool did not write, an unreachable hub without a local copy); 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import ExtractError, describe_os_error

log = logging.getLogger("extract.hub")
INTERRUPTED = 130

COMMANDS = {  # command: (positional arguments, options with their kind)
    "export": (("cache", "folder"), {"license": str}),
    "push": (("cache", "repo_id"), {"private": bool, "tag": str, "license": str}),
    "pull": (("ref",), {"cache_dir": str, "cache_file": str, "overwrite": bool}),
    "import": (("folder", "cache"), {"overwrite": bool}),
}
HELP = {
    "export": "write a cache in the hub layout (Parquet files and a dataset card) into a new folder",
    "push": "export a cache and upload it to a Hugging Face dataset repo in one commit",
    "pull": "download <owner/name>[@revision], verify it and rebuild the HDF5 cache under cache_dir/hub/",
    "import": "rebuild the HDF5 cache from a folder in the hub layout, verified",
}


def options(command: str, items: list[str]) -> dict:
    """`key=value` options of `command`, typed (booleans are true or false)."""
    known = COMMANDS[command][1]
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ExtractError(f"{item!r} is not an option of {command}; its options: "
                               f"{', '.join(f'{k}=...' for k in known)}")
        if known[key] is bool:
            if value.lower() not in ("true", "false"):
                raise ExtractError(f"{key} must be true or false, not {value!r}")
            out[key] = value.lower() == "true"
        else:
            out[key] = value
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m extract.hub", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for command, (positional, opts) in COMMANDS.items():
        s = sub.add_parser(command, help=HELP[command], description=HELP[command])
        for name in positional:
            s.add_argument(name)
        s.add_argument("options", nargs="*", metavar="key=value", help=", ".join(f"{k}=..." for k in opts))
    return p


def run(args) -> None:
    from . import remote
    from .export import export
    from .rebuild import import_folder

    opts = options(args.command, args.options)
    if args.command == "export":
        done = export(args.cache, args.folder, license=opts.get("license"))
        print(f"exported {args.cache} to {done.folder}: {done.rows} image rows in {len(done.files)} Parquet files, "
              f"cache identity {done.identity_sha256}")
        print(f"load it with: datasets.load_dataset({str(done.folder)!r}, 'images')")
    elif args.command == "push":
        done = remote.push(args.cache, args.repo_id, private=opts.get("private", False), tag=opts.get("tag"),
                           license=opts.get("license"))
        print(f"pushed {args.cache} to {done.repo_id}: commit {done.commit}"
              f"{f' (tag {done.tag})' if done.tag else ''}, cache identity {done.identity_sha256}")
        print(f"a colleague pulls it with: python -m extract.hub pull {done.repo_id}@{done.commit}")
        model = f" model.name={done.model_name}" if done.model_name else ""
        print(f"and runs on it with: python -m federate cache_file=hf://{done.repo_id}@{done.commit}{model}")
    elif args.command == "pull":
        done = remote.pull(args.ref, cache_dir=opts.get("cache_dir", "cache"), cache_file=opts.get("cache_file"),
                           overwrite=opts.get("overwrite", False))
        model = _model(done.path)
        print(f"{'kept' if done.reused else 'pulled'} {done.repo_id}@{done.revision} (commit {done.commit}) as "
              f"{done.path}")
        where = f" cache_dir={opts['cache_dir']}" if "cache_dir" in opts else ""
        print(f"run on it with: python -m federate cache_file=hf://{done.repo_id}@{done.commit}{where}{model}"
              if not opts.get("cache_file") else f"run on it with: python -m federate cache_file={done.path}{model}")
    else:
        done = import_folder(args.folder, args.cache, overwrite=opts.get("overwrite", False))
        print(f"{'kept' if done.reused else 'imported'} {args.folder} as {done.path}: {done.rows} image rows, cache "
              f"identity {done.identity_sha256}")


def _model(path) -> str:
    from ..cache import read_settings

    name = (read_settings(path) or {}).get("model_name")
    return f" model.name={name}" if name else ""


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(args)
    except ExtractError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {describe_os_error(e, 'read or write a file')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); nothing half-written carries a final name: run the command again",
              file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
