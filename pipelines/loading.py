"""Loading diffusion models from a local directory or the Hugging Face cache, offline.

The server never downloads weights: a model is a local diffusers directory, or a Hugging Face repo id
that is already in the local cache (`hf download` it beforehand on a machine that can).
With no model configured the project's own trained toy model (its weights ship in the package) is loaded
through exactly the same `from_pretrained` path.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

from .adapters import LoraAdapters
from .backends import Backend, eager_backend
from .controls import ControlNets
from .depth import DepthEstimator
from .super_resolution import Upscalers
from .devices import DevicePlacement, choose_placement
from .errors import ModelLoadError, ModelNotFound
from .tiny import TAESD_SUBDIR, stream_defaults, tiny_model_kind
from .toy_model import ensure_toy_model

logger = logging.getLogger(__name__)

TINY_VAE_AUTO = "auto"
TINY_VAE_NONE = "none"


@dataclass(frozen=True)
class ModelSpec:
    """What to load. `model=None` means the project's trained toy model (shipped weights; see `ensure_toy_model`)."""

    model: str | None = None
    tiny_vae: str = TINY_VAE_AUTO
    lora: str | None = None
    """A LoRA fused into the UNet for good (e.g. an LCM-LoRA): every frame uses it."""
    adapters: tuple[tuple[str, str], ...] = ()
    """Named LoRAs (name, path or repo id) loaded as adapters that each session turns on and weighs."""
    controlnets: tuple[tuple[str, str], ...] = ()
    """Named ControlNets (name, path or repo id), shared by every session that asks for one."""
    depth_model: str | None = None
    """A depth-estimation network (path or repo id) for the `depth` control preprocessor."""
    upscalers: tuple[tuple[str, str], ...] = ()
    """Named super-resolution networks (name, path or repo id) for upscale jobs."""
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class LoadedModel:
    """Shared, read-only weights. Per-session state lives in `pipelines.stream.StreamPipeline`."""

    pipe: StableDiffusionPipeline
    placement: DevicePlacement
    name: str
    path: Path
    vae_kind: str
    toy_model: str | None = None
    """"trained" or "untrained" for the project's own tiny models (no real weights), None for real ones."""
    lora: str | None = None
    full_vae: torch.nn.Module | None = None
    """The model's own AutoencoderKL, kept when `pipe.vae` is a TAESD: full-quality batch renders decode
    with it while live frames use the fast one."""
    stream_defaults: dict[str, object] = field(default_factory=dict)
    """Stream parameters this model works best with, where they differ from StreamParams' defaults (a
    session's hello still overrides them)."""
    backend: Backend = field(default_factory=eager_backend)
    """What runs the live stream's UNet and VAE (`pipelines.backends.prepare_backend` sets it)."""
    architecture: str = "sd"
    """"sd" (SD 1.x/2.x, sd-turbo) or "sdxl" (SDXL, SDXL-turbo: two text encoders, added conditioning)."""
    adapters: LoraAdapters = field(default_factory=lambda: LoraAdapters(None, {}))
    controlnets: ControlNets = field(default_factory=ControlNets)
    depth: DepthEstimator | None = None
    """The depth network of the `depth` preprocessor, if one was given."""
    upscalers: Upscalers = field(default_factory=Upscalers)
    """Super-resolution networks that upscale jobs name (`--upscaler NAME=PATH`)."""
    prompt_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """Held while a prompt is encoded. The tokenizer keeps its padding and truncation settings on the
    shared object, and diffusers' encode_prompt tokenizes twice with different settings (to warn about
    truncation): two threads encoding at once could get a prompt padded to its own length instead of
    77 tokens, which the UNet accepts silently and renders differently."""

    @property
    def quality_vae(self) -> torch.nn.Module:
        return self.full_vae if self.full_vae is not None else self.pipe.vae

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "path": str(self.path),
            "vae": self.vae_kind,
            "lora": self.lora,
            "loras": self.adapters.describe(),
            "controlnets": self.controlnets.describe(),
            "depth_model": self.depth.describe() if self.depth is not None else None,
            "upscalers": self.upscalers.describe(),
            "architecture": self.architecture,
            "device": str(self.placement.device),
            "dtype": str(self.placement.dtype).removeprefix("torch."),
            "test_model": self.is_test_model,
            "toy_model": self.toy_model,
        }

    @property
    def is_test_model(self) -> bool:
        return self.toy_model is not None


def resolve_model_path(name: str, what: str = "model") -> Path:
    """A local directory as it is, or a repo id looked up in the local Hugging Face cache only."""
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotFound(f"{what} {name!r} is a file; expected a diffusers model directory")
        return local.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFound(
            f"{what} {name!r}: no such directory, and it is not a Hugging Face repo id (owner/name)"
        )
    try:
        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError) as error:
        raise ModelNotFound(
            f"{what} {name!r} is not a local directory and is not in the Hugging Face cache at "
            f"{hub_constants.HF_HUB_CACHE} (looked up offline; this server never downloads weights). "
            f"Download it on a machine with access (`hf download {name}`) and copy the "
            f"cache, or pass the path of a diffusers directory. ({type(error).__name__})"
        ) from None


def pipeline_architecture(path: Path) -> str:
    """"sdxl" for a StableDiffusionXLPipeline directory, else "sd" (from its model_index.json)."""
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}/model_index.json cannot be read: {error}") from None
    name = index.get("_class_name", "") if isinstance(index, dict) else ""
    return "sdxl" if isinstance(name, str) and name.startswith("StableDiffusionXL") else "sd"


def text_encoders(pipe: object) -> list[torch.nn.Module]:
    """The pipeline's text encoders: one for SD, two for SDXL."""
    return [encoder for encoder in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if encoder is not None]


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load the pipeline's components onto the chosen device. Raises ModelNotFound / ModelLoadError."""
    placement = choose_placement(spec.device, spec.dtype)
    if spec.model is None:
        path = ensure_toy_model()
        name = "streamcanvas trained toy model"
    else:
        path = resolve_model_path(spec.model)
        name = spec.model
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"{path} has no model_index.json: it is not a diffusers pipeline directory "
            "(single-file .safetensors checkpoints must be converted with diffusers first)"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    architecture = pipeline_architecture(path)
    try:
        if architecture == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=placement.dtype, local_files_only=True)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                path,
                dtype=placement.dtype,
                local_files_only=True,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as error:
        raise ModelLoadError(f"could not load a Stable Diffusion pipeline from {path}: {error}") from error

    vae_kind = "AutoencoderKL"
    tiny_vae_path: Path | None = None
    if spec.tiny_vae == TINY_VAE_AUTO:
        if (path / TAESD_SUBDIR / "config.json").is_file():
            tiny_vae_path = path / TAESD_SUBDIR
    elif spec.tiny_vae != TINY_VAE_NONE:
        tiny_vae_path = resolve_model_path(spec.tiny_vae, what="tiny VAE")
    full_vae = None
    if tiny_vae_path is not None:
        full_vae = pipe.vae
        try:
            pipe.vae = AutoencoderTiny.from_pretrained(
                tiny_vae_path, dtype=placement.dtype, local_files_only=True
            )
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadError(f"could not load an AutoencoderTiny from {tiny_vae_path}: {error}") from error
        vae_kind = f"AutoencoderTiny ({tiny_vae_path.name})"

    if spec.lora is not None:
        lora_path = resolve_model_path(spec.lora, what="LoRA")
        try:
            pipe.load_lora_weights(str(lora_path), local_files_only=True)
            pipe.fuse_lora()
            # The weights keep it; its adapter layers go, so that the named adapters loaded next (which
            # are switched on and off per call) can never unmerge it.
            pipe.unload_lora_weights()
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelLoadError(f"could not load the LoRA from {lora_path}: {error}") from error

    pipe = pipe.to(placement.device)
    pipe.set_progress_bar_config(disable=True)
    adapters = LoraAdapters(pipe, {name: resolve_model_path(where, what=f"LoRA {name!r}") for name, where in spec.adapters})
    controlnets = ControlNets.load(
        {name: resolve_model_path(where, what=f"ControlNet {name!r}") for name, where in spec.controlnets},
        placement.device,
        placement.dtype,
    )
    depth = None
    if spec.depth_model is not None:
        depth = DepthEstimator(resolve_model_path(spec.depth_model, what="depth model"), placement.device, placement.dtype)
    upscalers = Upscalers.load(
        {name: resolve_model_path(where, what=f"upscaler {name!r}") for name, where in spec.upscalers}, placement.device, placement.dtype
    )
    vaes = [pipe.vae] if full_vae is None else [pipe.vae, full_vae.to(placement.device)]
    for module in (pipe.unet, *vaes, *text_encoders(pipe)):
        module.eval()
        module.requires_grad_(False)
    # NHWC weights: measured 1.3x faster frames on this CPU (tiny model, 256²), and the layout
    # cuDNN's fp16 convolutions prefer on GPUs.
    for module in (pipe.unet, *vaes):
        module.to(memory_format=torch.channels_last)
    logger.info("loaded %s from %s on %s (vae: %s)", name, path, placement.description, vae_kind)
    return LoadedModel(
        pipe=pipe,
        placement=placement,
        name=name,
        path=path,
        vae_kind=vae_kind,
        toy_model=tiny_model_kind(path),
        stream_defaults=stream_defaults(path),
        lora=spec.lora,
        full_vae=full_vae,
        adapters=adapters,
        controlnets=controlnets,
        depth=depth,
        upscalers=upscalers,
        architecture=architecture,
    )


def inference_threads(requested: int | None) -> int:
    """Set torch's intra-op thread count (all cores by default) and return it."""
    if requested is not None:
        torch.set_num_threads(requested)
    return torch.get_num_threads()
