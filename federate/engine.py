"""Local training of the participating clients (`engine=`): lock-step engines and a plain reference loop.

All follow the reference protocol (shuffled batches of `batch_size`, a final batch of fewer than 2 rows
skipped, a fresh Adam every round) on the same batch schedule, so they reach the same weights; tests
check that, and bench/federate_speed.py measures the difference.

The lock-step engines train all clients at once: clients are ordered by training-set size (largest
first), so the clients still training at step s are always a prefix [:k] of the stacked weights, and
every step works on views of them, with PyTorch's fused Adam and no host synchronisation. Where the
gradients come from is the only difference:
- `generic`: torch.func (`vmap` of `grad` over the clients) through any adapter's `logits`;
- `batched`: AttAI's hand-written gradients into preallocated buffers (its fast path);
- `sequential`: the batched kernels one client at a time, which keeps a client's state in cache on a CPU;
- `plain`: one client after another, one batch at a time, autograd and torch.optim.Adam (the baseline).

`precision=bf16` runs the adapter's matrix multiplies in bf16 with fp32 accumulation; the master weights,
the gradients and Adam's moments stay fp32. The fast path casts explicitly (attai.forward/backward:
elementwise math in fp32), the generic and plain engines and evaluation use autocast (`autocast`).
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from functools import cached_property

import torch
from torch.optim.adam import adam

from .adapters import Adapter
from .adapters import attai
from .errors import ConfigError
from .losses import ce_grad, contrastive_grad, head_ce_grad, in_batch_loss, masked_loss
from .rows import Rows, concat, pooled
from .strategy import WeightedSum


@dataclass(frozen=True)
class TrainSettings:
    lr: float
    batch_size: int = 32
    loss: str = "contrastive"
    mu: float = 0.0  # FedProx proximal weight; 0 is FedCLIP
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.2
    precision: str = "fp32"  # fp32 | bf16 (the adapter's matmuls)
    sgd_keys: tuple[str, ...] = ()  # keys stepped by plain SGD at sgd_lr instead of Adam (APFL's mixing weight)
    sgd_lr: float = 0.0
    dp: "SampleDP | None" = None  # privacy=dpsgd: per-sample clipping and noise (federate/privacy.py)


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD in the engines, as Opacus' DPOptimizer does it: each step's batch is a Poisson sample of the
    client's rows (`poisson_rate`), each row's gradient is clipped to `max_grad_norm` (factor
    min(1, C / (norm + 1e-6))), Gaussian noise of std `noise_multiplier * max_grad_norm` is added to their
    sum, which is divided by the expected batch size; the optimiser then steps on that."""
    max_grad_norm: float
    noise_multiplier: float


def poisson_rate(n: int, batch_size: int) -> tuple[int, float, int]:
    """A client's DP-SGD sampling, as Opacus' DPDataLoader derives it from a data loader of batch_size: steps
    per epoch b (the non-private engines' batches per epoch), sampling rate q = 1 / b and expected batch
    int(n q)."""
    b = max(1, batches_per_epoch(n, batch_size))
    return b, 1 / b, max(1, int(n * (1 / b)))


def make_poisson_schedule(sizes: list[int], batch_size: int, epochs: int, generators: list[torch.Generator],
                          device):
    """DP-SGD's batches (`poisson_rate`): for each client, epochs * b steps, at each of which every row is in
    the batch with probability q (one `torch.rand(n)` draw from its generator, as Opacus'
    UniformWithReplacementSampler), padded to the largest batch drawn. Then each client's noise generator
    (on `device`), seeded from its own generator: a client's batches and noise depend on nothing else.
    Returns idx, valid, active, steps (as `make_schedule`), the noise generators and the expected batches [K]."""
    drawn, steps, expected = [], [], []
    for n, g in zip(sizes, generators):
        b, q, e = poisson_rate(n, batch_size)
        steps.append(epochs * b)
        expected.append(e)
        drawn.append([torch.nonzero(torch.rand(n, generator=g) < q)[:, 0] for _ in range(epochs * b)])
    S, K = max(steps, default=0), len(sizes)
    B = max([len(r) for rows in drawn for r in rows] + [1])
    idx = torch.zeros(S, K, B, dtype=torch.long)
    valid = torch.zeros(S, K, B, dtype=torch.bool)
    for k, rows in enumerate(drawn):
        for step, r in enumerate(rows):
            idx[step, k, :len(r)] = r
            valid[step, k, :len(r)] = True
    active = [sum(st > s for st in steps) for s in range(S)]
    noise = [torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
             for g in generators]
    return idx, valid, active, steps, noise, torch.tensor(expected, dtype=torch.float32)


def clip_factors(norms: torch.Tensor, max_grad_norm: float, valid: torch.Tensor) -> torch.Tensor:
    """Opacus' per-sample clipping factor min(1, C / (norm + 1e-6)), 0 for padding rows."""
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * valid


class NoiseAhead:
    """DP-SGD's standard normal draws, each client's from its own generator, step after step and key after key
    in `keys`' order. On a CPU the next step's draws are made on a worker thread while the current step
    computes: they do not depend on the data, and 525k Gaussian draws (torch's mt19937 and Box-Muller, one
    thread) cost about a whole AttAI step. The same numbers either way: each generator is drawn in order."""

    def __init__(self, generators: list[torch.Generator], like: dict[str, torch.Tensor], keys: list[str],
                 steps: list[int]):
        self.generators, self.keys, self.steps = generators, list(keys), steps
        self.device = next(iter(like.values())).device
        # two buffers per client, used on alternate steps: one is drawn into while the other is read
        self.buffers = [[{q: torch.empty(like[q].shape[1:], dtype=like[q].dtype, device=self.device) for q in self.keys}
                         for _ in range(2)] for _ in generators]
        self.pool = None
        if self.device.type == "cpu":
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(1, thread_name_prefix="dp-noise")
        self.pending: dict[int, object] = {}
        for i in range(len(generators)):
            self._draw(i, 0)

    def _fill(self, i: int, step: int) -> dict[str, torch.Tensor]:
        out = self.buffers[i][step % 2]
        with torch.inference_mode():  # (a worker thread does not inherit the trainer's mode)
            for q in self.keys:
                out[q].normal_(generator=self.generators[i])
        return out

    def _draw(self, i: int, step: int) -> None:
        if step < self.steps[i]:
            self.pending[i] = self.pool.submit(self._fill, i, step) if self.pool else self._fill(i, step)

    def take(self, i: int, step: int) -> dict[str, torch.Tensor]:
        """Client i's draws for `step` (its steps taken in order), and the next step's started."""
        got = self.pending.pop(i)
        got = got.result() if self.pool else got
        self._draw(i, step + 1)
        return got

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def add_noise(grads: dict[str, torch.Tensor], keys: list[str], noise: "NoiseAhead", step: int, std: float,
              expected: list[float]) -> None:
    """DP-SGD's noise, N(0, std^2) per coordinate divided by each client's expected batch, added in place to the
    first k clients' clipped gradient sums (already divided by it: `private_gradients`' weights)."""
    for i in range(len(expected)):
        draws = noise.take(i, step)
        for q in keys:
            grads[q][i].add_(draws[q], alpha=std / expected[i])


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def low_dtype(precision: str) -> torch.dtype | None:
    """The matmul dtype of `precision` (None: fp32 throughout)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be {' or '.join(PRECISIONS)}, not {precision!r}")
    return PRECISIONS[precision]


def autocast(precision: str, device: torch.device | str):
    """Autocast to the precision's matmul dtype (a no-op for fp32), for code that calls an adapter's
    `logits`: the generic and plain engines and evaluation."""
    low = low_dtype(precision)
    if low is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=low)


def batches_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size + (n % batch_size >= 2)


def trimmed_batch(batch_size: int, largest: int) -> int:
    """The batch size, or the largest client's rows when fewer (at least 2): a client smaller than a batch
    trains on one batch of all its rows either way, and needs no padding rows."""
    return min(batch_size, max(2, largest))


def one_step(n: int, batch_size: int, epochs: int) -> bool:
    """Whether a client of n rows trains one step a round (a client smaller than a batch, one epoch)."""
    return epochs * batches_per_epoch(n, trimmed_batch(batch_size, n)) == 1


def client_generator(seed: int, client: str, round_: int | str) -> torch.Generator:
    """The batch order of one client in one round. It depends on nothing else, so a stateless Flower
    client shuffles exactly as the in-process runner does."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{client}/{round_}".encode()))


def make_schedule(sizes: list[int], batch_size: int, epochs: int, generators: list[torch.Generator]):
    """Shuffled batches for every client: idx [S, K, B] (local row numbers, padded with 0), valid [S, K, B]
    and, per step, how many clients (a prefix, sizes being non-increasing) still train."""
    steps = [epochs * batches_per_epoch(n, batch_size) for n in sizes]
    S, K, B = max(steps, default=0), len(sizes), batch_size
    idx = torch.zeros(S, K, B, dtype=torch.long)
    valid = torch.zeros(S, K, B, dtype=torch.bool)
    for k, n in enumerate(sizes):
        nb = batches_per_epoch(n, B)
        used = min(n, nb * B)  # drops a lone last row
        rows = torch.zeros(nb * B, dtype=torch.long)
        for e in range(epochs):
            rows[:used] = torch.randperm(n, generator=generators[k])[:used]
            idx[e * nb:(e + 1) * nb, k] = rows.view(nb, B)
            valid[e * nb:(e + 1) * nb, k] = (torch.arange(nb * B) < used).view(nb, B)
    active = [sum(st > s for st in steps) for s in range(S)]
    return idx, valid, active, steps


def first_adam_step(params: list[torch.Tensor], grads: list[torch.Tensor], m: list[torch.Tensor],
                    v: list[torch.Tensor], s: TrainSettings, keep_moments: bool) -> None:
    """torch's Adam (L2 weight decay, as torch.optim.Adam) at step 1 from zero moments, in closed form:
    m = (1 - b1) g and v = (1 - b2) g^2, so the bias-corrected update is lr * g / (|g| + eps). The moments
    are written only when later steps read them; a client of one batch (many small clients) then costs
    its gradients and one pass over its weights instead of zeroing, reading and writing four tensors."""
    b1, b2 = s.betas
    for p, g, m1, m2 in zip(params, grads, m, v):
        if s.weight_decay:
            g.add_(p, alpha=s.weight_decay)
        if keep_moments:
            torch.mul(g, 1 - b1, out=m1)
            torch.mul(g, g, out=m2).mul_(1 - b2)
            denom = g.abs().add_(s.eps)
        else:  # the unused first moment is the scratch space: no allocation
            denom = torch.abs(g, out=m1).add_(s.eps)
        p.addcdiv_(g, denom, value=-s.lr)


def fold_first_adam_step(params: list[torch.Tensor], grads: list[torch.Tensor], scratch: list[torch.Tensor],
                         total: list[torch.Tensor], weight: float, s: TrainSettings) -> None:
    """A client whose round is one step from `params`: `total += weight * (its adapter after torch's first
    Adam step)`, less `weight * params`, which the caller adds once for all such clients, without writing
    the adapter: the L2 weight decay as `first_adam_step` adds it, then `total -= weight * lr * g / (|g| +
    eps)`, its closed form (`scratch` is overwritten). The lists are pieces of the same tensors: each
    piece's four passes run while it is in the core's cache."""
    for p, g, denom, t in zip(params, grads, scratch, total):
        if s.weight_decay:
            g.add_(p, alpha=s.weight_decay)
        t.addcdiv_(g, torch.abs(g, out=denom).add_(s.eps), value=-weight * s.lr)


def adam_step(params: list[torch.Tensor], grads: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor],
              count: torch.Tensor, s: TrainSettings, fused: bool) -> None:
    """torch's Adam (L2 weight decay) at any step after the first; `count` is the step number so far, shared
    by every tensor. Where torch has the fused kernel (CPU, CUDA), it is called as torch.optim.adam.adam
    would call it, without that function's per-call grouping of the tensors by device and its step-count
    update per tensor: on a 32-row CPU step those cost about 30 us, 2% of the step."""
    kwargs = dict(amsgrad=False, beta1=s.betas[0], beta2=s.betas[1], lr=s.lr, weight_decay=s.weight_decay, eps=s.eps,
                  maximize=False)
    if fused:
        count.add_(1)
        torch._fused_adam_(params, grads, m, v, [], [count] * len(params), **kwargs)
    else:  # torch's own choice (foreach or one tensor at a time), which advances each tensor's count itself
        steps = [count.clone() for _ in params]
        adam(params, grads, m, v, [], steps, fused=False, **kwargs)
        count.copy_(steps[0])


def is_stacked(anchor, state) -> bool:
    """Whether a FedProx anchor holds one adapter per client ([K, ...], like the stacked state)."""
    return anchor is not None and any(q in anchor and anchor[q].dim() == state[q].dim() for q in state)


class ClientSets:
    """Participants' training rows, largest client first: `Rows` of one pool of embeddings
    (federate/rows.py), so a run holds its embeddings once. The lock-step engines gather each chunk of
    batches from the pool (`global_rows` maps a schedule's row numbers to pool rows); the sequential engine
    trains one client at a time (`client(i)`)."""

    def __init__(self, sets: list[Rows]):
        self.sets = list(sets)
        self.sizes = [len(s) for s in self.sets]
        if self.sizes != sorted(self.sizes, reverse=True):
            raise ValueError("clients must be ordered by training-set size, largest first")
        first = self.sets[0]
        if not all(s.shares_pool(first) for s in self.sets):
            raise ValueError("clients' rows must index one pool of embeddings (federate.rows.pooled)")
        self.x, self.y, self.device = first.x, first.y, first.device

    @classmethod
    def of_tensors(cls, features: list[torch.Tensor], labels: list[torch.Tensor]) -> "ClientSets":
        """Clients given as separate tensors (tests, one-off sets), pooled once."""
        return cls(pooled(features, labels))

    @cached_property
    def order(self) -> torch.Tensor:
        """Every client's pool rows, one client after another."""
        return concat(self.sets).index

    @cached_property
    def offsets(self) -> torch.Tensor:
        return torch.tensor([0] + self.sizes[:-1]).cumsum(0).to(self.device)

    def global_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Pool rows (on the device) of a schedule's row numbers `local` [S, K, B] (each client's own)."""
        return self.order[(local + self.offsets.cpu()[None, :, None]).to(self.device)]

    def label_counts(self, classes: int) -> torch.Tensor:
        """Each client's training rows per class [K, C] (FedRoD's balanced softmax)."""
        if getattr(self, "_counts", None) is None or self._counts.shape[1] != classes:
            self._counts = torch.stack([torch.bincount(s.labels, minlength=classes) for s in self.sets]).float()
        return self._counts

    def client(self, i: int) -> "ClientSets":
        return ClientSets([self.sets[i]])

    def __len__(self) -> int:
        return len(self.sizes)


class LockstepTrainer:
    """Trains the stacked adapters `state` ([K, ...] per tensor) of all clients for some epochs; a
    subclass says how a step's gradients are computed."""

    def __init__(self, adapter: Adapter, clients: ClientSets, text: torch.Tensor, scale: float,
                 settings: TrainSettings):
        self.adapter, self.clients, self.settings, self.scale = adapter, clients, settings, scale
        self.text = text  # raw class prompt embeddings [C, d]
        self.text_norm = torch.nn.functional.normalize(text, dim=-1)

    def _buffers(self, state, count: int):
        """`count` buffers shaped like the state, allocated once (allocating 2 MB tensors every round costs
        page faults that show up in the profile) and never zeroed: the first Adam step writes the moments
        (`first_adam_step`), the gradient kernels write the gradients."""
        shapes = {k: v.shape for k, v in state.items()}
        if getattr(self, "_shapes", None) != shapes:
            self._shapes = shapes
            self._bufs = [{k: torch.zeros_like(v) for k, v in state.items()} for _ in range(count)]
        return self._bufs

    CHUNK = 256  # steps whose batches are gathered at once: a large client's round is not copied whole

    def prepare(self, state, xs: torch.Tensor, ys: torch.Tensor) -> None:
        """Set-up before a chunk of steps (xs, ys: their batches [<= CHUNK, K, B, d] and labels [<= CHUNK, K, B])."""

    def gradients(self, params: dict, x, y, ok, step: int) -> tuple[torch.Tensor, dict]:
        """Loss [k] and gradients of the first k clients' `params` on batch x [k, B, d], labels y [k, B]
        (ok [k, B]: valid rows, or None when no row is padding); `step` indexes the chunk given to `prepare`."""
        raise NotImplementedError

    @torch.inference_mode()  # no autograd bookkeeping outside the gradient functions: ~10% faster
    def train(self, state: dict[str, torch.Tensor], epochs: int, generators: list[torch.Generator],
              anchor: dict[str, torch.Tensor] | None = None, keys=None) -> torch.Tensor:
        """One round of local training, in place; returns each client's mean training loss (device).
        `generators` has one per client; `anchor` is the global adapter FedProx pulls towards (one state,
        or stacked [K, ...] like `state`: one per client, as a grouped sweep trains several points);
        `keys`: the keys that train (the others stay as they are; all by default)."""
        s, c = self.settings, self.clients
        device = c.device
        if s.dp is None:
            idx, valid, active, steps = make_schedule(c.sizes, trimmed_batch(s.batch_size, max(c.sizes)), epochs,
                                                      generators)
        else:  # DP-SGD: Poisson batches, and each client's noise generator
            idx, valid, active, steps, noise, expected = make_poisson_schedule(c.sizes, s.batch_size, epochs,
                                                                               generators, device)
        padded = [not bool(valid[step, :k].all()) for step, k in enumerate(active)]  # only last batches
        if s.dp is not None:  # a Poisson step computes on its own largest batch (the rows come first), not on the round's
            widths = [max(1, int(valid[step, :k].sum(-1).max())) for step, k in enumerate(active)]
            inverse = (1 / expected).to(device)  # each client's sum is divided by its expected batch
            std = s.dp.noise_multiplier * s.dp.max_grad_norm
        idx = c.global_rows(idx)
        valid = valid.to(device)
        every = list(state)
        keys = every if keys is None else [q for q in every if q in set(keys)]
        self.trained = frozenset(keys)  # gradients() may skip what no key needs
        noised = list(keys)  # DP-SGD's noise: every key that trains, Adam's and SGD's
        ahead = NoiseAhead(noise, state, noised, steps) if s.dp is not None and std else None
        sgd = [q for q in keys if q in s.sgd_keys]
        keys = [q for q in keys if q not in s.sgd_keys]  # Adam's
        m, v2 = self._moments(state)  # a fresh Adam every round (first_adam_step writes the moments)
        step_count = torch.zeros((), dtype=torch.float32, device=device)  # as fused Adam keeps it
        prefix = {k: ({q: state[q][:k] for q in every}, [m[q][:k] for q in keys], [v2[q][:k] for q in keys],
                      [state[q][:k] for q in keys]) for k in set(active)}
        loss_sum = torch.zeros(len(c), device=device)
        stacked_anchor = is_stacked(anchor, state)
        fused = device.type in ("cpu", "cuda")
        try:
            for step, k in enumerate(active):
                if step % self.CHUNK == 0:  # the next steps' batches, gathered at once: [CHUNK, K, B, d] and [CHUNK, K, B]
                    xs, ys = c.x[idx[step:step + self.CHUNK]], c.y[idx[step:step + self.CHUNK]]
                    self.prepare(state, xs, ys)
                j = step % self.CHUNK
                params, m1, m2, weights = prefix[k]
                if s.dp is None:
                    loss, grads = self.gradients(params, xs[j, :k], ys[j, :k], valid[step, :k] if padded[step] else None, j)
                else:  # the clipped sums of the rows' gradients, then the noise (the proximal term below is not data)
                    w = widths[step]
                    loss, grads = self.private_gradients(params, xs[j, :k, :w], ys[j, :k, :w], valid[step, :k, :w], j,
                                                         inverse[:k])
                    if ahead is not None:
                        add_noise(grads, noised, ahead, step, std, expected[:k].tolist())
                if s.mu:
                    for q in (q for q in [*keys, *sgd] if q in anchor):  # FedProx: gradient of (mu / 2) ||w - w_global||^2
                        grads[q].add_(params[q] - (anchor[q][:k] if stacked_anchor else anchor[q]), alpha=s.mu)
                if not keys:
                    pass  # (nothing trains with Adam)
                elif step == 0:  # a fresh Adam's first step needs no moments: nothing to zero, and none to keep
                    first_adam_step(weights, [grads[q] for q in keys], m1, m2, s, keep_moments=len(active) > 1)
                    step_count.fill_(1)
                else:
                    adam_step(weights, [grads[q] for q in keys], m1, m2, step_count, s, fused)
                for q in sgd:
                    params[q].sub_(grads[q], alpha=s.sgd_lr)
                if sgd and hasattr(self.adapter, "project"):
                    self.adapter.project(params)  # (APFL: the mixing weight back into [0, 1])
                loss_sum[:k] += loss
        finally:
            if ahead is not None:
                ahead.close()
        return loss_sum / torch.tensor(steps, device=device).clamp_min(1)

    def _moments(self, state):
        return self._buffers(state, 2)

    def private_gradients(self, params: dict, x, y, ok, step: int, weights: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """DP-SGD (settings.dp): loss [k] and, per trained key, the sum over each client's valid rows (ok [k, B])
        of the row's own gradient clipped to dp.max_grad_norm (`clip_factors`), times the client's weight
        [k] (1 / its expected batch)."""
        raise ConfigError(f"engine {type(self).__name__} has no per-sample gradients for privacy=dpsgd; use engine=generic")


class GenericTrainer(LockstepTrainer):
    """Any adapter: per-client gradients of the loss on its `logits` with torch.func (vmap over clients)."""

    def __init__(self, adapter, clients, text, scale, settings):
        super().__init__(adapter, clients, text, scale, settings)

        from .matmul_precision import adapter_logits  # bf16: the adapter's matmuls only, as the fast path

        low = low_dtype(settings.precision)

        def loss(trained, frozen, x, y, ok, counts):
            params = {**frozen, **trained}
            if hasattr(adapter, "training_loss"):  # a method's own loss (FedRoD's, APFL's)
                return adapter.training_loss(params, x, y, ok, counts, scale, low)
            logits = adapter_logits(adapter, params, x, text, scale, low)
            return masked_loss(logits.float(), y, ok, settings.loss)

        self._grad = torch.func.vmap(torch.func.grad_and_value(loss))  # gradients of the trained keys only

        def row_loss(trained, frozen, x, y, counts):  # one row's loss (DP-SGD)
            return loss(trained, frozen, x[None], y[None], torch.ones(1, dtype=torch.bool, device=x.device), counts)

        rows = torch.func.vmap(torch.func.grad_and_value(row_loss), in_dims=(None, None, 0, 0, None))
        self._row_grads = torch.func.vmap(rows)  # [k, B, ...]: every row's gradient, for every client

    def private_gradients(self, params, x, y, ok, step, weights):
        trained = {q: v for q, v in params.items() if q in self.trained}
        frozen = {q: v for q, v in params.items() if q not in self.trained}
        grads, losses = self._row_grads(trained, frozen, x, y, self.clients.label_counts(len(self.text))[:len(x)])
        norms = torch.stack([g.reshape(*g.shape[:2], -1).pow(2).sum(-1) for g in grads.values()]).sum(0).sqrt()  # [k, B]
        factor = clip_factors(norms, self.settings.dp.max_grad_norm, ok) * weights[:, None]
        clipped = {q: torch.einsum("kb,kb...->k...", factor, g) for q, g in grads.items()}
        return torch.where(ok, losses, 0).sum(1) / ok.sum(1).clamp_min(1), clipped

    def gradients(self, params, x, y, ok, step):
        trained = {q: v for q, v in params.items() if q in self.trained}
        frozen = {q: v for q, v in params.items() if q not in self.trained}
        ok = torch.ones_like(y, dtype=torch.bool) if ok is None else ok
        grads, loss = self._grad(trained, frozen, x, y, ok, self.clients.label_counts(len(self.text))[:len(x)])
        if hasattr(self.adapter, "observe"):  # a model that keeps statistics of its batches (FedProto's prototypes)
            self.adapter.observe(params, x, y, ok)
        return loss, grads


class BatchedTrainer(LockstepTrainer):
    """AttAI's fast path: hand-written gradients (federate/adapters/attai.py) into preallocated buffers."""

    @staticmethod
    def does_dp(adapter) -> bool:
        """Whether DP-SGD runs here: AttAI's image tower, alone or under one linear head (no text tower),
        whose rows' gradient norms come from the layers' row gradients (`private_gradients`)."""
        return adapter.fast_path and tuple(adapter.towers) == ("image",)

    def private_gradients(self, params, x, y, ok, step, weights):
        """Each row's gradient norm without the row's gradient: a layer z = W a + b has the row gradient
        dz a^T + dz, of squared norm |dz|^2 (|a|^2 + 1) ("ghost clipping", Goodfellow 2015; Li et al. 2022),
        so the clipped sum is the usual backward with each row's dz scaled by its factor. Cross-entropy over
        the class prompts, or of the linear head (the per-row loss DP-SGD needs); the norms count the keys
        that train (FedRep's phases train the head or the body)."""
        k = len(x)
        grads = self._grad_views.get(k) or self._grad_views.setdefault(k, {q: g[:k] for q, g in self._grads.items()})
        W = attai.layers(params, "image")
        image, saved = attai.forward(*W, x, self.low, None if self.xs_low is None else self.xs_low[step, :k, :x.shape[1]])
        if self.head is not None:  # scale * (f W^T + b) of each client's head
            weight = params["head.weight"]
            logits = torch.baddbmm(params["head.bias"].unsqueeze(1), image, weight.transpose(1, 2)).mul_(self.scale)
        else:
            logits = torch.matmul(image, self.text_norm.T).mul_(self.scale)  # [k, B, C]
        log_p = torch.log_softmax(logits, dim=-1)
        nll = -log_p.gather(2, y[:, :, None])[:, :, 0]
        dlogits = log_p.exp_().scatter_add_(2, y[:, :, None], torch.full_like(nll, -1.0)[:, :, None]).mul_(self.scale)
        sq = torch.zeros_like(nll)  # each row's squared gradient norm over the keys that train
        head_w, head_b = "head.weight" in self.trained, "head.bias" in self.trained
        if head_w:
            sq.addcmul_(dlogits.pow(2).sum(-1), image.pow(2).sum(-1))
        if head_b:
            sq.add_(dlogits.pow(2).sum(-1))
        if self.body_trains:  # the rows' own (sum) loss through the adapter
            d_image = torch.bmm(dlogits, weight) if self.head is not None else torch.matmul(dlogits, self.text_norm)
            dz1, dz2 = attai.row_gradients(W[2], saved, d_image)
            rows_x, rows_h = saved[0], saved[1]
            sq.add_(dz1.pow(2).sum(-1) * rows_x.pow(2).sum(-1).add_(1)).add_(dz2.pow(2).sum(-1) * rows_h.pow(2).sum(-1).add_(1))
        factor = (clip_factors(sq.sqrt_(), self.settings.dp.max_grad_norm, ok) * weights[:, None])[:, :, None]
        if head_w or head_b:
            scaled = dlogits * factor
            if head_w:
                torch.bmm(scaled.transpose(1, 2), image, out=grads["head.weight"])
            if head_b:
                torch.sum(scaled, 1, out=grads["head.bias"])
        if self.body_trains:
            attai.backward_rows(saved, dz1.mul_(factor), dz2.mul_(factor), attai.layers(grads, "image"))
        return torch.where(ok, nll, 0).sum(1) / ok.sum(1).clamp_min(1), grads

    def _moments(self, state):
        self._grads, m, v2 = self._buffers(state, 3)
        self._grad_views = {}
        return m, v2

    def prepare(self, state, xs, ys):
        self.head = "head.weight" if "head.weight" in state else None
        self.feature_term = self.head is not None and hasattr(self.adapter, "feature_grad")
        self.body_trains = any(q.startswith("image.") for q in self.trained)
        self.low = low_dtype(self.settings.precision)
        self.xs_low = xs.to(self.low) if self.low is not None else None  # cast once per chunk
        self.text_tower = "text" in self.adapter.towers
        # each row's own class prompt, gathered once per chunk when the prompts are fixed
        self.rows_text = self.text_norm[ys] if self.settings.loss == "contrastive" and not self.text_tower else None

    def gradients(self, params, x, y, ok, step):
        k = len(x)
        grads = self._grad_views.get(k) or self._grad_views.setdefault(k, {q: g[:k] for q, g in self._grads.items()})
        W = attai.layers(params, "image")
        image, saved = attai.forward(*W, x, self.low, None if self.xs_low is None else self.xs_low[step, :k])
        if self.head is not None:  # a linear head on the adapted embedding (federate/heads.py), cross-entropy
            loss, d_image, d_weight, d_bias = head_ce_grad(image, params["head.weight"], params["head.bias"], y, ok,
                                                           self.scale)
            if self.feature_term:  # a model's own term on the features (FedProto's pull towards the prototypes)
                extra, d_features = self.adapter.feature_grad(params, image, y, ok)
                loss, d_image = loss + extra, d_image + d_features
            grads["head.weight"].copy_(d_weight)
            grads["head.bias"].copy_(d_bias)
            if self.body_trains:  # (FedRep's head epochs freeze the body: no backward through it)
                attai.backward(W[2], saved, d_image, attai.layers(grads, "image"))
            return loss, grads
        if self.rows_text is not None:
            loss, d_image, _ = contrastive_grad(image, self.rows_text[step, :k], ok, self.scale, text_grad=False)
        else:
            if self.text_tower:
                texts, text_saved = attai.forward(*attai.layers(params, "text"), self.text.expand(k, *self.text.shape),
                                                  self.low)
            else:
                texts = self.text_norm.expand(k, *self.text_norm.shape)
            if self.settings.loss == "contrastive":
                gather = y[:, :, None].expand(-1, -1, texts.shape[-1])
                loss, d_image, d_rows = contrastive_grad(image, texts.gather(1, gather), ok, self.scale)
                d_text = torch.zeros_like(texts).scatter_add_(1, gather, d_rows)
            else:
                loss, d_image, d_text = ce_grad(image, texts, y, ok, self.scale)
            if self.text_tower:
                attai.backward(attai.layers(params, "text")[2], text_saved, d_text, attai.layers(grads, "text"))
        attai.backward(W[2], saved, d_image, attai.layers(grads, "image"))
        return loss, grads

    def folds_first_steps(self, start: dict, personal: dict) -> bool:
        """Whether `fold_first_steps` serves clients starting from `start` with their own `personal` keys:
        AttAI's image tower shared, and a linear head (federate/heads.py) personal where the model has one."""
        head, image = hasattr(self.adapter, "heads"), {f"image.{k}" for k in attai.LAYER_KEYS}
        linear = {"head.weight", "head.bias"}
        if self.adapter.towers != ("image",) or hasattr(self.adapter, "feature_grad"):  # (no fold of its own term)
            return False
        if head and getattr(self.adapter, "heads", ()) == ("head",) and set(start) == image | linear and not personal:
            return True  # the head shared with the body (CCVR's FedAvg of both): folded into the sum as the body is
        return set(start) == image and set(personal) == (linear if head else set())

    FOLD_ROWS = 512  # rows of one-step clients whose activations are computed together (they stay in cache)
    FOLD_PIECE = 65536  # parameters per piece of a client's step: 1.25x faster than whole 2 MB passes (CPU)

    @torch.inference_mode()
    def fold_first_steps(self, start: dict[str, torch.Tensor], clients: ClientSets, generators: list[torch.Generator],
                         weights: list[float], total: dict[str, torch.Tensor] | None, heads: dict | None = None,
                         trains_body: bool = True, trains_head: bool = True) -> torch.Tensor:
        """Clients whose round is one batch (`one_step`), all starting from the adapter `start`, added to
        `total` as `fold_first_adam_step` does (less their weight times `start`, which the caller adds).
        The weights being the same for all, the activations and loss gradients of a few clients' rows are
        computed together, without padding; then, one client at a time, its weight gradients (two
        products) and its step go into `total`: no client's adapter is ever written, and 300 small clients
        cost about what their rows cost. With `heads` (each client's linear head, [K, C, d] and [K, C]: a
        FedPer client's own), the logits are those heads', and each head takes its first Adam step in place
        (`trains_head`); `trains_body=False` leaves the adapter out (and `total` may be None). A head in
        `start` (shared, as CCVR's) gives the logits of every client and is folded into `total` with the
        body. Returns their losses."""
        s, K, low = self.settings, len(clients), low_dtype(self.settings.precision)
        B = trimmed_batch(s.batch_size, max(clients.sizes))
        idx, valid, _, _ = make_schedule(clients.sizes, B, 1, generators)  # [1, K, B]: each its one batch
        rows, valid = clients.global_rows(idx)[0], valid[0].to(clients.device)
        used = valid.sum(1).tolist()
        # one flat buffer per quantity, every tensor a view of it: a client's step is four kernels, not sixteen
        sizes = [v.numel() for v in start.values()]
        shared_head = "head.weight" in start
        if trains_body:
            g, scratch = (torch.empty(sum(sizes), device=clients.device) for _ in range(2))
            sum_ = torch.cat([v.flatten() for v in total.values()])
            params = torch.cat([v.flatten() for v in start.values()])
            grads = {q: part.view_as(v) for (q, v), part in zip(start.items(), g.split(sizes))}
            pieces = [t.split(self.FOLD_PIECE) for t in (params, g, scratch, sum_)]
        W = [t.unsqueeze(0) for t in attai.layers(start, "image")]
        losses, first = [], 0
        while first < K:
            last, n = first + 1, used[first]  # clients [first, last): about FOLD_ROWS rows
            while last < K and n + used[last] <= self.FOLD_ROWS:
                n, last = n + used[last], last + 1
            ok = valid[first:last]
            x = clients.x[rows[first:last][ok]]  # [n, d]: their batches' rows, no padding
            image, saved = attai.forward(*W, x.unsqueeze(0), low)
            padded = image.new_zeros(ok.numel(), image.shape[-1])  # the losses' [k, B, d] layout
            padded[ok.flatten()] = image[0]
            padded = padded.view(last - first, B, -1)
            mask, y = (None if bool(ok.all()) else ok), clients.y[rows[first:last]]
            if heads is not None or shared_head:
                if shared_head:
                    weight = start["head.weight"].expand(last - first, *start["head.weight"].shape)
                    bias = start["head.bias"].expand(last - first, *start["head.bias"].shape)
                else:
                    weight, bias = heads["head.weight"][first:last], heads["head.bias"][first:last]
                loss, d_image, d_weight, d_bias = head_ce_grad(padded, weight, bias, y, mask, self.scale)
                if trains_head:  # each head's first Adam step, in closed form (first_adam_step)
                    for p, grad in ((weight, d_weight), (bias, d_bias)):
                        grad.add_(p, alpha=s.weight_decay)
                        p.addcdiv_(grad, grad.abs().add_(s.eps), value=-s.lr)
            elif s.loss == "contrastive":
                loss, d_image, _ = contrastive_grad(padded, self.text_norm[y], mask, self.scale, text_grad=False)
            else:
                text = self.text_norm.expand(last - first, *self.text_norm.shape)
                loss, d_image, _ = ce_grad(padded, text, y, mask, self.scale)
            losses.append(loss)
            if not trains_body:
                first = last
                continue
            dz1, dz2 = attai.row_gradients(W[2], saved, d_image.view(-1, d_image.shape[-1])[ok.flatten()].unsqueeze(0))
            inputs = attai.weight_gradient_inputs(saved, dz1, dz2)
            at = 0
            for k in range(first, last):
                attai.weight_gradients(inputs, slice(at, at + used[k]), attai.layers(grads, "image"))
                if shared_head:
                    grads["head.weight"].copy_(d_weight[k - first])
                    grads["head.bias"].copy_(d_bias[k - first])
                fold_first_adam_step(*pieces, weights[k], s)
                at += used[k]
            first = last
        if trains_body:
            for v, part in zip(total.values(), sum_.split(sizes)):  # the folded sum back into the caller's tensors
                v.copy_(part.view_as(v))
        return torch.cat(losses)


class PlainTrainer(LockstepTrainer):
    """The straightforward loop: one client after another, one batch at a time, autograd through the
    adapter's `logits` and torch.optim.Adam. Same schedule and results as the lock-step engines; the
    baseline they are measured against."""

    def train(self, state, epochs, generators, anchor=None, keys=None):
        from .matmul_precision import adapter_logits  # bf16: the adapter's matmuls only, as the fast path

        s, c = self.settings, self.clients
        low = low_dtype(s.precision)
        idx, valid, _, steps = make_schedule(c.sizes, s.batch_size, epochs, generators)
        losses = []
        stacked_anchor = is_stacked(anchor, state)
        trained = set(state) if keys is None else set(keys) & set(state)
        for k in range(len(c)):
            params = {key: v[k].clone().requires_grad_(key in trained) for key, v in state.items()}
            opt = torch.optim.Adam([params[q] for q in state if q in trained], lr=s.lr, betas=s.betas, eps=s.eps,
                                   weight_decay=s.weight_decay) if trained else None
            total = 0.0
            for step in range(steps[k]):
                rows = c.sets[k].index[idx[step, k][valid[step, k]].to(c.device)]
                x, y = c.x[rows], c.y[rows]
                logits = adapter_logits(self.adapter, params, x, self.text, self.scale, low).float()
                loss = in_batch_loss(logits[:, y]) if s.loss == "contrastive" \
                    else torch.nn.functional.cross_entropy(logits, y)
                total += loss.item()  # the data loss, as the other engines report
                if opt is None:
                    continue
                if s.mu:
                    loss = loss + s.mu / 2 * sum(((params[q] - (anchor[q][k] if stacked_anchor else anchor[q])) ** 2).sum()
                                                 for q in params if q in trained and q in anchor)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                for key in state:
                    state[key][k] = params[key]
            losses.append(total / max(1, steps[k]))
        return torch.tensor(losses)


class SequentialTrainer:
    """A lock-step engine applied to one client at a time. On a CPU this is the fastest for AttAI: a
    client's weights, gradients and Adam moments (8 MB at d = 512) stay in cache, while three clients in
    lock step spill to memory (bench/federate_speed.py measures both). Same batch schedule, same results.
    One inner trainer serves every client in turn (its buffers and set-up are shared), so a client costs
    what its rows cost: 300 clients of 17 rows are not 300 sets of buffers (bench/partition_speed.py)."""

    def __init__(self, adapter, clients: ClientSets, text, scale, settings, inner=BatchedTrainer):
        self.sets = [clients.client(i) for i in range(len(clients))]
        self.sizes = clients.sizes
        self.trainer = inner(adapter, self.sets[0], text, scale, settings)

    def train_mean(self, start: dict[str, torch.Tensor], epochs: int, generators: list[torch.Generator],
                   weights: list[float], anchor: dict[str, torch.Tensor] | None = None,
                   personal: dict[str, torch.Tensor] | None = None, keys=None):
        """Every client trains from the one adapter `start` (with its own `personal` keys [K, ...], trained
        in place) in turn and is added to the weighted sum of the clients' `start` keys as it finishes
        (`weights`: the strategy's client weights). One client's adapter is held at a time, so 300 small
        clients stay in cache instead of writing 300 stacked copies. Returns the sum (the weighted mean,
        for weights summing to 1; None with weights=None: nothing is summed) and each client's mean training
        loss. `keys`: those that train."""
        personal = personal or {}
        work = {q: torch.empty((1, *v.shape), dtype=v.dtype, device=v.device) for q, v in start.items()}
        one = {q: v[0] for q, v in work.items()}
        total, losses = (WeightedSum(start) if weights is not None else None), [None] * len(self.sets)
        # clients of one step go together (FedProx's pull towards `start` is nothing at a first step)
        trains = set(start) | set(personal) if keys is None else set(keys)
        trains_body, trains_head = bool(trains & set(start)), bool(trains & set(personal))
        folds = hasattr(self.trainer, "folds_first_steps") and self.trainer.folds_first_steps(start, personal) \
            and self.trainer.settings.dp is None \
            and trains <= set(start) | set(personal) and (trains_body or trains_head) \
            and (total is not None or not trains_body)
        small = [i for i, n in enumerate(self.sizes) if folds and one_step(n, self.trainer.settings.batch_size, epochs)]
        for i in sorted(set(range(len(self.sets))) - set(small)):
            if one:
                torch._foreach_copy_(list(one.values()), [start[q] for q in one])
            self.trainer.clients = self.sets[i]
            state = {**work, **{q: v[i:i + 1] for q, v in personal.items()}}
            losses[i] = self.trainer.train(state, epochs, [generators[i]], anchor, keys=keys)
            if total is not None:
                total.add(one, weights[i])
        if small:
            group = ClientSets([self.sets[i].sets[0] for i in small])
            where = torch.tensor(small, device=group.device)
            heads = {q: v.index_select(0, where) for q, v in personal.items()} or None
            folded = self.trainer.fold_first_steps(start, group, [generators[i] for i in small],
                                                   [weights[i] for i in small] if total is not None else None,
                                                   total.sum if total is not None else None, heads,
                                                   trains_body, trains_head)
            for q, v in (heads or {}).items():
                personal[q].index_copy_(0, where, v)
            for i, loss in zip(small, folded):
                losses[i] = loss[None]
            if total is not None:
                total.add(start, sum(weights[i] for i in small))  # their weight times the adapter they started from
        return (total.sum if total is not None else None), torch.cat(losses)

    def train(self, state, epochs, generators, anchor=None, keys=None):
        stacked_anchor = is_stacked(anchor, state)
        losses = []
        for i, client in enumerate(self.sets):
            self.trainer.clients = client
            losses.append(self.trainer.train({q: v[i:i + 1] for q, v in state.items()}, epochs, [generators[i]],
                                             {q: v[i] for q, v in anchor.items()} if stacked_anchor else anchor,
                                             keys=keys))
        return torch.cat(losses)


def make_trainer(engine: str, adapter: Adapter, clients: ClientSets, text: torch.Tensor, scale: float,
                 settings: TrainSettings):
    """engine=auto: AttAI's hand-written gradients, in lock step on CUDA (fewer, larger kernels) and one
    client at a time on a CPU (cache); torch.func for any other adapter."""
    if settings.dp is not None:  # DP-SGD: the generic engine, or AttAI's fast path where it computes it
        return private_trainer(engine, adapter, clients, text, scale, settings)
    if engine == "auto" and adapter.engine is not None:  # an adapter with its own engine (adapter=coop)
        return engine_class(adapter.engine)(adapter, clients, text, scale, settings)
    if engine == "auto":
        engine = ("batched" if clients.device.type == "cuda" else "sequential") if adapter.fast_path else "generic"
    if engine not in ENGINES:
        raise ConfigError(f"engine must be auto, {', '.join(ENGINES)}, not {engine!r}")
    if engine in FAST_PATH and not adapter.fast_path:
        raise ConfigError(f"engine={engine} uses AttAI's hand-written gradients; adapter {adapter.name} trains "
                          "with engine=generic (or auto)")
    return ENGINES[engine](adapter, clients, text, scale, settings)


def private_trainer(engine: str, adapter: Adapter, clients: ClientSets, text: torch.Tensor, scale: float,
                    settings: TrainSettings):
    """privacy=dpsgd's engine: AttAI's fast path (no text tower, one linear head at most: `BatchedTrainer.does_dp`),
    else the generic engine (per-sample gradients through torch.func, any adapter); engine=auto picks."""
    if adapter.engine is not None:
        raise ConfigError(f"privacy=dpsgd needs per-sample gradients, which adapter={adapter.name}'s own engine "
                          f"({adapter.engine}) does not compute; use another adapter, or privacy=dp_client")
    if engine == "auto":
        engine = ("batched" if clients.device.type == "cuda" else "sequential") if BatchedTrainer.does_dp(adapter) \
            else "generic"
    if engine == "plain":
        raise ConfigError("privacy=dpsgd trains with per-sample gradients, which engine=plain does not compute; "
                          "use engine=generic (or auto)")
    if engine in FAST_PATH and not BatchedTrainer.does_dp(adapter):
        raise ConfigError(f"engine={engine} has DP-SGD for AttAI's image tower (alone or under one linear head), not "
                          "for this model (a text tower, two heads or a method's own loss); use engine=generic (or auto)")
    if engine not in ENGINES:
        raise ConfigError(f"engine must be auto, {', '.join(ENGINES)}, not {engine!r}")
    return ENGINES[engine](adapter, clients, text, scale, settings)


def engine_class(name: str):
    """An engine by name: the built-ins, and those of adapters that need their own (imported when asked for,
    so that no model imports its trainer and no trainer module is loaded for nothing)."""
    if name == "prompt":
        from .prompt_trainer import PromptTrainer

        return PromptTrainer
    return ENGINES[name]


ENGINES = {"batched": BatchedTrainer, "sequential": SequentialTrainer, "generic": GenericTrainer, "plain": PlainTrainer}
FAST_PATH = ("batched", "sequential")
