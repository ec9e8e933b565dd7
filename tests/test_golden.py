"""partition=domain runs give the numbers they gave before clients, sampling, every-round evaluation and
resume came in: the values below were captured from the code of commit 1b1c73a (before the Federation loop)
with tests/conftest.py's planted cache, lr 1e-3 and 8 rounds, and are hard-coded on purpose."""
from __future__ import annotations

import hashlib
import json

import pytest
from conftest import run_federate

CLIENTS = ("alpha", "beta", "gamma")
SPLITS_SHA256 = "257811e9d7fd39ae982ee8aa4413373c26eb23b615ae30b814db5e2f92836fed"  # splits.json, the same for every method
GOLDEN = {
    'fedclip': {'overrides': [],
                'best_round': 7,
                'generalization': 0.66250002,
                'overall': 0.91562501,
                'val_mean': 0.99358974,
                'personalization': [1.0, 1.0, 1.0],
                'val': [[0.23076923, 0.375, 0.23333333], [0.23076923, 0.5, 0.30000001],
                        [0.46153846, 0.85000002, 0.33333334], [0.57692307, 1.0, 0.60000002], [0.88461536, 1.0, 0.96666664],
                        [0.92307693, 1.0, 1.0], [0.98076922, 1.0, 1.0], [0.98076922, 1.0, 1.0]],
                'loss': [[14.3474369, 7.6354785, 12.21122265], [8.75105095, 4.50464296, 7.26734877],
                         [5.2772274, 3.10348296, 5.35425949], [3.35435414, 2.55837989, 3.50929642],
                         [2.54919124, 2.31806827, 2.56543684], [2.32735038, 2.31435513, 2.11989141],
                         [2.24247503, 2.17703676, 2.0587709], [2.1741817, 2.18229604, 2.02946329]]},
    'fedprox': {'overrides': ['method=fedprox', 'method.mu=0.5'],
                'best_round': 7,
                'generalization': 0.66250002,
                'overall': 0.91562501,
                'val_mean': 0.99358974,
                'personalization': [1.0, 1.0, 1.0],
                'loss': [[14.34814167, 7.63588619, 12.21123409], [8.75293827, 4.5054245, 7.26810694],
                         [5.2793684, 3.10421038, 5.3544879], [3.35703158, 2.55928731, 3.50888157],
                         [2.55068278, 2.31919193, 2.56602573], [2.32881021, 2.31582069, 2.12036848],
                         [2.2434814, 2.17852998, 2.05918813], [2.17475891, 2.18333697, 2.02953601]]},
    'local': {'overrides': ['method=local'],
              'best_round': 4,
              'generalization': 0.42916666,
              'overall': 0.85729167,
              'val_mean': 1.0,
              'personalization': [1.0, 1.0, 1.0],
              'val': [[0.26923078, 0.55000001, 0.26666668], [0.75, 0.89999998, 0.33333334], [1.0, 1.0, 0.93333334],
                      [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
              'loss': [[14.3474369, 7.6354785, 12.21122265], [5.09276295, 3.66752362, 5.90023088],
                       [2.42508197, 2.60823464, 3.34963489], [2.27395701, 2.3307395, 2.2420218],
                       [2.14149237, 2.15013433, 2.15093875], [2.09815073, 2.13511562, 2.01276994],
                       [2.06894135, 2.03262138, 1.97883475], [2.02133512, 2.04833531, 1.95533037]]},
    'central': {'overrides': ['method=central'],
                'best_round': 2,
                'generalization': 0.66666669,
                'overall': 0.91666667,
                'val_mean': 1.0,
                'personalization': [1.0, 1.0, 1.0],
                'val': [[0.46153846, 0.85000002, 0.66666669], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0],
                        [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
                'loss': [[10.8696394], [2.67770267], [2.18379784], [2.1000545], [2.0387001], [2.02898431], [1.99256706],
                         [1.94560766]]},
    'zeroshot': {'overrides': ['method=zeroshot'],
                 'best_round': 0,
                 'generalization': 0.21250001,
                 'overall': 0.15761219,
                 'val_mean': 0.20192308,
                 'personalization': [0.13461539, 0.15000001, 0.13333334],
                 'val': [[0.23076923, 0.175, 0.2]],
                 'loss': []},
    'fedavgm': {'overrides': ['strategy=fedavgm', 'aggregation=samples'],
                'best_round': 7,
                'generalization': 0.85833335,
                'overall': 0.96458334,
                'val_mean': 1.0,
                'personalization': [1.0, 1.0, 1.0],
                'val': [[0.23076923, 0.375, 0.23333333], [0.5, 0.625, 0.33333334], [0.98076922, 0.72500002, 0.60000002],
                        [0.90384614, 0.85000002, 1.0], [0.92307693, 0.97500002, 1.0], [0.98076922, 0.97500002, 1.0],
                        [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
                'loss': [[14.3474369, 7.6354785, 12.21122265], [8.09761715, 4.55596972, 7.49754524],
                         [2.81991458, 2.93235278, 4.42623472], [2.21306801, 2.43288469, 2.40533781],
                         [2.11068392, 2.08703518, 2.13647962], [2.0873096, 2.07956028, 1.99436986],
                         [2.0468533, 2.01664448, 1.9710983], [2.00047159, 2.03696251, 1.96450329]]},
}
GOLDEN["fedprox"]["val"] = GOLDEN["fedclip"]["val"]  # the same accuracies: mu=0.5 moves only the losses


@pytest.mark.parametrize("name", list(GOLDEN))
def test_partition_domain_runs_give_the_numbers_of_the_code_before_clients(planted_cache, tmp_path, name):
    g = GOLDEN[name]
    s = run_federate(planted_cache, tmp_path, *g["overrides"], rounds=8)
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert s["best_round"] == g["best_round"]
    for key in ("generalization", "overall", "val_mean"):
        assert s[key] == pytest.approx(g[key], abs=1e-7), key
    assert [s["personalization"][c] for c in CLIENTS] == pytest.approx(g["personalization"], abs=1e-7)
    assert [[r["val_acc"][c] for c in CLIENTS] for r in rows] == [pytest.approx(v, abs=1e-7) for v in g["val"]]
    trained = ["pooled"] if name == "central" else CLIENTS
    losses = [[r["train_loss"][c] for c in trained] for r in rows if r.get("train_loss")]
    assert losses == [pytest.approx(v, rel=1e-5) for v in g["loss"]]
    assert hashlib.sha256((tmp_path / "splits.json").read_bytes()).hexdigest() == SPLITS_SHA256
