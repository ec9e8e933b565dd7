"""Each adapter trains with its authors' loss unless `loss=` says otherwise: CLIP-Adapter with
cross-entropy over the class prompts (conf/adapter/clip_adapter.yaml), AttAI with FedCLIP's in-batch
contrastive loss. summary.json records the loss used."""
from __future__ import annotations

import pytest
from conftest import config, run_federate

import federate.config  # noqa: F401  (registers the config schema that conf/federate.yaml uses)


@pytest.mark.parametrize("overrides, loss", [
    (["adapter=clip_adapter"], "ce"),  # CLIP-Adapter's own loss
    (["adapter=clip_adapter", "loss=contrastive"], "contrastive"),  # the command line wins
    ([], "contrastive"),  # AttAI: FedCLIP's
    (["loss=ce"], "ce"),
])
def test_the_adapters_default_loss_and_its_override(overrides, loss):
    assert config("federate", overrides).loss == loss


def test_clip_adapter_run_records_cross_entropy(planted_cache, tmp_path):
    s = run_federate(planted_cache, tmp_path, "adapter=clip_adapter", rounds=1)
    assert s["adapter"]["name"] == "clip_adapter" and s["loss"] == "ce"
