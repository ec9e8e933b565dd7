"""Methods (Hydra group `method`): a federated method is an object that owns its behaviour, as DomainBed's
`Algorithm` owns its update.

A method says
- what a client's model is (`model`: the adapter, or the adapter with a linear head) and how its state
  splits into a shared part, which clients send and the server combines, and a personal part that each
  client keeps (`split`);
- its local update (`local_update`): which keys train, in which phases, with which extra terms, and what
  the clients send back;
- how the server combines what was sent (`aggregate`: through the run's strategy by default);
- which model each client deploys (`deployed`: evaluated on its validation and test rows) and which models
  the held-out target domain is evaluated with (`target_models`: their mean accuracy is recorded);
- its rounds and training units (`rounds`, `units`), what a client sends back (`update_like`: its shared
  state by default; statistics of its features for FedProto, CCVR and FedPFT) and the bytes of an exchange
  (`bytes_per_client`), which settings it refuses (`check`) and which runner runs it (`run`: the cached
  embeddings by default);
- one more exchange after the last round, on the selected round's states (`after_rounds`: none by
  default; CCVR's calibration).

`federate.federation.Federation` drives the rounds and calls these hooks; no runner, engine, report or
Flower app looks at a method's name. A local update works on M clients at once through a
`federate.training.LocalTraining` (a round's sampled clients in process, the slots of a grouped sweep, or
the one client of a Flower ClientApp), so the same code serves every backend.

Add a method: subclass `Method` (or a built-in), decorate it with `@register("name")`, and give it a
`conf/method/<name>.yaml` (`name` plus its settings, which reach `__init__` as keyword arguments); without a
YAML file its defaults go to Hydra's ConfigStore (README: "Add your own method").
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ..errors import ConfigError

State = dict[str, torch.Tensor]
METHODS: dict[str, type["Method"]] = {}
YAML_DIR = Path(__file__).resolve().parents[2] / "conf" / "method"  # the built-ins' configs


class Method:
    """FedAvg of the whole model (FedCLIP's adapter by default): every sampled client trains the shared
    state for `local_epochs` and sends it back; the strategy combines the updates; every client deploys the
    shared model, which the target domain is evaluated with too."""

    name = "fedavg"
    communicates = True  # the clients send their shared state every round (bytes_per_round, Flower)

    def __init__(self, settings: dict | None = None):
        """A subclass with settings takes them as keyword arguments, checks them and hands them over here;
        they are recorded in summary.json (`method_settings`) and make the report's rows."""
        self.settings = dict(settings or {})

    def describe(self) -> dict:
        return {"name": self.name, **self.settings}

    # --- the run

    def check(self, cfg) -> None:
        """Refuse, in one line, settings this method cannot run with."""
        optimizer = (cfg.get("optimizer") or {}).get("name", "adam_l2")
        if optimizer != "adam_l2":
            raise ConfigError(f"optimizer={optimizer} is for the methods that train the backbone (fedavg_full, "
                              "fedprox_full, fedclip_full; backbone=alexnet picks optimizer=sgd); method="
                              f"{self.name} trains its adapter with FedCLIP's Adam (optimizer=adam_l2)")
        from ..privacy import check as check_privacy

        check_privacy(cfg, self)
        if cfg.backend == "flower" and not self.communicates:
            raise ConfigError(f"backend=flower runs methods whose clients communicate; method={self.name} does not "
                              "(use backend=local)")

    def run(self, cfg, output_dir, start: float) -> dict:
        """Run an experiment of this method (the in-process runner on the cached embeddings)."""
        from ..run import run_cached

        return run_cached(cfg, self, output_dir, start)

    def groupable(self, cfg) -> bool:
        """Whether a grouped sweep (hydra/launcher=batched) can train this method's points together."""
        return self.rounds(cfg) > 0

    def rounds(self, cfg) -> int:
        return int(cfg.rounds)

    def units(self, clients: list) -> list[list[int]]:
        """The training units: lists of client indices whose training rows one model trains on (one per
        client; `central` pools them all)."""
        return [[i] for i in range(len(clients))]

    def model(self, adapter):
        """The model every client trains and evaluates (an `Adapter`: the run's adapter by default)."""
        return adapter

    def split(self, state: State) -> tuple[State, State]:
        """The initial model state as (shared, personal): the server holds the shared part; each client
        starts with its own copy of the personal part."""
        return state, {}

    def private_epochs(self, cfg) -> tuple[int, int]:
        """Epochs over a client's training rows (privacy=dpsgd's accounting, federate/privacy.py): in a round it
        trains (all of `local_update`'s phases) and in every round for the model it deploys (`deployed`). A
        local update that trains more than this is stopped (federate/training.py LocalTraining.budget)."""
        return int(cfg.local_epochs), 0

    def train_settings(self, cfg):
        from ..engine import TrainSettings

        return TrainSettings(lr=float(cfg.lr), batch_size=int(cfg.batch_size), loss=cfg.loss,
                             precision=cfg.get("precision", "fp32"))

    # --- a round

    def local_update(self, train, shared: State, personal: State):
        """The sampled clients' local training (`train`: a federate.training.LocalTraining over M clients;
        `personal`: their personal states [M, ...], updated in place); returns what they send
        (a federate.training.Update)."""
        return train.train(shared, personal)

    def aggregate(self, server, shared: State, update) -> State:
        """The next shared state from the clients' update (the run's strategy, federate/strategy.py)."""
        return server.aggregate_train(shared, update.stacked, update.num_examples)

    # --- evaluation

    def deployed(self, train, shared: State, personal: State) -> list[State]:
        """The model each of `train`'s M clients is evaluated with (the same object for clients that share
        one: they are evaluated in one pass)."""
        return [shared] * len(train)

    def target_models(self, shared: State, personal: State) -> list[State]:
        """The models the target domain is evaluated with (the recorded accuracy is their mean)."""
        return [shared]

    def update_like(self, shared: State, round_) -> State:
        """What a training client sends back in `round_` (a round's number, or the name of the exchange
        after the rounds): tensors with its keys, shapes and dtypes (their values are not read). The shared
        state by default; a method that sends statistics of its features says which. The Flower server
        checks every reply against it, and `bytes_per_client` counts it."""
        return shared

    # --- after the rounds

    def after_rounds(self) -> str | None:
        """The name of one more exchange with every client after the last round, or None (the default).

        It runs on the selected round's states, as a round does: `Federation.steps` requests it from the
        backend like a round tagged with this name (the clients' `local_update` sees `train.round` = the
        name and returns what `update_like(shared, name)` describes; in Flower, a client's personal state
        there is its latest), `aggregate` makes the final shared state, and that state is evaluated.
        summary.json reports the final state's numbers, the selected round's own under `before_<name>`,
        and `bytes_total` counts the exchange once (`bytes_after_rounds`). CCVR's calibration is one."""
        return None

    # --- cost

    def bytes_per_client(self, shared: State, round_=1) -> dict[str, int]:
        """What one training client receives (the shared state) and sends back (`update_like`) in an
        exchange, in bytes as the tensors are sent (float32, or the dtype `update_like` gives)."""
        if not self.communicates:
            return {"up": 0, "down": 0}
        return {"up": nbytes(self.update_like(shared, round_)), "down": nbytes(shared)}


def register(name: str, config: str | Path | None = None, **defaults):
    """Class decorator: make a Method subclass available as `method=<name>`. Its config node is
    conf/method/<name>.yaml for a built-in; else `config`, a YAML file (a path relative to the module that
    defines the method; `# @package _global_` as its first line lets it set other keys, such as `loss`),
    or the `defaults` (`method.<key>=...`); either goes to Hydra's ConfigStore."""
    def add(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        store = ConfigStore.instance()
        if config is not None:
            path = Path(config) if Path(config).is_absolute() else \
                Path(sys.modules[cls.__module__].__file__).resolve().parent / config
            text = path.read_text()
            header = [line.strip() for line in text.splitlines()]
            header = header[:next((i for i, line in enumerate(header) if line and not line.startswith("#")), len(header))]
            glob = "# @package _global_" in header  # (Hydra's package header, in the file's leading comments)
            store.store(group="method", name=name, node=OmegaConf.create(text), package="_global_" if glob else None)
        elif not (YAML_DIR / f"{name}.yaml").exists():
            store.store(group="method", name=name, node={"name": name, **defaults})
        return cls
    return add


def build(cfg_method) -> Method:
    """The method named by the `method` config group (`name` plus its settings)."""
    settings = {k: v for k, v in dict(cfg_method).items() if k != "name"}
    name = cfg_method["name"]
    if name not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(sorted(METHODS))}, not {name!r}")
    try:
        return METHODS[name](**settings)
    except TypeError as e:
        raise ConfigError(f"method {name}: {e}") from None


def number(key: str, value, *, low: float = 0.0, high: float = math.inf, integer: bool = False,
           open_low: bool = False) -> float | int:
    """A method setting checked to be a finite number in [low, high] (or (low, high])."""
    try:
        x = int(value) if integer and float(value) == int(value) else float(value)
    except (TypeError, ValueError):
        x = math.nan
    if isinstance(value, bool) or (integer and not isinstance(x, int)) or not math.isfinite(x) or \
            x < low or x > high or (open_low and x == low):
        bounds = f"{'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        what = f"an integer {bounds}" if integer else f"{bounds} and finite"
        raise ConfigError(f"method.{key} must be {what}, not {value!r}")
    return x


def refuse_privacy(cfg, method: "Method", sends: str) -> None:
    """A method whose clients send statistics of their features (`sends`): no privacy setting covers them
    (DP-SGD protects the training steps, DP-FedAvg clipped weight updates), so none is offered."""
    from ..privacy import kind

    if kind(cfg) != "none":
        raise ConfigError(f"method={method.name} sends {sends}, which privacy={kind(cfg)} does not protect; use "
                          "privacy=none")


def nbytes(state: State) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


def key_set(state: State, prefix: str) -> tuple[str, ...]:
    return tuple(k for k in state if k.startswith(prefix))


from . import (apfl, ccvr, central, ditto, fedavg, fedbabu, fedper, fedpft, fedproto, fedrep,  # noqa: E402,F401,I001
               fedrod, full, local, zeroshot)
