"""The Flower baseline's FedPFT (adap/flower baselines/fedpft), its clients' mixtures and its server's head,
written here from its code's logic (fedpft/utils.py learn_gmm, fedpft/strategy.py FedPFT.aggregate_fit,
fedpft/models.py train and test), to check fedclip's method=fedpft against on the same features and
partition (their data loading aside): scikit-learn's GaussianMixture per client and class (classes of at
most n_mixtures rows dropped), the parameters cast to float16 to be sent and back to float32 on the
server, `gmm.sample(num_samples)` per (client, class), torch.nn.Linear, AdamW, CrossEntropyLoss, a shuffled
DataLoader.

The randomness is theirs by default (sample()'s RandomState(seed), which every call starts afresh;
torch's global generator for the head's init and the DataLoader's order, seeded with `torch_seed`); given
`draws` (z for n rows of dimension d, in their order of (client, class)), `init` (the head's weight and
bias) and `shuffle` (the DataLoader's generator), it computes the same steps on those draws instead.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from torch.utils.data import DataLoader


def learn_gmm(features: np.ndarray, labels: np.ndarray, n_mixtures: int, cov_type: str, seed: int, tol: float,
              max_iter: int) -> list[dict]:
    """fedpft/utils.py learn_gmm: one float16 mixture per label with more than n_mixtures rows."""
    out = []
    for label in np.unique(labels):
        cond = features[label == labels]
        if len(cond) > n_mixtures:
            gmm = GaussianMixture(n_components=n_mixtures, covariance_type=cov_type, random_state=seed, tol=tol,
                                  max_iter=max_iter)
            gmm.fit(cond)
            out.append({"label": int(label), "means": gmm.means_.astype("float16"),
                        "weights": gmm.weights_.astype("float16"),
                        "covariances": gmm.covariances_.astype("float16"), "num_samples": len(cond)})
    return out


def server_head(clients: list[tuple[np.ndarray, np.ndarray]], num_classes: int, *, n_mixtures=1,
                cov_type="spherical", seed=0, tol=1e-12, max_iter=10000, lr=1e-4, num_epochs=50, batch_size=32,
                torch_seed=0, draws=None, init=None, shuffle=None):
    """The head (torch.nn.Linear) the baseline's server trains from the clients' (features float64 [n, d],
    labels [n]) training rows, in the clients' order; and the mixtures they sent."""
    sent = [learn_gmm(f, y, n_mixtures, cov_type, seed, tol, max_iter) for f, y in clients]
    dim = clients[0][0].shape[1]
    dataset = []
    for gmms in sent:  # aggregate_fit: the clients' results in order, each client's mixtures in label order
        for p in gmms:
            gmm = GaussianMixture(n_components=n_mixtures, covariance_type=cov_type, random_state=seed, tol=tol,
                                  max_iter=max_iter)
            gmm.means_ = p["means"].astype("float32")
            gmm.weights_ = p["weights"].astype("float32")
            gmm.covariances_ = p["covariances"].astype("float32")
            if draws is None:
                syn, _ = gmm.sample(p["num_samples"])
            else:  # sklearn's spherical/diag sample(): mean + standard_normal * sqrt(covariance), one component
                assert n_mixtures == 1 and cov_type in ("spherical", "diag")
                syn = gmm.means_[0] + draws(p["num_samples"], dim) * np.sqrt(gmm.covariances_[0])
            syn = torch.tensor(syn, dtype=torch.float32)
            dataset += [{"img": x, "label": torch.tensor(p["label"])} for x in syn]
    if init is None:
        torch.manual_seed(torch_seed)
        head = torch.nn.Linear(dim, num_classes)
    else:
        head = torch.nn.Linear(dim, num_classes)
        with torch.no_grad():
            head.weight.copy_(init[0])
            head.bias.copy_(init[1])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=shuffle)
    opt = torch.optim.AdamW(params=head.parameters(), lr=lr)
    for _ in range(num_epochs):  # fedpft/models.py train
        for batch in loader:
            head.zero_grad()
            loss = torch.nn.CrossEntropyLoss()(head(batch["img"]), batch["label"])
            loss.backward()
            opt.step()
    return head, sent


def pooled_accuracy(head: torch.nn.Linear, tests: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """fedpft/models.py test on each client's test rows, then server.py weighted_average: correct over all."""
    correct = total = 0
    with torch.no_grad():
        for f, y in tests:
            pred = head(torch.tensor(f, dtype=torch.float32)).argmax(1)
            correct += int((pred == torch.tensor(y)).sum())
            total += len(y)
    return correct / total
