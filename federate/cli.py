"""What the command lines check before Hydra composes, in one line where Hydra would print a block: an
unknown option of a config group (`method=nope`, `backbone=vgg`), and a switch set to anything but true or
false (`overwrite=no` reads as false to Hydra; a switch that decides whether data is kept takes no
guesses)."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def choices(group: str) -> list[str]:
    """The options of a config group: conf/<group>/*.yaml and what was registered in Hydra's ConfigStore."""
    files = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
    stored = {name.removesuffix(".yaml") for name in ConfigStore.instance().repo.get(group, {})}
    return sorted(files | stored)


def unknown_choice(argv: list[str], groups: tuple[str, ...]) -> str | None:
    """The first `group=option` override (also in a sweep's `a,b` list) naming an option that does not exist."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in groups or value.startswith(("choice(", "glob(", "range(", "[")):
            continue
        options = choices(key)
        for option in value.split(","):
            if option.strip() not in options:
                return f"{key}={option.strip()} is not an option of {key}; choose one of {', '.join(options)}"
    return None


def not_a_switch(argv: list[str], switches: tuple[str, ...]) -> str | None:
    """The first `switch=value` override whose values are not all true or false."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in switches:
            bad = [v for v in value.split(",") if v.strip().lower() not in ("true", "false")]
            if bad:
                return f"{key.lstrip('+~')} must be true or false, not {bad[0].strip()!r}"
    return None


def exit_on_bad_override(groups: tuple[str, ...], switches: tuple[str, ...], logger_name: str) -> None:
    message = unknown_choice(sys.argv[1:], groups) or not_a_switch(sys.argv[1:], switches)
    if message:
        sys.stderr.write(f"[{logger_name}][ERROR] - {message}\n")
        sys.exit(2)
