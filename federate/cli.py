"""What the command lines check before Hydra composes, in one line where Hydra would print a block: an
unknown option of a config group (`method=nope`, `backbone=vgg`), a switch set to anything but true or
false (`overwrite=no` reads as false to Hydra; a switch that decides whether data is kept takes no
guesses), and a setting that does not exist (`lrr=1e-3`, also as `+lrr=1e-3`, which Hydra would add to
the config and nothing would read), with the setting meant when one of a config group's options has it
(`mu=0.1`: method.mu of method=fedprox), and a value of the wrong type (`rounds=abc`), which Hydra would
report in a block of six lines with status 1."""
from __future__ import annotations

import difflib
import logging
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig

# Both commands' configs, found from any folder: `hydra.main(config_path=str(CONF_DIR))` is absolute, so a
# script that imports the entry point (README: "Add your own adapter") composes the same config.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# federate's config groups (conf/<group>/)
GROUPS = ("dataset", "model", "method", "adapter", "strategy", "backbone", "optimizer", "partition")


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


def setting_paths(cfg, prefix: str = "") -> list[str]:
    """Every key of a composed config as a dotted path (nodes and leaves; missing values included)."""
    paths = []
    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else cfg.keys()
    for key in keys:
        path = f"{prefix}{key}"
        paths.append(path)
        child = cfg._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_missing():
            paths += setting_paths(child, path + ".")
    return paths


def group_options(override) -> list[str]:
    """The options a group override picks: one, or each of a sweep's `a,b` list (other sweeps: none)."""
    from hydra.core.override_parser.types import ValueType

    if override.value_type == ValueType.ELEMENT:
        return [str(override.value())]
    if override.value_type == ValueType.SIMPLE_CHOICE_SWEEP:
        return [str(v) for v in override.sweep_string_iterator()]
    return []


def unknown_setting(argv: list[str], config_name: str) -> str | None:
    """The first `key=value`, `+key=value`, `++key=value` or `~key` override whose key is in no config the
    command line composes (the config group options it picks, each option of a swept group tried in turn),
    with the closest known key. Hydra's own checks (syntax, types) come later; hydra.* is Hydra's."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(argv)  # Hydra's own: flags (--cfg job, -m) apart from overrides
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # a syntax error: Hydra reports it
        return None
    groups, keys = {}, []
    for o in overrides:
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or o.package is not None:
            continue
        if choices(key):
            groups[key] = group_options(o) or [None]
        else:
            keys.append((o.input_line.split("=")[0], key))
    if not keys:
        return None
    known: set[str] = set()
    names, options = list(groups), [groups[g] for g in groups]
    # one composition per option of each swept group, with the other groups at their first option
    picks = {tuple(opts[0] for opts in options)}
    for i, opts in enumerate(options):
        picks |= {tuple(o if j == i else options[j][0] for j in range(len(options))) for o in opts}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for pick in picks:
            chosen = [f"{g}={o}" for g, o in zip(names, pick) if o is not None]
            try:
                known |= set(setting_paths(compose(config_name=config_name, overrides=chosen)))
            except Exception:  # a group option that cannot compose: Hydra says why
                return None
    for written, key in keys:
        if key not in known:
            hint = group_setting_hint(key, value_of(args.overrides, written), known, groups, config_name)
            if hint is None:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"did you mean {close[0]}?" if close else f"python -m {config_name} --cfg job lists the settings"
            return f"{written} is not a setting of {config_name}; {hint}"
    return None


def value_of(overrides: list[str], written: str) -> str:
    """The value written after `written=` on the command line ("..." when there is none)."""
    line = next((o for o in overrides if o.split("=")[0] == written), "")
    return line.partition("=")[2] or "..."


def group_setting_hint(key: str, value: str, known: set[str], chosen: dict, config_name: str) -> str | None:
    """When `key` (or its last part) is a setting of an option of a config group, what to write instead:
    `mu=0.1` -> method.mu of method=fedprox; `partition.alpha=-1` -> partition=dirichlet partition.alpha=-1."""
    from hydra import compose, initialize_config_dir

    groups = GROUPS if config_name == "federate" else ("dataset", "model")
    name = key.split(".")[-1]
    group = key.split(".")[0] if "." in key else None
    if group is None and any(p.split(".")[-1] == name and p.split(".")[0] in groups for p in known):
        path = next(p for p in sorted(known) if p.split(".")[-1] == name and p.split(".")[0] in groups)
        return f"did you mean {path}={value}?"  # a setting of the chosen option of a group
    found = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for g in ([group] if group in groups else groups if group is None else []):
            for option in choices(g):
                if option in (chosen.get(g) or []) or not may_have(g, option, name):
                    continue
                try:
                    cfg = compose(config_name=config_name, overrides=[f"{g}={option}"])
                except Exception:  # an option that does not compose alone
                    continue
                if f"{g}.{name}" in setting_paths(cfg):
                    found.append((g, option))
    if not found:
        return None
    g = found[0][0]
    options = " or ".join(f"{g}={o}" for gg, o in found if gg == g)
    return f"{g}.{name} is a setting of {options}: did you mean {found[0][0]}={found[0][1]} {g}.{name}={value}?"


def may_have(group: str, option: str, name: str) -> bool:
    """Whether conf/<group>/<option>.yaml may set `name` (a quick look before composing it); an option kept in
    Hydra's ConfigStore may."""
    path = CONF_DIR / group / f"{option}.yaml"
    return not path.is_file() or f"{name}:" in path.read_text()


def bad_value(argv: list[str], config_name: str) -> str | None:
    """The first `key=value` override whose value the config's types refuse (`rounds=abc`, `text_adapter=maybe`),
    as one line (Hydra would print a block of six lines and exit with status 1). Each point of a sweep over
    choices or a range is tried, with the other settings at their first value."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(argv)
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # a syntax error: Hydra reports it
        return None
    lines, swept = [], []
    for o in overrides:
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        if not o.is_sweep_override():
            lines.append(o.input_line)
            continue
        try:
            values = [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        except Exception:  # glob() and interval sweeps: Hydra expands them itself
            continue
        swept.append(len(lines))
        lines.append(values)
    first = [line if isinstance(line, str) else line[0] for line in lines]
    tries = [first] + [first[:i] + [v] + first[i + 1:] for i in swept for v in lines[i][1:]]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for chosen in tries:
            try:
                compose(config_name=config_name, overrides=chosen)
            except Exception as e:
                cause = e.__cause__
                if type(cause).__name__ != "ValidationError":
                    return None  # a missing option or another error: Hydra and the other checks report it
                written = str(e).removeprefix("Error merging override ").strip()
                reason = str(cause).strip().splitlines()[0]
                return (f"{written}: {reason}; python -m {config_name} --cfg job shows every setting with its value")
    return None


def error_line(logger_name: str, message: str) -> None:
    """One error line: through logging once Hydra has set it up (the run's log file keeps it), else to stderr."""
    if logging.getLogger().handlers:
        logging.getLogger(logger_name).error("%s", message)
    else:
        sys.stderr.write(f"[{logger_name}][ERROR] - {message}\n")


def exit_on_bad_override(groups: tuple[str, ...], switches: tuple[str, ...], logger_name: str) -> None:
    argv = sys.argv[1:]
    if not CONF_DIR.is_dir():  # conf/ lives in the clone, beside the packages: a copy installed alone lacks it
        message = f"fedclip's configs are not at {CONF_DIR}; install fedclip from its clone with pip install -e ."
    else:
        message = (unknown_choice(argv, groups) or not_a_switch(argv, switches) or unknown_setting(argv, logger_name)
                   or bad_value(argv, logger_name))
    if message:
        sys.stderr.write(f"[{logger_name}][ERROR] - {message}\n")
        sys.exit(2)
