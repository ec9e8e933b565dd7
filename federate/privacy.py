"""Differential privacy (Hydra group `privacy`, docs/privacy.md): its settings, its accounting, and the
client-level mechanism.

- `privacy=dpsgd`: sample-level DP-SGD on every client. The engines do the mechanism (federate/engine.py:
  Poisson batches, per-sample clipping, Gaussian noise, `SampleDP`); `SampleLedger` counts each client's
  steps and gives its epsilon with Opacus' accountant (RDP or PRV), plans the whole run before it trains
  (the noise multiplier for a target epsilon, or a run that would exceed its cap is refused) and records
  every round's epsilon.
- `privacy=dp_client`: client-level DP-FedAvg (McMahan et al. 2018). `ClientLevelDP` wraps the run's
  strategy: it clips each sampled client's update, adds Gaussian noise to their sum and hands the noisy
  mean to the strategy; clients join each round by Poisson sampling (`poisson_sample`); `ClientLedger`
  gives the epsilon over the rounds with Flower's RDP accountant.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
import zlib

import numpy as np
import torch

from .engine import SampleDP, poisson_rate
from .errors import ConfigError

KINDS = ("none", "dpsgd", "dp_client")
ACCOUNTANTS = ("rdp", "prv")
SIDES = ("server", "client")
EPSILON_TOLERANCE = 0.01  # Opacus' get_noise_multiplier's


def kind(cfg) -> str:
    """The run's privacy: none, dpsgd or dp_client."""
    node = cfg.get("privacy")
    return "none" if node is None else str(node.get("name", "none"))


def _positive(key: str, value, *, zero: bool = False, none: bool = False) -> float | None:
    if value is None and none:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if isinstance(value, bool) or not math.isfinite(x) or x < 0 or (x == 0 and not zero):
        raise ConfigError(f"privacy.{key} must be {'>= 0' if zero else '> 0'} and finite{', or null' if none else ''}, "
                          f"not {value!r}")
    return x


def check(cfg, method) -> None:
    """Refuse, in one line, privacy settings that cannot give the guarantee they name."""
    name = kind(cfg)
    if name not in KINDS:
        raise ConfigError(f"privacy must be one of {', '.join(KINDS)}, not {name!r}")
    if name == "none":
        return
    p = cfg.privacy
    sigma = _positive("noise_multiplier", p.get("noise_multiplier"), zero=True, none=True)
    epsilon = _positive("epsilon", p.get("epsilon"), none=True)
    delta = p.get("delta")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ConfigError(f"privacy.delta must be in (0, 1), not {delta!r}")
    if sigma is None and epsilon is None:
        raise ConfigError(f"privacy={name} needs its noise: privacy.noise_multiplier=<sigma>, or a target "
                          "privacy.epsilon=<epsilon> to derive it from")
    if name == "dpsgd":
        _positive("max_grad_norm", p.get("max_grad_norm"))
        if p.get("accountant") not in ACCOUNTANTS:
            raise ConfigError(f"privacy.accountant must be rdp or prv, not {p.get('accountant')!r}")
        if cfg.loss != "ce":
            raise ConfigError("privacy=dpsgd clips each row's gradient, and the in-batch contrastive loss ties every "
                              "row of a batch to the others; use loss=ce")
        from . import adapters

        adapter = adapters.ADAPTERS.get(cfg.adapter.get("name"))
        if adapter is not None and adapter.engine is not None:
            raise ConfigError(f"privacy=dpsgd needs per-sample gradients, which adapter={adapter.name}'s own engine "
                              f"({adapter.engine}) does not compute; use another adapter, or privacy=dp_client")
        if cfg.engine == "plain":
            raise ConfigError("privacy=dpsgd trains with per-sample gradients, which engine=plain does not compute; "
                              "use engine=generic (or auto)")
    else:
        _positive("clip_norm", p.get("clip_norm"))
        if p.get("side") not in SIDES:
            raise ConfigError(f"privacy.side must be server or client (who clips the updates), not {p.get('side')!r}")
        if not method.communicates:
            raise ConfigError(f"privacy=dp_client protects what clients send; method={method.name} sends nothing "
                              "(use privacy=dpsgd)")
        if cfg.aggregation != "uniform":
            raise ConfigError("privacy=dp_client averages the clipped updates with equal weights (a client's weight "
                              "would reveal its size and change the sensitivity); use aggregation=uniform")


# --- sample level (DP-SGD): Opacus' accountants


def _rdp_orders() -> list[float]:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(sigma: float, q: float) -> np.ndarray:
    """Opacus' RDP of one step of the sampled Gaussian at its default orders (steps compose linearly)."""
    from opacus.accountants.analysis import rdp

    return np.asarray(rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_rdp_orders()))


@functools.lru_cache(maxsize=4096)
def dpsgd_epsilon(sigma: float, history: tuple[tuple[float, int], ...], delta: float, accountant: str) -> float:
    """Epsilon at `delta` of DP-SGD steps with noise multiplier sigma: `history` is ((q, steps), ...), as
    Opacus' accountants compute it (RDP: `RDPAccountant.get_epsilon`, whose RDP is steps times one step's;
    PRV: `PRVAccountant.get_epsilon`). No step: 0; sigma 0 with a step: infinite."""
    history = tuple((q, n) for q, n in history if n)
    if not history:
        return 0.0
    if sigma == 0:
        return math.inf
    if accountant == "rdp":
        from opacus.accountants.analysis import rdp

        total = sum(_rdp_one_step(sigma, q) * n for q, n in history)
        with warnings.catch_warnings():  # ("optimal order is the largest alpha": Opacus' orders, as it reports)
            warnings.simplefilter("ignore", UserWarning)
            eps, _ = rdp.get_privacy_spent(orders=_rdp_orders(), rdp=total, delta=delta)
        return float(eps)
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma, q, n) for q, n in history]
    return float(acc.get_epsilon(delta=delta))


def dpsgd_noise(target: float, history: tuple[tuple[float, int], ...], delta: float, accountant: str) -> float:
    """The noise multiplier that keeps DP-SGD steps `history` within (target, delta): Opacus'
    `get_noise_multiplier` for one sampling rate; for several (a pooled unit, then each client's
    fine-tuning), the same search over the whole history."""
    history = tuple((q, n) for q, n in history if n)
    if not history:
        return 0.0
    try:
        if len(history) == 1:
            from opacus.accountants.utils import get_noise_multiplier

            (q, n), = history
            return float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=n,
                                              accountant=accountant, epsilon_tolerance=EPSILON_TOLERANCE))
        low, high, eps_high = 0.0, 10.0, math.inf
        while eps_high > target:
            high *= 2
            eps_high = dpsgd_epsilon(high, history, delta, accountant)
            if high > 1e6:
                raise ValueError("The privacy budget is too low.")
        while target - eps_high > EPSILON_TOLERANCE:
            mid = (low + high) / 2
            eps = dpsgd_epsilon(mid, history, delta, accountant)
            if eps < target:
                high, eps_high = mid, eps
            else:
                low = mid
        return high
    except ValueError:  # Opacus: the budget is too low (sigma beyond 1e6)
        raise ConfigError(f"privacy.epsilon={target} cannot be met at privacy.delta={delta} over this run's steps "
                          "(the noise would exceed 1e6 times the clipping norm); raise privacy.epsilon or lower rounds "
                          "or local_epochs") from None


class SampleLedger:
    """privacy=dpsgd: every client's DP-SGD steps (per sampling rate) and its epsilon.

    A client's rows train when its unit is sampled (`method.private_epochs(cfg)[0]` epochs: all of a round's
    local training phases), every round for the model it deploys (`[1]`, FedBABU's fine-tuning) and at the
    end with `finetune_epochs`; each epoch is b steps at rate q = 1 / b (`engine.poisson_rate`). The plan
    of the whole run (which units are sampled depends on the seed and the round only) gives the noise
    multiplier for privacy.epsilon, or refuses a run whose noise would exceed it."""

    def __init__(self, cfg, method, clients, units: list[str], unit_members: list[list[int]], unit_rows: list[int],
                 sample, rounds: int):
        p = cfg.privacy
        self.delta, self.accountant = float(p.delta), str(p.accountant)
        self.max_grad_norm = float(p.max_grad_norm)
        self.batch_size = int(cfg.batch_size)
        self.clients = [c.name for c in clients]
        self.train_epochs, self.deploy_epochs = (int(e) for e in method.private_epochs(cfg))
        # fine-tuning after the rounds (finetune_epochs) starts from the model each client deploys, which
        # `deployed` may train too (FedBABU)
        self.finetune_epochs = int(cfg.finetune_epochs) + self.deploy_epochs if rounds and cfg.finetune_epochs else 0
        # each unit's and each client's rate q, steps per epoch b; a client trains in its unit's rounds
        self.unit_rate = [poisson_rate(n, self.batch_size)[:2] for n in unit_rows]
        self.client_rate = [poisson_rate(c.sizes["train"], self.batch_size)[:2] for c in clients]
        self.unit_of = {i: u for u, members in enumerate(unit_members) for i in members}
        self.steps = {c: {} for c in self.clients}  # client -> {q: steps}
        plan = {c: {} for c in self.clients}
        for r in range(1, rounds + 1):
            self._add(plan, sample(r), r)
        for i, c in enumerate(self.clients):
            self._count(plan[c], self.client_rate[i], self.finetune_epochs)
        self.plan = {c: tuple(sorted(h.items())) for c, h in plan.items()}
        self.target = None if p.get("epsilon") is None else float(p.epsilon)
        sigma = p.get("noise_multiplier")
        if sigma is None:  # the least noise that keeps every client within the target
            sigma = max((dpsgd_noise(self.target, h, self.delta, self.accountant) for h in self.plan.values()), default=0.0)
        self.noise_multiplier = float(sigma)
        planned = self.planned_epsilon()
        if self.target is not None and planned > self.target:
            need = max(dpsgd_noise(self.target, h, self.delta, self.accountant) for h in self.plan.values())
            raise ConfigError(f"privacy.noise_multiplier={self.noise_multiplier:g} spends epsilon {planned:.3g} > "
                              f"privacy.epsilon={self.target:g} (delta {self.delta:g}) over this run's steps; raise "
                              f"privacy.noise_multiplier to {need:.4g} (or drop it to derive it), or lower rounds or "
                              "local_epochs")

    @staticmethod
    def _count(history: dict, rate: tuple[int, float], epochs: int) -> None:
        b, q = rate
        if epochs:
            history[q] = history.get(q, 0) + epochs * b

    def _add(self, ledger: dict, sampled_units: list[int], r: int) -> None:
        for i, c in enumerate(self.clients):
            if self.unit_of.get(i) in sampled_units:
                self._count(ledger[c], self.unit_rate[self.unit_of[i]], self.train_epochs)
            self._count(ledger[c], self.client_rate[i], self.deploy_epochs)

    @property
    def sample_dp(self) -> SampleDP:
        return SampleDP(self.max_grad_norm, self.noise_multiplier)

    def epsilon(self, history) -> float:
        return dpsgd_epsilon(self.noise_multiplier, tuple(sorted(history.items())) if isinstance(history, dict)
                             else history, self.delta, self.accountant)

    def planned_epsilon(self) -> float:
        return max((self.epsilon(h) for h in self.plan.values()), default=0.0)

    def end_round(self, r: int, sampled_units: list[int]) -> dict:
        """Round r's steps (the sampled units' training, every client's deployed model): its record's fields."""
        self._add(self.steps, sampled_units, r)
        return self.record()

    def finetuned(self) -> None:
        for i, c in enumerate(self.clients):
            self._count(self.steps[c], self.client_rate[i], self.finetune_epochs)

    def record(self) -> dict:
        """What history.jsonl and summary.json carry: each client's epsilon so far, the worst, delta."""
        each = {c: json_number(self.epsilon(h)) for c, h in self.steps.items()}
        worst = max((self.epsilon(h) for h in self.steps.values()), default=0.0)
        return {"epsilon": json_number(worst), "delta": self.delta, "epsilon_clients": each}

    def describe(self) -> dict:
        return {"name": "dpsgd", "level": "sample", "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.max_grad_norm, "delta": self.delta, "accountant": self.accountant,
                "target_epsilon": self.target, "sampling": "Poisson, each row with probability q = 1 / (batches per "
                "epoch) at every step", "sample_rates": {c: q for c, (_, q) in zip(self.clients, self.client_rate)}}

    def state(self) -> dict:
        return {c: [[q, n] for q, n in sorted(h.items())] for c, h in self.steps.items()}

    def load(self, state) -> None:
        if not isinstance(state, dict) or set(state) != set(self.clients):
            raise ValueError("the checkpoint's DP-SGD steps are not this run's clients'")
        self.steps = {c: {float(q): int(n) for q, n in state[c]} for c in self.clients}


def json_number(x: float) -> float | None:
    """JSON has no infinity: an infinite epsilon (noise 0) is recorded as null."""
    return x if math.isfinite(x) else None


# --- client level (DP-FedAvg): Flower's accountant


def poisson_sample(seed: int, round_: int, alive: int, rate: float) -> list[int]:
    """DP-FedAvg's sampling: each of the `alive` units joins round r independently with probability `rate`
    (McMahan et al. 2018), drawn from the seed and the round only."""
    if rate >= 1:
        return list(range(alive))
    rng = np.random.default_rng([int(seed), int(round_), zlib.crc32(b"dp_client")])
    return [i for i, u in enumerate(rng.random(alive)) if u < rate]


class ClientLedger:
    """privacy=dp_client: epsilon over the rounds with Flower's `RdpAccountant` (flwr.supercore.
    privacy_accounting, through Google's dp-accounting), each round one Poisson-sampled Gaussian release
    (sample M of population K, add-or-remove-one clients; M = K: every client, no amplification)."""

    def __init__(self, cfg, population: int, expected: int, rounds: int):
        p = cfg.privacy
        self.delta, self.population, self.expected = float(p.delta), int(population), int(expected)
        self.clip_norm, self.side = float(p.clip_norm), str(p.side)
        self.target = None if p.get("epsilon") is None else float(p.epsilon)
        sigma = p.get("noise_multiplier")
        if sigma is None:
            sigma = self._noise_for(self.target, rounds)
        self.noise_multiplier = float(sigma)
        self.rounds_released = 0
        planned = self.epsilon(rounds)
        if self.target is not None and planned > self.target:
            raise ConfigError(f"privacy.noise_multiplier={self.noise_multiplier:g} spends epsilon {planned:.3g} > "
                              f"privacy.epsilon={self.target:g} (delta {self.delta:g}) over {rounds} rounds; raise "
                              f"privacy.noise_multiplier to {self._noise_for(self.target, rounds):.4g} (or drop it to "
                              "derive it), or lower rounds")

    def epsilon(self, releases: int) -> float:
        return client_epsilon(self.noise_multiplier, self.population, self.expected, releases, self.delta)

    def _noise_for(self, target: float, rounds: int) -> float:
        """The least noise multiplier within `target` over the rounds (Opacus' search, on Flower's accountant)."""
        def eps(sigma):
            return client_epsilon(sigma, self.population, self.expected, rounds, self.delta)

        low, high = 0.0, 10.0
        while eps(high) > target:
            high *= 2
            if high > 1e6:
                raise ConfigError(f"privacy.epsilon={target} cannot be met at privacy.delta={self.delta} over {rounds} "
                                  "rounds; raise privacy.epsilon or lower rounds")
        eps_high = eps(high)
        while target - eps_high > EPSILON_TOLERANCE:
            mid = (low + high) / 2
            e = eps(mid)
            if e < target:
                high, eps_high = mid, e
            else:
                low = mid
        return high

    def end_round(self, r: int, sampled_units: list[int]) -> dict:
        self.rounds_released = r  # every round releases a noisy mean, also one that sampled no client
        return self.record()

    def finetuned(self) -> None:  # local fine-tuning sends nothing
        pass

    def record(self) -> dict:
        return {"epsilon": json_number(self.epsilon(self.rounds_released)), "delta": self.delta}

    def describe(self) -> dict:
        return {"name": "dp_client", "level": "client", "noise_multiplier": self.noise_multiplier,
                "clip_norm": self.clip_norm, "side": self.side, "delta": self.delta, "accountant": "flwr RdpAccountant",
                "target_epsilon": self.target, "sampling": f"Poisson, each client with probability "
                f"{self.expected}/{self.population} each round", "expected_clients": self.expected}

    def state(self) -> dict:
        return {"rounds_released": self.rounds_released}

    def load(self, state) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("rounds_released"), int):
            raise ValueError("the checkpoint's DP-FedAvg record is damaged")
        self.rounds_released = state["rounds_released"]



@functools.lru_cache(maxsize=4096)
def client_epsilon(sigma: float, population: int, expected: int, releases: int, delta: float) -> float:
    """Epsilon at `delta` after `releases` rounds of DP-FedAvg, by Flower's RdpAccountant: each round a
    Gaussian release of noise multiplier sigma on a Poisson sample of rate expected / population
    (add-or-remove-one client). No round: 0; sigma 0: infinite."""
    if releases == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                                   SamplingMethod)
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    absl = logging.getLogger("absl")  # dp-accounting logs each RDP order it leaves out, every call
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                                 neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                                 sampling_method=SamplingMethod.POISSON))
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=expected,
                                                population_size=population), count=releases)
        return float(accountant.get_privacy_spent().epsilon)
    finally:
        absl.setLevel(level)


class ClientLevelDP:
    """DP-FedAvg around the run's strategy (federate/strategy.py): each client's update u_i = w_i - w (its
    shared state less the global one) is scaled to norm at most C = clip_norm (Flower's
    `compute_clip_model_update`), the sum gets Gaussian noise N(0, (sigma C)^2), drawn from the seed and the
    round, and is divided by the expected number of clients M (Flower's `compute_stdv`: sigma C / M on the
    mean). The inner strategy takes w + that mean as the one averaged client: it reads nothing else, so
    FedAvgM or FedAdam on top are post-processing. The clients' order does not matter."""

    reads_each_client = True

    def __init__(self, inner, ledger: ClientLedger, seed: int):
        if inner.reads_each_client:
            raise ConfigError(f"strategy={inner.name} reads each client's update, which privacy=dp_client hides from "
                              "it; use a strategy that reads their mean (fedavg, fedavgm, fedadam)")
        self.inner, self.ledger, self.seed, self.round = inner, ledger, int(seed), 0
        self.name, self.aggregation, self.MOMENTS = inner.name, inner.aggregation, inner.MOMENTS

    def moments(self):
        return self.inner.moments()

    def load_moments(self, moments) -> None:
        self.inner.load_moments(moments)

    def describe(self) -> dict:
        return self.inner.describe()

    def start_round(self, round_: int) -> None:
        self.round = int(round_)

    def noisy_mean(self, global_state: dict, stacked: dict, num_examples: list[int]) -> dict:
        C, sigma, M = self.ledger.clip_norm, self.ledger.noise_multiplier, self.ledger.expected
        keys = list(global_state)
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for i in range(len(num_examples)):
            update = [stacked[k][i] - global_state[k] for k in keys]
            norm = float(torch.sqrt(sum((u.double() ** 2).sum() for u in update)))
            factor = min(1.0, C / norm) if norm > 0 else 1.0
            for k, u in zip(keys, update):
                total[k].add_(u, alpha=factor)
        if sigma:
            device = next(iter(global_state.values())).device
            g = torch.Generator(device=device).manual_seed(zlib.crc32(f"{self.seed}/{self.round}/dp_client".encode()))
            for k in keys:
                total[k].add_(torch.randn(total[k].shape, generator=g, device=device), alpha=sigma * C)
        return {k: global_state[k] + total[k] / M for k in keys}

    def aggregate_train(self, global_state, stacked, num_examples):
        mean = self.noisy_mean(global_state, stacked, num_examples)
        return self.inner.aggregate_train(global_state, {k: v.unsqueeze(0) for k, v in mean.items()}, [1])


def for_run(cfg, method, clients, units, unit_members, unit_rows, sample, rounds: int, per_round):
    """The run's ledger (SampleLedger, ClientLedger) or None without privacy."""
    name = kind(cfg)
    if name == "dpsgd":
        return SampleLedger(cfg, method, clients, units, unit_members, unit_rows, sample, rounds)
    if name == "dp_client":
        return ClientLedger(cfg, len(units), per_round or len(units), rounds)
    return None


def wrap(federation):
    """The run's strategy, inside DP-FedAvg under privacy=dp_client (`ClientLevelDP`, set on the federation
    too); returns the strategy the runner uses."""
    if federation.private == "dp_client" and not isinstance(federation.server, ClientLevelDP):
        federation.server = ClientLevelDP(federation.server, federation.privacy, federation.cfg.seed)
    return federation.server


def train_settings(settings, federation):
    """The method's TrainSettings with DP-SGD's clipping and noise under privacy=dpsgd."""
    from dataclasses import replace

    return replace(settings, dp=federation.privacy.sample_dp) if federation.private == "dpsgd" else settings


def client_settings(settings, cfg):
    """A Flower client's TrainSettings under privacy=dpsgd: the noise multiplier comes with the server's
    settings (the server derives it from privacy.epsilon over every client's plan)."""
    from dataclasses import replace

    if kind(cfg) != "dpsgd":
        return settings
    if cfg.privacy.get("noise_multiplier") is None:
        raise ConfigError("privacy=dpsgd: the server sent no privacy.noise_multiplier")
    return replace(settings, dp=SampleDP(float(cfg.privacy.max_grad_norm), float(cfg.privacy.noise_multiplier)))


def budget(cfg, method, what: str) -> int | None:
    """Under privacy=dpsgd, the epochs a training of `what` (train: a round's local update; deploy: the
    models clients deploy) may run on a client's rows (`Method.private_epochs`); None otherwise."""
    if kind(cfg) != "dpsgd":
        return None
    return method.private_epochs(cfg)[0 if what == "train" else 1]


def shipped_config(cfg, federation):
    """The settings the Flower server sends its clients: under privacy=dpsgd with the noise multiplier the
    server planned (derived from privacy.epsilon over every client, which no client can do alone)."""
    if federation.private != "dpsgd":
        return cfg
    from omegaconf import open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.privacy.noise_multiplier = federation.privacy.noise_multiplier
    return cfg
