"""Loading CLIP through transformers (hub id or local directory) and computing its projected embeddings."""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ExtractError, os_errors
from .files import UnsafePath, own_folder
from .identity import model_fingerprint

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ExtractError("device=cuda but no CUDA device is available; use device=auto or device=cpu")
    if name not in ("cpu", "cuda"):
        raise ExtractError(f"device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


@contextmanager
def no_transformers_progress_bars():
    """transformers' own bars ("Writing model shards", "Loading weights") say nothing about the extraction;
    extract's per-domain bars stay."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


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
    if tmp.is_symlink():  # save_pretrained would write through it
        raise UnsafePath(f"{tmp} is a symbolic link; fedclip builds the model only in a real folder: remove the link")
    with no_transformers_progress_bars():
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    image_processor_class()(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(tmp)
    tmp.replace(directory)


@dataclass(frozen=True)
class ResolvedModel:
    """Which CLIP a run uses: `name` is what the cache records (hub id, config name of a built model, or a
    local folder's base name), `directory` the local folder that is fingerprinted and loaded."""
    name: str
    directory: Path
    fingerprint: str
    source: str  # "hub", "local" or "built"
    revision: str  # the hub snapshot's commit, or "local"


HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt"]  # weights, configs, tokenizer (vocab.json, merges.txt)
LOCAL_HINT = "pass a local folder saved with save_pretrained: model.name=/path/to/clip-vit-base-patch32"


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", "\\")) or name in (".", "..") or name.count("/") > 1
            or (len(name) > 1 and name[1] == ":"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__).rstrip(".")


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local snapshot folder of a hub model (downloaded if needed; offline it comes from the HF cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline without a cached copy, unknown repo, auth, network: many kinds
        raise ExtractError(f"cannot get CLIP model {repo_id!r} from the hub or its local cache "
                           f"({type(e).__name__}: {_first_line(e)}); no local folder has that name either. "
                           f"Without hub access, {LOCAL_HINT}") from None


def resolve_model(model_cfg, cache_dir: str) -> ResolvedModel:
    """Find the model's folder (building the tiny model, or getting a hub snapshot) and fingerprint it."""
    name = str(model_cfg.name)
    if model_cfg.get("build"):
        directory = Path(cache_dir) / "models" / name.replace("/", "--")
        if not directory.exists():
            log.info("building %s in %s", name, directory)
            with os_errors(f"build the tiny model in {directory}"):
                own_folder(directory.parent)  # a linked folder is refused
                build_tiny_clip(directory, **model_cfg.build)
        source, revision = "built", "local"
    else:
        p = Path(name).expanduser()
        if p.is_dir():
            directory, source, revision = p.resolve(), "local", "local"
            name = directory.name
        elif p.exists():
            raise ExtractError(f"model.name {name} is a file, not a folder; {LOCAL_HINT}")
        elif _looks_like_path(name):
            raise ExtractError(f"model folder {name} does not exist; {LOCAL_HINT}, or a hub id")
        else:
            directory, source = hub_snapshot(name, model_cfg.get("revision") or None), "hub"
            revision = directory.name
    check_model_files(directory)
    try:
        fingerprint = model_fingerprint(directory)
    except OSError as e:
        raise ExtractError(f"cannot read the model files in {directory}: {e}") from None
    return ResolvedModel(name, directory, fingerprint, source, revision)


def check_model_files(directory: Path) -> None:
    """What from_pretrained would otherwise paper over: no weights, no tokenizer, no processor config."""
    names = {p.name for p in directory.iterdir() if p.is_file()}
    if not any(n.endswith(".safetensors") for n in names):
        raise ExtractError(f"no safetensors weights in model folder {directory} (fedclip loads *.safetensors "
                           "only); save the model with save_pretrained")
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise ExtractError(f"the tokenizer files are missing in model folder {directory} (need tokenizer.json, "
                           "or vocab.json and merges.txt); save the tokenizer there with save_pretrained")
    if "preprocessor_config.json" not in names and "processor_config.json" not in names:
        raise ExtractError(f"preprocessor_config.json is missing in model folder {directory}; save the "
                           "image processor there with save_pretrained")


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


def model_dtype(device: torch.device) -> torch.dtype:
    """CLIP runs in float16 on CUDA (as OpenAI's clip package does) and in float32 on a CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_clip(model, device, legacy_device=None):
    """Return (model, image_processor, tokenizer) from the resolved folder; safetensors only, no remote code.
    A checkpoint that lacks tensors, a damaged weights file or an unusable tokenizer is an error.
    `load_clip(model_cfg, cache_dir, device)` (the earlier signature) resolves the model first."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    if not isinstance(model, ResolvedModel):
        model, device = resolve_model(model, device), legacy_device

    directory = str(model.directory)
    dtype = model_dtype(device)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report's table: we turn its findings into one line below
    try:
        with no_transformers_progress_bars():
            clip, info = CLIPModel.from_pretrained(directory, use_safetensors=True, dtype=dtype,
                                                   output_loading_info=True)
    except Exception as e:  # safetensors raises SafetensorError (an Exception) for a damaged file
        raise ExtractError(f"cannot load the weights of CLIP model {model.name!r} from {directory} "
                           f"({type(e).__name__}: {_first_line(e)}); the weights file is damaged or not a CLIP "
                           "checkpoint: copy it again, or re-save the model with save_pretrained") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                                                              for k in info.get("mismatched_keys") or [])
    if missing:
        raise ExtractError(f"the checkpoint in {directory} lacks {len(missing)} of the CLIP model's tensors "
                           f"(e.g. {missing[0]}), which would be randomly initialised; use a complete "
                           "checkpoint saved with save_pretrained")
    try:
        processor = image_processor_class().from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise ExtractError(f"cannot load the tokenizer or image processor of {directory} "
                           f"({type(e).__name__}: {_first_line(e)}); re-save them with save_pretrained") from None
    return clip.to(device).eval(), processor, tokenizer


def check_tokenizer(tokenizer, prompts: list[str], directory) -> None:
    """Different prompts must become different tokens (an empty vocabulary maps all of them to one)."""
    ids = tokenizer(prompts, padding=True, truncation=True)["input_ids"]
    seen: dict[tuple, str] = {}
    for prompt, tokens in zip(prompts, ids):
        other = seen.setdefault(tuple(tokens), prompt)
        if other != prompt:
            raise ExtractError(f"the tokenizer of {directory} turns the different prompts {other!r} and {prompt!r} "
                               f"into the same tokens (vocabulary of {len(tokenizer)}): its tokenizer files are "
                               "incomplete; re-save the tokenizer with save_pretrained")


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


