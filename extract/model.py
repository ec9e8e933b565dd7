"""Loading CLIP through transformers (hub id or local directory) and computing its projected embeddings."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .errors import ExtractError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ExtractError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    if name not in ("cpu", "cuda"):
        raise ExtractError(f"device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


def byte_level_tokenizer():
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (plus end-of-word forms): no merges."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_tiny_clip(directory: Path, seed: int, embed_dim: int, hidden_size: int, layers: int, heads: int,
                    image_size: int, patch_size: int) -> None:
    """Save a small randomly initialised CLIP (weights, tokenizer, image processor) with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = byte_level_tokenizer()
    common = dict(hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=layers,
                  num_attention_heads=heads)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **common),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **common),
        projection_dim=embed_dim, logit_scale_init_value=math.log(100.0))  # pretrained CLIP's scale
    torch.manual_seed(seed)
    model = CLIPModel(config)
    tmp = directory.with_name(directory.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor_class()(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(tmp)
    tmp.replace(directory)


def model_directory(model_cfg, cache_dir: str) -> str:
    """What from_pretrained loads: the hub id / local directory, or the built tiny model's directory."""
    if not model_cfg.get("build"):
        return model_cfg.name
    directory = Path(cache_dir) / "models" / model_cfg.name.replace("/", "--")
    if not directory.exists():
        log.info("building %s in %s", model_cfg.name, directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_clip(directory, **model_cfg.build)
    return str(directory)


def image_processor_class():
    """CLIP's image processor: the torchvision backend when present, else the PIL one (same preprocessing).
    Naming transformers.CLIPImageProcessor without torchvision already logs a fallback warning."""
    import transformers

    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or broken beside this torch build
        pil = getattr(transformers, "CLIPImageProcessorPil", None)
        if pil is not None:
            return pil
    return transformers.CLIPImageProcessor


def load_clip(model_cfg, cache_dir: str, device: torch.device):
    """Return (model, image_processor, tokenizer); safetensors weights only, no remote code."""
    from transformers import AutoTokenizer, CLIPModel

    source = model_directory(model_cfg, cache_dir)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    kwargs = dict(revision=model_cfg.get("revision") or None)
    try:
        model = CLIPModel.from_pretrained(source, use_safetensors=True, dtype=dtype, **kwargs)
        processor = image_processor_class().from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        first = (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__).rstrip(".")
        raise ExtractError(
            f"cannot load CLIP model {source!r}: {first}. Without hub access, pass a local directory "
            f"saved with save_pretrained: model.name=/path/to/clip-vit-base-patch32") from None
    return model.to(device).eval(), processor, tokenizer


def _projected(output) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.inference_mode()
def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    pixel_values = pixel_values.to(model.device, model.dtype, non_blocking=True)
    return _projected(model.get_image_features(pixel_values=pixel_values)).float().cpu()


@torch.inference_mode()
def text_embeddings(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(model.device)
    return _projected(model.get_text_features(**tokens)).float().cpu()


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def model_revision(model) -> str:
    return str(getattr(model.config, "_commit_hash", None) or "local")
