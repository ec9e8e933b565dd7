"""adapter=coop: CoOp's prompt context through the frozen text encoder of a tiny random CLIP, on a planted
cache whose image embeddings are that encoder's class features under a hidden context (so a learned
context can fit them). Exact text forwards, PromptFL / FedProx / local CoOp runs, the lock-step trainer
against the plain loop, grouped sweeps, Flower, and one-line refusals."""
from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
from conftest import ROOT, config, draw_shapes
from planted import one_line as planted_one_line
from planted import planted, write_cache
from safetensors.torch import load_file

from extract.identity import model_fingerprint
from federate import adapters, sweep
from federate.errors import ConfigError
from federate.report import report
from federate.run import run
from federate.text_encoder import load_prompt_model

NAMES = ["dog", "elephant", "giraffe", "alarm clock", "house"]
SIZES = {"alpha": 70, "beta": 60, "gamma": 45, "target": 40}


def prompt_model(folder):
    return load_prompt_model(str(folder), model_fingerprint(folder))


def coop_cache(path, model_dir, model_name="tiny-clip", fingerprint_of=None):
    """Image embeddings around the class features of a hidden context, plus a per-domain offset."""
    pm = prompt_model(model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hidden = torch.randn(1, 4, pm.encoder.width, generator=g) * 0.5
        feats = torch.nn.functional.normalize(pm.features(hidden, pm.prompts(NAMES, 4))[0], dim=-1).numpy()
    rng = np.random.default_rng(0)
    domains = {}
    for name, n in SIZES.items():
        y = rng.integers(0, len(NAMES), n)
        domains[name] = (feats[y] * 3 + rng.normal(0, 0.4, (n, feats.shape[1])) + rng.normal(0, 0.4, feats.shape[1]), y)
    return write_cache(path, domains, feats[None], model_name=model_name, class_names=NAMES,
                       model_fingerprint=model_fingerprint(fingerprint_of or model_dir))


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory, tiny_model):
    return coop_cache(tmp_path_factory.mktemp("coop") / "coop.h5", tiny_model)


def coop_cfg(cache_file, model, *overrides, rounds=4):
    return config("federate", [f"cache_file={cache_file}", f"model.name={model}", "target_domain=target", "adapter=coop",
                               "adapter.n_ctx=4", f"rounds={rounds}", *overrides])


def history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def mean_loss(row):
    return sum(row["train_loss"].values()) / len(row["train_loss"])


# --- exactness of the text side -----------------------------------------------------------------------------

def test_the_truncated_and_shared_prefix_forwards_equal_the_full_77_token_forward(tiny_model):
    from transformers import CLIPModel

    pm = prompt_model(tiny_model)
    prompts = pm.prompts(NAMES, 4)
    assert prompts.ids.shape[1] < 77  # the padding after the last EOS is dropped
    ids77 = pm.tokenizer([f"X X X X {n}." for n in NAMES], padding="max_length", max_length=77,
                         return_tensors="pt")["input_ids"]
    assert torch.equal(ids77[:, :prompts.ids.shape[1]], prompts.ids)
    clip = CLIPModel.from_pretrained(str(tiny_model)).eval()
    with torch.no_grad():
        reference = clip.get_text_features(input_ids=ids77)
        reference = reference if isinstance(reference, torch.Tensor) else reference.pooler_output
        ctx = pm.encoder.token_embedding[ids77[0, 1:5]][None]  # the context of real tokens: "X X X X"
        for shared in (True, False):
            torch.testing.assert_close(pm.features(ctx, prompts, shared=shared)[0], reference, rtol=0, atol=1e-5)

        # learned (arbitrary) contexts of 3 clients, unified and class-specific, against 77 tokens whole
        full = pm.encoder.token_embedding[ids77]  # [C, 77, w]
        eos = prompts.eos + 5
        for ctx in (torch.randn(3, 4, pm.encoder.width), torch.randn(3, len(NAMES), 4, pm.encoder.width)):
            per_class = ctx if ctx.dim() == 4 else ctx[:, None].expand(3, len(NAMES), 4, -1)
            tokens = torch.cat([full[None, :, :1].expand(3, -1, -1, -1), per_class, full[None, :, 5:].expand(3, -1, -1, -1)], 2)
            whole = pm.encoder.forward(tokens, eos.expand(3, -1))
            torch.testing.assert_close(pm.features(ctx, prompts), whole, rtol=0, atol=1e-5)
            torch.testing.assert_close(pm.features(ctx, prompts, shared=False), whole, rtol=0, atol=1e-5)


def test_evaluation_logits_follow_the_context_even_when_it_changes_in_place(cache_file, tiny_model):
    adapter = adapters.build({"name": "coop", "n_ctx": 4})
    from federate.cache import load_cache

    adapter.prepare(load_cache(cache_file), config("federate", [f"model.name={tiny_model}"]).model)
    params = adapters.init_params(adapter, 32, 0, torch.zeros(len(NAMES), 32))
    x = torch.randn(6, 32)
    first = adapter.logits(params, x, None, 100.0)
    assert torch.equal(adapter.logits(params, x, None, 100.0), first)  # served from the per-context features
    params["ctx"].add_(torch.randn_like(params["ctx"]))  # same tensor, new values: never the old features
    fresh = 100.0 * torch.nn.functional.normalize(x, dim=-1) @ adapter.class_features(params["ctx"][None])[0].T
    torch.testing.assert_close(adapter.logits(params, x, None, 100.0), fresh, rtol=0, atol=1e-6)
    assert not torch.allclose(fresh, first)


# --- runs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [["method=fedclip"], ["method=fedprox", "method.mu=0.1"], ["method=local"],
                                       ["method=fedclip", "adapter.optimizer=sgd", "lr=1e-4"],
                                       ["method=fedclip", "precision=bf16"]])
def test_promptfl_fedprox_and_local_coop_learn_the_context_only(cache_file, tiny_model, tmp_path, overrides):
    summary = run(coop_cfg(cache_file, tiny_model, *overrides, rounds=6), tmp_path)
    rows = history(tmp_path)
    assert mean_loss(rows[-1]) < 0.6 * mean_loss(rows[0]), [mean_loss(r) for r in rows]
    assert summary["adapter"]["name"] == "coop" and summary["adapter"]["n_ctx"] == 4
    assert summary["adapter"]["csc"] is False and summary["loss"] == "ce"
    assert summary["adapter"]["optimizer"] == ("sgd" if "adapter.optimizer=sgd" in overrides else "adam")
    assert summary["trainable_params"] == 4 * 32  # the context only
    clients = len(summary["participants"])
    per_round = 0 if summary["method"] == "local" else clients * 4 * 4 * 32
    assert summary["bytes_per_round"] == {"up": per_round, "down": per_round}
    if "adapter.optimizer=sgd" not in overrides:  # the report names the adapter and its settings
        text = report(tmp_path, make_plots=False)
        assert f"| {summary['method']} (" in text and "adapter=coop(n_ctx=4, ctx_init=None, csc=False, optimizer=adam)" in text
    saved = load_file(tmp_path / "adapter.safetensors")
    if summary["method"] == "local":
        assert sorted(saved) == [f"{d}/ctx" for d in ("alpha", "beta", "gamma")]
    else:
        assert list(saved) == ["ctx"] and saved["ctx"].shape == (4, 32)


def test_the_prompt_trainer_equals_the_plain_loop(cache_file, tiny_model, tmp_path):
    """Lock step (all clients' prompts in one batch, fused Adam) against one client and batch at a time."""
    runs = {e: run(coop_cfg(cache_file, tiny_model, f"engine={e}", rounds=3), tmp_path / e) for e in ("auto", "plain")}
    for a, b in zip(history(tmp_path / "auto"), history(tmp_path / "plain")):
        assert a["val_acc"] == b["val_acc"]
        for client, loss in a["train_loss"].items():
            assert loss == pytest.approx(b["train_loss"][client], abs=1e-5)
    torch.testing.assert_close(load_file(tmp_path / "auto" / "adapter.safetensors")["ctx"],
                               load_file(tmp_path / "plain" / "adapter.safetensors")["ctx"], rtol=0, atol=1e-5)
    assert runs["auto"]["generalization"] == runs["plain"]["generalization"]


def test_class_specific_and_word_initialised_contexts(cache_file, tiny_model, tmp_path):
    summary = run(coop_cfg(cache_file, tiny_model, "adapter.csc=true", rounds=2), tmp_path / "csc")
    assert summary["trainable_params"] == len(NAMES) * 4 * 32 and summary["adapter"]["csc"] is True
    assert load_file(tmp_path / "csc" / "adapter.safetensors")["ctx"].shape == (len(NAMES), 4, 32)

    adapter = adapters.build({"name": "coop", "ctx_init": "a photo of a"})
    from federate.cache import load_cache

    adapter.prepare(load_cache(cache_file), config("federate", [f"model.name={tiny_model}"]).model)
    words = adapter.model.context_tokens("a photo of a")
    assert adapter.n_ctx == len(words)  # the words' tokens (this byte-level tokenizer: one per character)
    ctx = adapters.init_params(adapter, 32, 0, torch.zeros(len(NAMES), 32))["ctx"]
    assert torch.equal(ctx, adapter.model.encoder.token_embedding[torch.tensor(words)])
    summary = run(coop_cfg(cache_file, tiny_model, "adapter.ctx_init='a photo of a'", rounds=2), tmp_path / "init")
    assert summary["adapter"]["ctx_init"] == "a photo of a" and summary["adapter"]["n_ctx"] == len(words)


def test_grouped_coop_points_equal_their_runs_alone(cache_file, tiny_model, tmp_path):
    cfgs = [coop_cfg(cache_file, tiny_model, "lr=0.002", rounds=2),
            coop_cfg(cache_file, tiny_model, "lr=0.001", "seed=1", rounds=2)]
    assert len(sweep.groups(cfgs)) == 1
    grouped = [tmp_path / f"grouped{i}" for i in range(2)]
    sweep.train_group(cfgs, grouped)
    for i, cfg in enumerate(cfgs):
        alone = run(cfg, tmp_path / f"alone{i}")
        assert run(cfg, grouped[i])["generalization"] == alone["generalization"]
        for a, b in zip(history(tmp_path / f"alone{i}"), history(grouped[i])):
            assert a["val_acc"] == b["val_acc"]
            assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)


# --- refusals ------------------------------------------------------------------------------------------------

one_line = partial(planted_one_line, ConfigError)


def test_a_cache_of_other_weights_than_the_models_is_refused(tiny_model, tmp_path):
    """model=tiny_random: the folder extract built under <cache_dir>/models/ must hold the cache's weights."""
    from extract.model import build_tiny_clip

    models = tmp_path / "cache" / "models"
    build_tiny_clip(models / "fedclip--tiny-random-clip", seed=1, embed_dim=32, hidden_size=32, layers=2, heads=2,
                    image_size=32, patch_size=8)  # other weights, same shapes
    cache = coop_cache(tmp_path / "cache" / "planted" / "fedclip--tiny-random-clip.h5", tiny_model,
                       model_name="fedclip/tiny-random-clip")
    cfg = coop_cfg(cache, "fedclip/tiny-random-clip", "model=tiny_random", f"cache_dir={tmp_path / 'cache'}")
    one_line(lambda: run(cfg, tmp_path / "out"), "other weights", "model.name=fedclip/tiny-random-clip")
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("override, match", [
    ("adapter.n_ctx=0", "adapter.n_ctx must be >= 1"),
    ("adapter.n_ctx=abc", "adapter.n_ctx must be an integer, not 'abc'"),
    ("adapter.csc=maybe", "adapter.csc must be true or false, not 'maybe'"),
    ("adapter.momentum=fast", "adapter.momentum must be a number, not 'fast'"),
    ("adapter.optimizer=rmsprop", "adapter.optimizer must be adam or sgd"),
    ("text_adapter=true", "text_adapter=true needs adapter=attai"),
    ("engine=batched", "engine=generic"),
    ("adapter.n_ctx=80", "longer than the text encoder's 77 tokens"),
])
def test_bad_coop_settings_are_one_line(cache_file, tiny_model, tmp_path, override, match):
    one_line(lambda: run(coop_cfg(cache_file, tiny_model, override, rounds=1), tmp_path), match)


@pytest.mark.slow
def test_runs_without_coop_do_not_import_transformers(tmp_path):
    domains, text = planted({"a": 40, "b": 30, "target": 20}, dim=24)
    path = write_cache(tmp_path / "c.h5", domains, text)
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import run_federate; "
            f"run_federate({str(path)!r}, {str(tmp_path / 'out')!r}, rounds=1); "
            "print(sorted(m for m in ('transformers', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out


# --- the tiny random CLIP end to end: extract, then prompt learning ----------------------------------------

def test_coop_runs_on_a_cache_extracted_with_the_tiny_random_clip(tmp_path):
    from extract import pipeline

    root = draw_shapes(tmp_path / "shapes", per_class=4, seed=3)
    common = ["dataset=folder", f"dataset.root={root}", "model=tiny_random", f"cache_dir={tmp_path / 'cache'}"]
    pipeline.run(config("extract", [*common, "num_workers=0", "batch_size=8"]))
    summary = run(config("federate", [*common, "adapter=coop", "adapter.n_ctx=2", "target_domain=photo", "rounds=2"]),
                  tmp_path / "out")
    assert summary["adapter"]["name"] == "coop" and summary["participants"] == ["sketch"]
    assert summary["trainable_params"] == 2 * 64  # the context of the tiny model's text width (64)


@pytest.mark.slow
def test_promptfl_runs_in_flowers_simulation_engine_as_in_process(cache_file, tiny_model, tmp_path):
    pytest.importorskip("flwr", reason="needs Flower: pip install -e '.[flower]'")
    from conftest import run_cli

    overrides = [f"cache_file={cache_file}", f"model.name={tiny_model}", "target_domain=target", "adapter=coop",
                 "adapter.n_ctx=4", "rounds=2"]
    proc = run_cli("federate", "backend=flower", *overrides, f"hydra.run.dir={tmp_path}/sim", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    flower = json.loads((tmp_path / "sim" / "summary.json").read_text())
    local = run(config("federate", overrides), tmp_path / "local")
    assert flower["backend"] == "flower" and flower["adapter"] == local["adapter"]
    assert flower["best_round"] == local["best_round"] and flower["val_acc"] == pytest.approx(local["val_acc"], abs=1e-6)
    assert flower["generalization"] == pytest.approx(local["generalization"], abs=1e-6)
    assert flower["bytes_per_round"] == local["bytes_per_round"] and flower["trainable_params"] == 4 * 32


@pytest.mark.slow
def test_a_hub_model_missing_from_the_local_hub_cache_is_one_line(tiny_model, tmp_path, monkeypatch):
    """model.name is the hub id the cache records, but no copy of it is at hand (offline)."""
    from conftest import run_cli

    hub_id = "openai/clip-vit-base-patch32"
    cache = coop_cache(tmp_path / "hub.h5", tiny_model, model_name=hub_id)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    proc = run_cli("federate", f"cache_file={cache}", f"model.name={hub_id}", "adapter=coop", "target_domain=target",
                   f"hydra.run.dir={tmp_path}/out", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout, proc.stdout
    lines = [line for line in proc.stdout.splitlines() if f"adapter=coop runs the text encoder of model.name={hub_id}" in line]
    assert len(lines) == 1, proc.stdout
