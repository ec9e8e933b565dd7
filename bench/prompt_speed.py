"""What one PromptFL (CoOp) training step costs on fedclip's cache against the usual way, in one run.

    python bench/prompt_speed.py [--repeats 3] [--threads N] [--device auto] [--json prompt_speed.json]

(On a shared, loaded CPU, --threads 1 avoids the stalls of oversubscribed threads in both ways.)

Both ways train CoOp's 16 context vectors (CLIP ViT-B/32's real geometry, random weights:
`CLIPModel(CLIPConfig())`) for one step of 32 images with cross-entropy over the classes and Adam:

- cached (fedclip, `adapter=coop`): the 32 image embeddings come from the cache; the text side is the
  built prompt trainer (federate/prompt_trainer.py): prompts truncated after the last EOS, the start
  token and context run once, each class's name tokens attend to them, backward to the context;
- re-encoding (the usual implementation): CLIP's image encoder on the 32 preprocessed 224 x 224 images
  (frozen: no gradient), and the text transformer on the full 77-token prompts of every class, backward
  to the context.

It times a PACS-like class set (7 classes) and an Office-Home-like one (65 classes: Office-Home's names).
The tokenizer is the project's byte-level CLIP tokenizer (one token per character): class names take more
tokens than with CLIP's BPE vocabulary, which makes the cached way's prompts longer than with the real
tokenizer (its cost is overstated, the re-encoding way's 77 tokens are the same). Times are medians over
--repeats steps after one warm-up step. The last line is the 7-class figure.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT  # noqa: F401  (puts the project on the path)

log = logging.getLogger("prompt_speed")

PACS = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
OFFICE_HOME = [
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator", "Calendar", "Candles",
    "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp", "Drill", "Eraser", "Exit_Sign", "Fan",
    "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard",
    "Knives", "Lamp_Shade", "Laptop", "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan",
    "Paper_Clip", "Pen", "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler",
    "Scissors", "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table", "Telephone",
    "ToothBrush", "Toys", "Trash_Can", "Webcam"]
BATCH, N_CTX = 32, 16


def vit_b32():
    """CLIP ViT-B/32's architecture with random weights, and the byte-level tokenizer (its special ids set)."""
    from transformers import CLIPConfig, CLIPModel

    from extract.model import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(text_config={"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                     "pad_token_id": tokenizer.pad_token_id})
    return CLIPModel(config).eval(), tokenizer


def median_seconds(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cached_step(clip, tokenizer, names: list[str], device):
    """One step of the built prompt trainer on 32 cached embeddings (one client)."""
    from federate.adapters.coop import CoOp
    from federate.engine import ClientSets, TrainSettings, client_generator, engine_class
    from federate.text_encoder import PromptModel, encoder_from

    encoder = encoder_from(clip.state_dict(), clip.config.text_config, "CLIPModel(CLIPConfig())").to(device)
    adapter = CoOp(n_ctx=N_CTX)
    adapter.attach(PromptModel(encoder, tokenizer, Path("memory")), [n.replace("_", " ").lower() for n in names])
    x = torch.randn(BATCH, clip.config.projection_dim, device=device)
    y = torch.randint(0, len(names), (BATCH,), device=device)
    trainer = engine_class(adapter.engine)(adapter, ClientSets.of_tensors([x], [y]), torch.zeros(len(names), x.shape[1], device=device),
                              100.0, TrainSettings(lr=0.002, loss="ce"))
    state = {"ctx": (torch.randn(1, N_CTX, encoder.width) * 0.02).to(device)}
    generator = client_generator(0, "bench", 1)
    return lambda: trainer.train(state, 1, [generator]), adapter.prompts.ids.shape[1]


def reencoding_step(clip, tokenizer, names: list[str], device):
    """One step the usual way: the image encoder on 32 preprocessed images, the text transformer on the
    77-token prompts of every class (CoOp's TextEncoder), cross-entropy, backward to the context, Adam."""
    from federate.text_encoder import encoder_from

    encoder = encoder_from(clip.state_dict(), clip.config.text_config, "CLIPModel(CLIPConfig())").to(device)
    clip = clip.to(device)
    prompts = [" ".join(["X"] * N_CTX + [n.replace("_", " ").lower()]) + "." for n in names]
    ids = torch.tensor(tokenizer(prompts, padding="max_length", max_length=77)["input_ids"], device=device)
    eos = (ids == encoder.eos_token_id).int().argmax(-1)
    with torch.no_grad():
        embeds = encoder.token_embedding[ids]
    start, suffix = embeds[:, :1], embeds[:, 1 + N_CTX:]
    ctx = (torch.randn(N_CTX, encoder.width) * 0.02).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([ctx], lr=0.002, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    size = clip.config.vision_config.image_size
    pixels = torch.randn(BATCH, 3, size, size, device=device)
    y = torch.randint(0, len(names), (BATCH,), device=device)
    scale = clip.logit_scale.exp().item()

    def step():
        with torch.no_grad():  # the frozen image encoder, on every step
            image = clip.get_image_features(pixel_values=pixels)
            image = image if isinstance(image, torch.Tensor) else image.pooler_output
        tokens = torch.cat([start, ctx.expand(len(names), -1, -1), suffix], dim=1)  # [C, 77, w]
        text = F.normalize(encoder.forward(tokens, eos), dim=-1)
        loss = F.cross_entropy(scale * F.normalize(image, dim=-1) @ text.T, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as federate's runner does (denormals are 10x slower on a CPU)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    clip, tokenizer = vit_b32()
    results = {}
    for label, names in (("office_home_like", OFFICE_HOME), ("pacs_like", PACS)):
        step, length = cached_step(clip, tokenizer, names, device)
        cached = median_seconds(step, args.repeats)
        reencoding = median_seconds(reencoding_step(clip, tokenizer, names, device), args.repeats)
        results[label] = {"classes": len(names), "cached_s": cached, "reencoding_s": reencoding,
                          "ratio": reencoding / cached, "cached_prompt_tokens": length}
        log.info("%s (%d classes): cached %.4f s (prompts of %d tokens, %d shared), re-encoding %.4f s, ratio %.1fx",
                 label, len(names), cached, length, 1 + N_CTX, reencoding, reencoding / cached)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(), **results}, indent=2))
    r = results["pacs_like"]
    log.info("promptfl step: cached %.4f s, re-encoding %.4f s, ratio %.1f", r["cached_s"], r["reencoding_s"], r["ratio"])


if __name__ == "__main__":
    main()
