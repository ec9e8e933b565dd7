"""Gaussian mixtures of a class's features in torch (FedPFT, federate/methods/fedpft.py), equal to
scikit-learn's `GaussianMixture` fitted on the same float64 rows with the same settings and seed.

- One component: the closed form, which is what EM converges to at once: the mean of the rows and their
  covariance (biased, divided by n) plus `reg_covar` on the diagonal; `diag` keeps its diagonal,
  `spherical` the mean of that diagonal. On the rows' device (the GPU when the run has one).
- Several components: EM as scikit-learn runs it (`init_params="kmeans"`: responsibilities from
  scikit-learn's KMeans with `n_init=1` and `RandomState(seed)`, the same call GaussianMixture makes; then
  E- and M-steps until the mean log-likelihood changes by less than `tol`, or `max_iter`), the same
  formulas in float64 on the rows' device.

`sample` draws from a mixture as scikit-learn does (component counts from a multinomial on the weights,
then mean + scale * z per component), with torch's generator (float32 normals).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COVARIANCES = ("spherical", "diag", "full")
REG_COVAR = 1e-6  # scikit-learn's default, which the Flower baseline keeps
TOL = 1e-12  # the Flower baseline's (conf/strategy/fedpft.yaml)
MAX_ITER = 10_000  # the Flower baseline's (conf/strategy/fedpft.yaml; its README says 1e3)
EPS = torch.finfo(torch.float64).eps


class FitError(ValueError):
    """A component's covariance is not positive definite (scikit-learn raises the same)."""


@dataclass
class Mixture:
    """weights [K], means [K, d], covariances [K] (spherical), [K, d] (diag) or [K, d, d] (full)."""
    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    covariance: str

    @property
    def components(self) -> int:
        return len(self.weights)


def fit(x: torch.Tensor, components: int, covariance: str, seed: int = 0, tol: float = TOL,
        max_iter: int = MAX_ITER, reg_covar: float = REG_COVAR) -> Mixture:
    """A mixture of `components` Gaussians fitted to rows x [n, d] (n > components), in float64."""
    x = x.double()
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}, not {covariance!r}")
    if len(x) <= components:
        raise ValueError(f"{len(x)} rows cannot be fitted with {components} components")
    if components == 1:
        return closed_form(x, covariance, reg_covar)
    resp = kmeans_responsibilities(x, components, seed)
    weights, means, covs = estimate(x, resp, reg_covar, covariance)
    weights = weights / len(x)
    chol = precision_cholesky(covs, covariance)
    lower_bound = -math.inf
    for _ in range(max_iter):
        previous = lower_bound
        log_norm, log_resp = e_step(x, weights, means, chol, covariance)
        weights, means, covs = estimate(x, log_resp.exp(), reg_covar, covariance)
        weights = weights / weights.sum()
        chol = precision_cholesky(covs, covariance)
        lower_bound = float(log_norm)
        if abs(lower_bound - previous) < tol:
            break
    return Mixture(weights, means, covs, covariance)


def closed_form(x: torch.Tensor, covariance: str, reg_covar: float = REG_COVAR) -> Mixture:
    mean = x.mean(0)
    centred = x - mean
    if covariance == "full":
        cov = centred.T @ centred / len(x) + reg_covar * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        cov = cov[None]
    else:
        cov = (centred * centred).mean(0) + reg_covar
        cov = cov[None] if covariance == "diag" else cov.mean()[None]
    return Mixture(torch.ones(1, dtype=x.dtype, device=x.device), mean[None], cov, covariance)


def kmeans_responsibilities(x: torch.Tensor, components: int, seed: int) -> torch.Tensor:
    """One-hot responsibilities [n, K] from scikit-learn's KMeans, as GaussianMixture initialises them."""
    import numpy as np
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=components, n_init=1, random_state=np.random.RandomState(seed)).fit(
        x.cpu().numpy()).labels_
    return torch.nn.functional.one_hot(torch.from_numpy(labels).long().to(x.device), components).double()


def estimate(x, resp, reg_covar: float, covariance: str):
    """M-step: weights (unnormalised), means and covariances from responsibilities [n, K]."""
    nk = resp.sum(0) + 10 * EPS
    means = resp.T @ x / nk[:, None]
    if covariance == "full":
        covs = torch.stack([((resp[:, k] * (x - means[k]).T) @ (x - means[k])) / nk[k] for k in range(len(nk))])
        covs = covs + reg_covar * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    else:
        covs = resp.T @ (x * x) / nk[:, None] - means ** 2 + reg_covar
        if covariance == "spherical":
            covs = covs.mean(1)
    return nk, means, covs


def precision_cholesky(covs: torch.Tensor, covariance: str) -> torch.Tensor:
    if covariance == "full":
        factor, info = torch.linalg.cholesky_ex(covs)
        if bool((info != 0).any()):
            raise FitError("a component's covariance is not positive definite")
        eye = torch.eye(covs.shape[-1], dtype=covs.dtype, device=covs.device).expand_as(covs)
        return torch.linalg.solve_triangular(factor, eye, upper=False).transpose(-1, -2)
    if bool((covs <= 0).any()):
        raise FitError("a component's variance is not positive")
    return 1.0 / covs.sqrt()


def log_gaussian(x, means, chol, covariance: str) -> torch.Tensor:
    """log N(x | component k) [n, K], as scikit-learn's _estimate_log_gaussian_prob."""
    d = x.shape[1]
    if covariance == "full":
        log_det = torch.log(chol.diagonal(dim1=-2, dim2=-1)).sum(-1)
        y = torch.einsum("nd,kde->kne", x, chol) - torch.einsum("kd,kde->ke", means, chol)[:, None]
        squared = (y * y).sum(-1).T
    elif covariance == "diag":
        log_det = torch.log(chol).sum(1)
        precisions = chol ** 2
        squared = (means ** 2 * precisions).sum(1) - 2 * x @ (means * precisions).T + (x * x) @ precisions.T
    else:
        log_det = d * torch.log(chol)
        precisions = chol ** 2
        squared = (means ** 2).sum(1) * precisions - 2 * (x @ means.T * precisions) + \
            torch.outer((x * x).sum(1), precisions)
    return -0.5 * (d * math.log(2 * math.pi) + squared) + log_det


def e_step(x, weights, means, chol, covariance: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean log-likelihood of the rows, log responsibilities [n, K])."""
    weighted = log_gaussian(x, means, chol, covariance) + torch.log(weights)
    norm = torch.logsumexp(weighted, dim=1)
    return norm.mean(), weighted - norm[:, None]


def log_likelihood(x: torch.Tensor, mixture: Mixture) -> torch.Tensor:
    """The mean log-likelihood of rows x under a mixture (a number on x's device)."""
    chol = precision_cholesky(mixture.covariances.double(), mixture.covariance)
    return e_step(x.double(), mixture.weights.double(), mixture.means.double(), chol, mixture.covariance)[0]


def sample(mixture: Mixture, n: int, generator: torch.Generator) -> torch.Tensor:
    """n rows [n, d] (float64) drawn as scikit-learn's `GaussianMixture.sample` draws them: the rows of
    each component from a multinomial over the weights, then mean + sqrt(variance) * z (spherical, diag)
    or mean + L z with L L^T the covariance (full; federate.features.gaussian_rows), z standard normal
    from `generator`, component after component."""
    from .features import gaussian_rows

    weights = mixture.weights.double().cpu().clamp_min(0)
    if mixture.components == 1:
        per = [n]
    else:
        drawn = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=generator)
        per = torch.bincount(drawn, minlength=mixture.components).tolist()
    parts = []
    for k, m in enumerate(per):
        if m == 0:
            continue
        mean, cov = mixture.means[k].double(), mixture.covariances[k].double()
        if mixture.covariance == "full":
            parts.append(gaussian_rows(mean, cov, m, generator))
        else:
            z = torch.randn(m, mean.shape[0], generator=generator).double().to(mean.device)
            parts.append(mean + z * cov.clamp_min(0).sqrt())
    return torch.cat(parts)
