"""What one round costs: FedCLIP on cached embeddings against fine-tuning the whole CLIP (FedAvg) and against
the reference design that re-encodes every image with CLIP each round. One run, one machine.

    python bench/cost_vs_full_finetune.py [--steps 3] [--json cost.json]

1. FedCLIP: `federate.run` for 10 rounds on a PACS-sized cache (target art_painting, 4,765 training rows),
   seconds per round (validation and model selection included);
2. FedAvg on the whole CLIP ViT-B/32 (random weights: same cost): forward + backward + Adam on batches of 32
   images and their prompts, timed over --steps steps and scaled to one local epoch over 4,765 images;
3. the reference design: CLIP's image encoder over every image each round (PACS: 9,991), timed on a few
   batches and scaled.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from common import PACS_SIZES, ROOT, pacs_sized_cache

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


def full_clip_step_seconds(model, steps: int, batch: int = 32) -> float:
    from extract.model import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    classes = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    tokens = tokenizer([f"a picture of a {classes[i % 7]}" for i in range(batch)], padding=True, return_tensors="pt")
    pixels = torch.randn(batch, 3, 224, 224)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)

    def step():
        loss = model(pixel_values=pixels, return_loss=True, **tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up (allocates Adam state)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


@torch.inference_mode()
def encode_seconds_per_image(model, batches: int = 3, batch: int = 32) -> float:
    model.eval()
    pixels = torch.randn(batch, 3, 224, 224)
    model.get_image_features(pixel_values=pixels)
    t = time.perf_counter()
    for _ in range(batches):
        model.get_image_features(pixel_values=pixels)
    return (time.perf_counter() - t) / (batches * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here (python -m federate.report --cost reads it)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedclip-bench-"))
    from transformers import CLIPConfig, CLIPModel

    fed_round, summary = fedclip_round(tmp)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig())
    clip_params = sum(p.numel() for p in model.parameters())
    encode = encode_seconds_per_image(model) * ALL_IMAGES
    step = full_clip_step_seconds(model, args.steps)
    full_round = step * math.ceil(TRAIN_ROWS / 32)
    adapter = summary["trainable_params"]
    print(f"PACS-sized setting, target art_painting: {TRAIN_ROWS:,} training images on 3 clients, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'':38s}{'s / round':>12s}{'x FedCLIP':>11s}{'trainable':>14s}{'MB / round (up+down)':>22s}")
    rows = [("FedCLIP on cached embeddings", fed_round, adapter),
            ("FedAvg, full CLIP ViT-B/32 (1 epoch)", full_round, clip_params),
            ("reference: re-encode every image", encode, adapter)]
    for name, seconds, params in rows:
        print(f"{name:38s}{seconds:12.2f}{seconds / fed_round:11.0f}{params:14,d}{2 * 3 * 4 * params / 1e6:22.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "fedclip_seconds_per_round": fed_round, "fedavg_full_clip_seconds_per_round": full_round,
            "reencode_seconds_per_round": encode, "fedclip_trainable_params": adapter,
            "full_clip_trainable_params": clip_params}, indent=2))
    print(f"(full CLIP: {step:.2f} s per training step of 32 images, scaled to {math.ceil(TRAIN_ROWS / 32)} steps; "
          f"re-encoding: {ALL_IMAGES:,} images; parameter ratio {clip_params / adapter:.0f}x)")


if __name__ == "__main__":
    main()
