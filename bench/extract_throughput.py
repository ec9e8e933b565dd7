"""Extraction throughput of the ViT-B/32 architecture (random weights: the real model's cost) on real images.

    python bench/extract_throughput.py [--images DIR] [--batch-size 32] [--num-workers 1]

Reports, in one run:
1. model-only images/s: the image encoder on pre-decoded, preprocessed tensors (same batch size);
2. end-to-end images/s: the real pipeline (DataLoader workers decoding + preprocessing, model, HDF5 writes),
   timed over the streaming phase (model loading excluded), and its ratio to 1;
3. peak RSS of a whole extraction over N and 10 N images (tiny model: the streaming is what is measured).
Images: ../shared/datasets/pacs-mini when present, else generated 227x227 JPEGs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

PACS_MINI = ROOT.parent / "shared" / "datasets" / "pacs-mini"


def image_folder(tmp: Path, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    if PACS_MINI.exists():
        return PACS_MINI
    from extract.demo import draw
    import random

    rng, root = random.Random(0), tmp / "generated"
    for d in ("photo", "sketch"):
        for c in ("circle", "square", "triangle", "star"):
            (root / d / c).mkdir(parents=True)
            for i in range(35):
                draw(c, d, 227, rng).save(root / d / c / f"{i}.jpg", quality=90)
    return root


def replicate(src: Path, dst: Path, times: int) -> Path:
    for k in range(times):
        for f in src.rglob("*"):
            if f.is_file() and not f.name.startswith("."):
                target = dst / f.relative_to(src).parent / f"{k}_{f.name}"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, target)
    return dst


def save_vit_b32(directory: Path) -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel

    from extract.model import byte_level_tokenizer, image_processor_class

    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    image_processor_class()().save_pretrained(directory)  # CLIP's defaults: 224, bicubic, CLIP mean/std


def rss_of_extraction(root: Path, cache_dir: Path) -> list[float]:
    code = ("import sys, json; sys.path.insert(0, 'bench'); from common import peak_rss_mb;"
            "from hydra import compose, initialize_config_dir; from extract.pipeline import run;\n"
            "with initialize_config_dir(config_dir=sys.argv[1], version_base='1.3'):\n"
            "    cfg = compose('extract', ['dataset=folder', 'dataset.root=' + sys.argv[2], 'model=tiny_random',"
            " 'cache_dir=' + sys.argv[3]])\n"
            "run(cfg); print(json.dumps(peak_rss_mb()))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "conf"), str(root), str(cache_dir)], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedclip-bench-"))
    root = image_folder(tmp, args.images)
    model_dir = tmp / "vit-b32-random"
    save_vit_b32(model_dir)

    import torch
    from hydra import compose, initialize_config_dir

    from extract import pipeline
    from extract.model import image_embeddings, load_clip
    from extract.sources import folder_source

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("extract", ["dataset=folder", f"dataset.root={root}", f"model.name={model_dir}",
                                  f"cache_dir={tmp / 'cache'}", f"batch_size={args.batch_size}",
                                  f"num_workers={args.num_workers}"])

    # 1. model only, on pre-decoded tensors
    model, processor, _ = load_clip(cfg.model, cfg.cache_dir, torch.device("cpu"))
    source = folder_source(cfg.dataset)
    pixels = torch.stack([processor(images=d.open(i), return_tensors="pt")["pixel_values"][0]
                          for d in source.domains for i in range(len(d))])
    n = len(pixels)
    image_embeddings(model, pixels[:args.batch_size])  # warm-up
    t = time.perf_counter()
    for s in range(0, n, args.batch_size):
        image_embeddings(model, pixels[s:s + args.batch_size])
    model_only = n / (time.perf_counter() - t)
    del model, pixels

    # 2. end to end, streaming phase
    streaming = {"seconds": 0.0}
    encode = pipeline.encode_domain

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return encode(*a, **k)
        finally:
            streaming["seconds"] += time.perf_counter() - t0

    pipeline.encode_domain = timed
    t = time.perf_counter()
    pipeline.run(cfg)
    total = time.perf_counter() - t
    end_to_end = n / streaming["seconds"]

    # 3. memory: N and 10 N images through a whole extraction (tiny model)
    rss_1 = rss_of_extraction(root, tmp / "rss1")
    rss_10 = rss_of_extraction(replicate(root, tmp / "x10", 10), tmp / "rss10")

    print(f"{n} images from {root}, ViT-B/32 architecture (random weights), fp32, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, num_workers={args.num_workers}")
    print(f"model only (pre-decoded tensors): {model_only:.2f} img/s")
    print(f"end to end (decode + preprocess + model + HDF5): {end_to_end:.2f} img/s  ->  "
          f"{end_to_end / model_only:.2f} of model-only  (whole run incl. model load: {total:.1f} s)")
    print(f"peak RSS of a whole extraction (tiny model), main process / largest worker: {n} images "
          f"{rss_1[0]:.0f} / {rss_1[1]:.0f} MB, {10 * n} images {rss_10[0]:.0f} / {rss_10[1]:.0f} MB  ->  "
          f"ratio {rss_10[0] / rss_1[0]:.2f} / {rss_10[1] / rss_1[1]:.2f}")
    print(json.dumps({"model_only_img_s": model_only, "end_to_end_img_s": end_to_end,
                      "ratio": end_to_end / model_only, "rss_mb": [rss_1, rss_10]}))


if __name__ == "__main__":
    main()
