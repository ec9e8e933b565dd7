"""What one round costs: FedCLIP on cached embeddings against `method=fedavg_full` (FedAvg fine-tuning the
whole CLIP ViT-B/32 on the images) and against the reference design that re-encodes every image with CLIP
each round. One run, one machine, everything measured in this process.

    python bench/cost_vs_full_finetune.py [--steps 3] [--device auto] [--threads N] [--json cost.json]

1. FedCLIP: `federate.run` for 10 rounds on a PACS-sized cache (target art_painting, 4,765 training rows),
   seconds per round (validation and model selection included);
2. fedavg_full: the runner's own code (federate/backbone: the DataLoader decoding real pacs-mini images,
   `local_update` with its fresh Adam, the server's running mean, batched evaluation) on CLIP ViT-B/32
   with random weights (`CLIPModel(CLIPConfig())`: the real model's cost). --steps training steps of 32
   images are timed and scaled to the round's 150 steps (one local epoch of 4,765 images on 3 clients),
   plus 3 x (load the global state + add to the running mean) and the validation of 1,587 images at the
   measured inference rate. Without pacs-mini it times random pixels;
3. the reference design: CLIP's image encoder over every image each round (PACS: 9,991), timed on a few
   batches and scaled.

It prints the measured speed ratio beside the parameter ratio (the paper's "283x" fewer parameters).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import PACS_SIZES, ROOT, pacs_sized_cache

PACS_MINI = ROOT.parent / "shared" / "datasets" / "pacs-mini"

TRAIN_ROWS = sum(int(0.6 * n) for d, n in PACS_SIZES.items() if d != "art_painting")  # 4,765
ALL_IMAGES = sum(PACS_SIZES.values())  # 9,991


def fedclip_round(tmp: Path, rounds: int = 10) -> tuple[float, dict]:
    import logging

    from hydra import compose, initialize_config_dir

    from federate.run import run

    logging.disable(logging.INFO)
    cache = pacs_sized_cache(tmp / "pacs_sized.h5")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("federate", [f"cache_file={cache}", "model.name=fedclip/planted",
                                   "target_domain=art_painting", f"rounds={rounds}"])
    run(cfg, tmp / "warmup")  # loads the cache once (shared by later runs in this process)
    t = time.perf_counter()
    summary = run(cfg, tmp / "fedclip")
    logging.disable(logging.NOTSET)
    return (time.perf_counter() - t) / rounds, summary


def fedavg_full_round(model, device, steps: int, batch: int = 32) -> dict:
    """Seconds of a PACS-sized fedavg_full round on `model` (CLIP ViT-B/32), from the runner's own pieces."""
    from extract.model import byte_level_tokenizer, image_processor_class
    from federate.backbone.build import clip_classifier
    from federate.backbone.data import Images, Loader
    from federate.backbone.train import RunningMean, accuracy, local_update
    from federate.engine import TrainSettings, batches_per_epoch

    classes = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    net = clip_classifier(model, byte_level_tokenizer(), ["a picture of a {}"], classes, "contrastive", False)
    net = net.to_device(device)
    workers = 1 if device.type == "cpu" else 8
    if PACS_MINI.is_dir():  # real images decoded in DataLoader workers, as the runner does
        from omegaconf import OmegaConf

        from extract.sources import load_source

        source = load_source(OmegaConf.create({"name": "pacs", "root": str(PACS_MINI), "hub_id": None,
                                               "domains": None, "classes": None, "prompt_names": None}))
        domains = source.domains
        loader = Loader(Images(domains, image_processor_class()()), [d.labels for d in domains],
                        [d.ids for d in domains], [d.name for d in domains], device, workers)
        keys = [(d, i) for d, dom in enumerate(domains) for i in range(len(dom))]

        def batches(n):
            return loader.batches([keys[(k * batch) % (len(keys) - batch):][:batch] for k in range(n)])
    else:
        def batches(n):
            return [(torch.randn(batch, 3, 224, 224, device=device),
                     torch.arange(batch, device=device) % 7) for _ in range(n)]
    settings = TrainSettings(lr=5e-5, batch_size=batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    global_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    local_update(net, batches(1), settings, device)  # warm-up: allocates Adam's state, starts the workers
    sync()
    t = time.perf_counter()
    local_update(net, batches(steps), settings, device)
    sync()
    step = (time.perf_counter() - t) / steps
    t = time.perf_counter()
    total = RunningMean(global_state)
    net.load_state_dict(global_state)
    total.add(net.state_dict(), 1 / 3)
    sync()
    server = time.perf_counter() - t
    accuracy(net, batches(1), device)
    sync()
    t = time.perf_counter()
    accuracy(net, batches(steps), device)
    sync()
    eval_image = (time.perf_counter() - t) / (steps * batch)
    train_rows = [int(0.6 * n) for d, n in PACS_SIZES.items() if d != "art_painting"]
    val_rows = sum(int(0.2 * n) for d, n in PACS_SIZES.items() if d != "art_painting")
    round_steps = sum(batches_per_epoch(n, batch) for n in train_rows)
    sent = sum(v.numel() * v.element_size() for v in global_state.values())
    return {"step": step, "steps": round_steps, "server_per_client": server, "eval_per_image": eval_image,
            "val_images": val_rows, "bytes_per_client": sent, "real_images": PACS_MINI.is_dir(),
            "seconds": round_steps * step + 3 * server + val_rows * eval_image}


@torch.inference_mode()
def encode_seconds_per_image(model, device, batches: int = 3, batch: int = 32) -> float:
    model.eval()
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    model.get_image_features(pixel_values=pixels)
    t = time.perf_counter()
    for _ in range(batches):
        model.get_image_features(pixel_values=pixels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / (batches * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", help="also write the figures here (python -m federate.report --cost reads it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tmp = Path(tempfile.mkdtemp(prefix="fedclip-bench-"))
    from transformers import CLIPConfig, CLIPModel

    fed_round, summary = fedclip_round(tmp)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig())
    clip_params = sum(p.numel() for p in model.parameters())
    full = fedavg_full_round(model, device, args.steps)
    model = model.to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        encode = encode_seconds_per_image(model, device) * ALL_IMAGES
    adapter = summary["trainable_params"]
    where = f"{torch.cuda.get_device_name()}" if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"PACS-sized setting, target art_painting: {TRAIN_ROWS:,} training images on 3 clients; FedCLIP on "
          f"the CPU, the rest on {where}")
    print(f"{'':40s}{'s / round':>12s}{'x FedCLIP':>11s}{'trainable':>14s}{'MB / round (up+down)':>22s}")
    rows = [("FedCLIP on cached embeddings", fed_round, adapter, 2 * 3 * 4 * adapter),
            ("fedavg_full, CLIP ViT-B/32 (1 epoch)", full["seconds"], clip_params, 2 * 3 * full["bytes_per_client"]),
            ("reference: re-encode every image", encode, adapter, 2 * 3 * 4 * adapter)]
    for name, seconds, params, sent in rows:
        print(f"{name:40s}{seconds:12.2f}{seconds / fed_round:11.0f}{params:14,d}{sent / 1e6:22.1f}")
    print(f"measured speed ratio fedavg_full / FedCLIP: {full['seconds'] / fed_round:,.0f}x; parameter ratio "
          f"{clip_params / adapter:.0f}x (the paper: 283x)")
    print(f"(fedavg_full: {full['step']:.2f} s per training step of 32 {'pacs-mini' if full['real_images'] else 'random'} "
          f"images x {full['steps']} steps, {full['server_per_client']:.2f} s per client to load and average the "
          f"state, {1000 * full['eval_per_image']:.1f} ms per validation image x {full['val_images']:,}; "
          f"re-encoding: {ALL_IMAGES:,} images)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "fedclip_seconds_per_round": fed_round, "fedavg_full_clip_seconds_per_round": full["seconds"],
            "reencode_seconds_per_round": encode, "fedclip_trainable_params": adapter,
            "full_clip_trainable_params": clip_params, "fedavg_full_clip": full, "device": str(device)}, indent=2))


if __name__ == "__main__":
    main()
