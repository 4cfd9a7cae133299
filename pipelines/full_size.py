"""Untrained models with the real architecture and size of Stable Diffusion 1.5 and sd-turbo.

The machines that run the benchmarks cannot download weights, yet a benchmark must pay what a real
frame costs. These models have the exact configuration of the published ones (UNet, AutoencoderKL,
CLIP text encoder, and a TAESD-shaped AutoencoderTiny in `taesd/`) and therefore their parameter
counts and their cost per frame, but random weights: their frames are deterministic noise, not pictures.

The configurations follow the published `config.json` files of `runwayml/stable-diffusion-v1-5` and
`stabilityai/sd-turbo` (sd-turbo is Stable Diffusion 2.1's architecture: OpenCLIP ViT-H/14 text encoder,
1024-wide cross-attention, linear attention projections), and diffusers' `AutoencoderTiny` defaults,
which are `madebyollin/taesd`'s. No real BPE vocabulary is available offline, so the tokenizer is the
tiny model's small one; the text encoder still has the real 49408-row embedding table (rows past the
small vocabulary are never looked up).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal, get_args

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .tiny import TAESD_SUBDIR, build_tokenizer_files, save_tiny_vae

FullSizeArchitecture = Literal["sd15", "sd-turbo"]
ARCHITECTURES: tuple[FullSizeArchitecture, ...] = get_args(FullSizeArchitecture)

FULL_SIZE_MARKER = "streamcanvas_full_size_model.json"
"""Written last into a full-size model directory: {"architecture", "seed", "dtype"}."""

CLIP_VOCAB_SIZE = 49408
"""Rows of the real CLIP token embedding (SD 1.5's and sd-turbo's text encoders alike)."""

CLIP_MAX_LENGTH = 77

_UNET_COMMON: dict[str, object] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}
_UNET: dict[FullSizeArchitecture, dict[str, object]] = {
    "sd15": {"cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False},
    "sd-turbo": {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
}

# CLIP ViT-L/14's text model (SD 1.5) and OpenCLIP ViT-H/14's, one layer short as SD 2.x uses it (sd-turbo).
_TEXT_ENCODER: dict[FullSizeArchitecture, dict[str, object]] = {
    "sd15": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    "sd-turbo": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "hidden_act": "gelu",
        "projection_dim": 512,
    },
}

_VAE_SAMPLE_SIZE: dict[FullSizeArchitecture, int] = {"sd15": 512, "sd-turbo": 768}
VAE_SCALING_FACTOR = 0.18215

# sd-turbo's own scheduler spaces its few timesteps from the end of the schedule ("trailing").
_TIMESTEP_SPACING: dict[FullSizeArchitecture, str] = {"sd15": "leading", "sd-turbo": "trailing"}


def _check(architecture: str) -> FullSizeArchitecture:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
    return architecture  # type: ignore[return-value]


def _build_unet(architecture: FullSizeArchitecture) -> UNet2DConditionModel:
    return UNet2DConditionModel(**_UNET_COMMON, **_UNET[architecture])


def _build_vae(architecture: FullSizeArchitecture) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=_VAE_SAMPLE_SIZE[architecture],
        scaling_factor=VAE_SCALING_FACTOR,
        force_upcast=True,
    )


def _build_text_encoder(architecture: FullSizeArchitecture, vocab: dict[str, int]) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            **_TEXT_ENCODER[architecture],
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=CLIP_MAX_LENGTH,
            layer_norm_eps=1e-5,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )


def _build_tiny_vae() -> AutoencoderTiny:
    """TAESD: diffusers' AutoencoderTiny defaults are `madebyollin/taesd`'s configuration."""
    return AutoencoderTiny(latent_channels=4)


def _build_scheduler(architecture: FullSizeArchitecture) -> LCMScheduler:
    return LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing=_TIMESTEP_SPACING[architecture],
        steps_offset=1,
    )


def build_full_size_components(
    architecture: FullSizeArchitecture, seed: int = 0, device: str | torch.device = "cpu"
) -> dict[str, object]:
    """The components of a full-size pipeline, built on `device` with deterministic random weights.

    Weights get PyTorch's and transformers' default initialisation (normalisation layers at weight 1,
    bias 0), seeded per component; on a CPU this takes about 20 seconds.
    """
    architecture = _check(architecture)
    vocab, merges = build_tokenizer_files()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    with torch.device(device):
        torch.manual_seed(seed)
        unet = _build_unet(architecture)
        torch.manual_seed(seed)
        vae = _build_vae(architecture)
        torch.manual_seed(seed)
        text_encoder = _build_text_encoder(architecture, vocab)
        torch.manual_seed(seed)
        tiny_vae = _build_tiny_vae()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": _build_scheduler(architecture),
        "tiny_vae": tiny_vae,
    }


def parameter_counts(architecture: FullSizeArchitecture) -> dict[str, int]:
    """Parameters per component (unet, vae, text_encoder, tiny_vae), counted on the meta device."""
    architecture = _check(architecture)
    vocab, _ = build_tokenizer_files()
    with torch.device("meta"):
        modules: dict[str, torch.nn.Module] = {
            "unet": _build_unet(architecture),
            "vae": _build_vae(architecture),
            "text_encoder": _build_text_encoder(architecture, vocab),
            "tiny_vae": _build_tiny_vae(),
        }
    return {name: sum(parameter.numel() for parameter in module.parameters()) for name, module in modules.items()}


def make_full_size_model(
    directory: Path | str,
    architecture: FullSizeArchitecture = "sd15",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Build a full-size model and save it as a diffusers directory; its TAESD goes in `taesd/`.

    About 2 GB in float16. Like `tiny.make_tiny_model`, it is written beside its final place and renamed
    into it, and the marker file is written last, so a crash never leaves a half-written model behind.
    """
    architecture = _check(architecture)
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    components = build_full_size_components(architecture, seed)
    for name in ("unet", "vae", "text_encoder", "tiny_vae"):
        # nn.Module.to: diffusers' own `to` warns about float32-only modules even when there are none.
        torch.nn.Module.to(components[name], dtype=dtype)  # type: ignore[arg-type]
    tiny_vae = components.pop("tiny_vae")
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        save_tiny_vae(tiny_vae, staging / TAESD_SUBDIR)  # type: ignore[arg-type]
        marker = {"architecture": architecture, "seed": seed, "dtype": str(dtype).removeprefix("torch.")}
        (staging / FULL_SIZE_MARKER).write_text(json.dumps(marker))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def full_size_model_info(directory: Path | str) -> dict[str, object] | None:
    """The marker of a full-size model directory ({"architecture", "seed", "dtype"}), or None."""
    marker = Path(directory) / FULL_SIZE_MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def ensure_full_size_model(
    directory: Path | str,
    architecture: FullSizeArchitecture = "sd15",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Return `directory` if it already holds this full-size model, else build it there first."""
    wanted = {"architecture": _check(architecture), "seed": seed, "dtype": str(dtype).removeprefix("torch.")}
    if full_size_model_info(directory) == wanted:
        return Path(directory)
    return make_full_size_model(directory, architecture, seed, dtype)
