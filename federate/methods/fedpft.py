"""FedPFT (Beitollahi et al. 2024, "Parametric Feature Transfer: One-shot Federated Learning with Foundation
Models"), as Flower's baselines/fedpft: one round. Each client fits, to the frozen CLIP embeddings of each
class it holds (the cache's, as the baseline's CLIP features), a Gaussian mixture of `method.components`
components with `method.covariance` covariances (federate/mixtures.py: scikit-learn's GaussianMixture with
the baseline's settings: k-means init, tol 1e-12, max_iter 10000, reg_covar 1e-6) and sends only the
mixtures' parameters (float16, as the baseline sends them) and its rows per class, once. The server draws
synthetic embeddings from every client's mixture of every class (as many as the client's rows of the class,
the baseline's, or `method.samples_per_class` per class in all, shared out among its clients by their
rows) and trains a linear head on them, logits = x W^T + b on the raw embedding (torch.nn.Linear's init,
AdamW at the run's lr, 1e-4 in the method's config, weight decay 0.01, `method.head_epochs` passes of the
run's batch size, shuffled); every client deploys it and the target domain is evaluated with it.

A class of one row on a client cannot be fitted (the baseline drops classes of at most `n_mixtures`
rows): no mixture is sent for it (logged); a class of n rows with n <= components is fitted with n - 1
components (the baseline would drop it), and a fit whose covariance is not positive definite is retried
with one component fewer (one component always fits: the closed form).

What travels (`bytes_per_round`): up, per client, [C, K, d] means, the covariances ([C, K], [C, K, d] or
[C, K, d, d]) and [C, K] weights in float16 and [C] rows in float32 (zero for the classes it sent no
mixture for); down, the head, [C, d] + [C] float32. The client's `train_loss` is the fitted mixtures' mean
negative log-likelihood of its rows.
"""
from __future__ import annotations

import logging
import time
import zlib

import torch
import torch.nn.functional as F

from .. import mixtures
from ..adapters import Adapter
from ..errors import ConfigError
from ..features import fused, train_linear
from ..training import Update
from . import Method, number, refuse_privacy, register

log = logging.getLogger("federate")
MEANS, COVARIANCES, WEIGHTS, COUNT = "gmm.means", "gmm.covariances", "gmm.weights", "gmm.count"
SENT = torch.float16  # the baseline's transport (fedpft/utils.py learn_gmm)
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which the baseline keeps


class FeatureHead(Adapter):
    """A linear head on the cached embedding itself, logits = x W^T + b (the baseline's
    torch.nn.Linear(feature_dimension, num_classes) on CLIP's features), initialised as torch.nn.Linear."""
    name = "linear"
    towers = ("image",)

    def init(self, dim, text):
        head = torch.nn.Linear(dim, len(text))
        return {"head.weight": head.weight.detach(), "head.bias": head.bias.detach()}

    def features(self, params, x, low=None):
        return x

    def logits(self, params, x, text, scale):
        return F.linear(x, params["head.weight"], params["head.bias"])


def sample_generator(seed: int) -> torch.Generator:
    """The server's draws of synthetic embeddings."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/fedpft/samples".encode()))


def batch_generator(seed: int) -> torch.Generator:
    """The order of the head's batches."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/fedpft/batches".encode()))


@register("fedpft", components=1, covariance="spherical", samples_per_class=None, head_epochs=50)
class FedPFT(Method):
    def __init__(self, components: int = 1, covariance: str = "spherical", samples_per_class: int | None = None,
                 head_epochs: int = 50):
        if covariance not in mixtures.COVARIANCES:
            raise ConfigError(f"method.covariance must be one of {', '.join(mixtures.COVARIANCES)}, not {covariance!r}")
        per_class = None if samples_per_class is None else number("samples_per_class", samples_per_class, low=1,
                                                                   integer=True)
        super().__init__(dict(components=number("components", components, low=1, integer=True), covariance=covariance,
                              samples_per_class=per_class,
                              head_epochs=number("head_epochs", head_epochs, low=1, integer=True)))

    def check(self, cfg) -> None:
        refuse_privacy(cfg, self, "its clients' per-class Gaussian mixtures")
        super().check(cfg)
        if cfg.loss != "ce":
            raise ConfigError("method=fedpft trains its head with cross-entropy; use loss=ce (its config sets it "
                              "unless the command line says otherwise)")
        if cfg.text_adapter:
            raise ConfigError("method=fedpft trains a linear head on the image embeddings, where a text adapter has "
                              "no use; use text_adapter=false")
        # what the server's head training needs of the run: lr, batch size, seed
        self.server_settings, self.seed = self.train_settings(cfg), int(cfg.seed)

    def rounds(self, cfg) -> int:
        return 1  # one-shot

    def model(self, adapter):
        return FeatureHead()  # the run's adapter has no part: FedPFT works on the frozen embeddings

    # --- the clients: one mixture per class

    def update_like(self, shared, round_):
        w = shared["head.weight"]
        (C, d), K = w.shape[-2:], self.settings["components"]
        cov = {"spherical": (C, K), "diag": (C, K, d), "full": (C, K, d, d)}[self.settings["covariance"]]
        return {MEANS: w.new_zeros(C, K, d, dtype=SENT), COVARIANCES: w.new_zeros(cov, dtype=SENT),
                WEIGHTS: w.new_zeros(C, K, dtype=SENT), COUNT: w.new_zeros(C)}

    def local_update(self, train, shared, personal):
        like = self.update_like(shared, train.round)
        sent, losses, start = [], {}, time.perf_counter()
        for i, rows in enumerate(train.rows):
            arrays, nll = self.fit_client(*rows.gather(), like, seed=train.clients[i][0], name=train.names[i])
            sent.append(arrays)
            losses[train.labels[i]] = nll
        log.info("fedpft: %d client(s) fitted %d mixtures to %d rows in %.1f s", len(train),
                 sum(int((a[COUNT] > 0).sum()) for a in sent), sum(train.sizes), time.perf_counter() - start)
        return Update({k: torch.stack([a[k] for a in sent]) for k in like}, train.sizes, losses)

    def fit_client(self, x: torch.Tensor, y: torch.Tensor, like: dict, seed: int, name: str = ""):
        """One client's mixtures of its rows x [n, d] with labels y, as sent (`like`'s dtypes), and their mean
        negative log-likelihood of the rows they were fitted on."""
        K, kind = self.settings["components"], self.settings["covariance"]
        out = {k: torch.zeros(v.shape, dtype=torch.float64, device=x.device) for k, v in like.items()}
        counts = torch.bincount(y, minlength=len(out[COUNT])).tolist()
        skipped = [c for c, n in enumerate(counts) if n == 1]
        if K == 1 and kind != "full":
            nll, fitted = self.closed_forms(x, y, out)
        else:
            nll, fitted = self.fit_classes(x, y, counts, out, seed)
        if skipped:  # (the baseline drops them too; their rows are left out of the synthetic set)
            shown = ", ".join(map(str, skipped[:8])) + (", ..." if len(skipped) > 8 else "")
            log.info("fedpft: client %s holds one training row of %d class(es) (%s): no mixture sent for them",
                     name or "?", len(skipped), shown)
        sent = {k: v.to(like[k].dtype) for k, v in out.items()}
        if any(not bool(torch.isfinite(v).all()) for v in sent.values()):
            raise ConfigError(f"fedpft: client {name}'s mixture parameters do not fit in float16 (embeddings beyond "
                              "+-65504?); its embeddings cannot be sent as the baseline sends them")
        return sent, nll / max(fitted, 1)

    def closed_forms(self, x: torch.Tensor, y: torch.Tensor, out: dict) -> tuple[float, int]:
        """One spherical or diagonal component per class of two or more rows, every class at once (what
        `mixtures.closed_form` gives each class); returns the summed negative log-likelihood and the rows."""
        C, x = len(out[COUNT]), x.double()
        count = torch.bincount(y, minlength=C).double()
        n = count.clamp_min(1)[:, None]
        mean = torch.zeros(C, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x) / n
        squares = (x - mean[y]).pow_(2)
        squares = torch.zeros_like(mean).index_add_(0, y, squares)  # per class: the summed squared deviations
        var = squares / n + mixtures.REG_COVAR
        if self.settings["covariance"] == "spherical":
            var = var.mean(1, keepdim=True).expand_as(mean)
        fit = count >= 2
        out[MEANS][:, 0] = torch.where(fit[:, None], mean, 0.0)
        out[COVARIANCES][:, 0] = torch.where(fit[:, None], var, 0.0) if out[COVARIANCES].dim() == 3 else \
            torch.where(fit, var[:, 0], 0.0)
        out[WEIGHTS][:, 0] = fit.double()
        out[COUNT][:] = torch.where(fit, count, 0.0)
        # -log N(x | mean, var) summed over each class's rows, from its sums of squares
        nll = 0.5 * ((squares / var).sum(1) + count * torch.log(2 * torch.pi * var).sum(1))
        return float(nll[fit].sum()), int(count[fit].sum())

    def fit_classes(self, x, y, counts: list[int], out: dict, seed: int) -> tuple[float, int]:
        """Mixtures of several components (or full covariances), class after class."""
        K, kind = self.settings["components"], self.settings["covariance"]
        order = torch.argsort(y, stable=True)
        start, nll, fitted = 0, 0.0, 0
        for c, n in enumerate(counts):
            rows, start = x[order[start:start + n]], start + n
            if n < 2:
                continue
            mixture = self.fit_class(rows, min(K, n - 1), kind, seed)
            k = mixture.components
            out[MEANS][c, :k], out[COVARIANCES][c, :k], out[WEIGHTS][c, :k] = \
                mixture.means, mixture.covariances, mixture.weights
            out[COUNT][c] = n
            nll -= float(mixtures.log_likelihood(rows, mixture)) * n
            fitted += n
        return nll, fitted

    @staticmethod
    def fit_class(rows: torch.Tensor, components: int, kind: str, seed: int) -> mixtures.Mixture:
        while True:
            try:
                return mixtures.fit(rows, components, kind, seed)
            except mixtures.FitError:
                if components == 1:
                    raise
                components -= 1  # a component collapsed: one fewer (one is the closed form, which always fits)

    # --- the server: synthetic embeddings, then the head

    def allocation(self, count: torch.Tensor) -> torch.Tensor:
        """Synthetic rows per (client, class), [M, C]: the client's rows of the class (the baseline), or
        `samples_per_class` per class shared out by the clients' rows (largest remainders; ties to the
        first client)."""
        count = count.double().cpu()
        total = self.settings["samples_per_class"]
        if total is None:
            return count.round().long()
        share = total * count / count.sum(0).clamp_min(1)
        per = share.floor()
        left = (total - per.sum(0)).where(count.sum(0) > 0, torch.zeros(()))
        for c in range(count.shape[1]):
            order = torch.argsort(-(share[:, c] - per[:, c]), stable=True)[:int(left[c])]
            per[order, c] += 1
        return per.long()

    def synthetic(self, update: Update, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The synthetic embeddings [N, d] (float32) and their labels, client after client, class after class."""
        s, kind = update.stacked, self.settings["covariance"]
        per = self.allocation(s[COUNT])
        generator = sample_generator(self.seed)
        xs, ys = [], []
        one = s[WEIGHTS].shape[-1] == 1 and kind != "full"
        for i in range(per.shape[0]):
            classes = torch.nonzero(per[i]).flatten().tolist()
            if one and classes:  # one spherical or diagonal component: a client's classes at once, in float32
                n = per[i, classes].tolist()
                z = torch.cat([torch.randn(m, s[MEANS].shape[-1], generator=generator) for m in n]).to(device)
                label = torch.repeat_interleave(torch.tensor(classes), torch.tensor(n)).to(device)
                std = s[COVARIANCES][i, :, 0].float().clamp_min(0).sqrt()
                std = std[:, None] if std.dim() == 1 else std  # (spherical: one variance per class)
                xs.append(s[MEANS][i, :, 0].float().to(device)[label] + z * std.to(device)[label])
                ys.append(label)
                continue
            for c in classes:
                mixture = mixtures.Mixture(s[WEIGHTS][i, c].double(), s[MEANS][i, c].double(),
                                           s[COVARIANCES][i, c].double(), kind)
                used = mixture.weights > 0  # (fewer components than K: the rest were sent empty)
                mixture = mixtures.Mixture(mixture.weights[used], mixture.means[used], mixture.covariances[used], kind)
                n = int(per[i, c])
                xs.append(mixtures.sample(mixture, n, generator).float().to(device))
                ys.append(torch.full((n,), c, dtype=torch.long, device=device))
        if not xs:
            return torch.zeros(0, s[MEANS].shape[-1], device=device), torch.zeros(0, dtype=torch.long, device=device)
        return torch.cat(xs), torch.cat(ys)

    def aggregate(self, server, shared, update):
        weight, bias = shared["head.weight"], shared["head.bias"]
        start = time.perf_counter()
        x, y = self.synthetic(update, weight.device)
        drawn = time.perf_counter()
        if not len(y):
            log.warning("fedpft: no client sent a mixture (every class it holds has one row); the head stays as "
                        "initialised")
            return shared
        s = self.server_settings

        def adamw(params):
            return torch.optim.AdamW(params, lr=s.lr, weight_decay=WEIGHT_DECAY, **fused(weight.device))

        weight, bias = train_linear(weight, bias, x, y, epochs=self.settings["head_epochs"], batch_size=s.batch_size,
                                    optimizer=adamw, generator=batch_generator(self.seed))
        log.info("fedpft: %d synthetic embeddings drawn in %.1f s; the head trained on them for %d epochs of batch "
                 "%d in %.1f s", len(y), drawn - start, self.settings["head_epochs"], s.batch_size,
                 time.perf_counter() - drawn)
        return {"head.weight": weight, "head.bias": bias}
