"""A tiny, untrained, Stable-Diffusion-1.x-shaped model that the project builds itself.

Weights cannot be downloaded on the machines this project is developed and tested on, so the server's
default model and every test use this one. It has the real architecture of SD 1.x in miniature (UNet
with cross-attention, a 4-block AutoencoderKL so latents are 1/8 of the image, a CLIP text encoder and
BPE tokenizer, an LCM scheduler, and a TAESD-shaped AutoencoderTiny), is saved with `save_pretrained`
and loaded back through the same `from_pretrained` path as real weights. Its frames are deterministic
functions of the input, prompt and seed, but they are not pictures of anything: it is untrained.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .paths import default_cache_dir

TINY_MODEL_VERSION = 3
"""Bumped whenever the shape of the tiny model changes, so cached copies are rebuilt."""

VOCAB_SIZE = 1000
TAESD_SUBDIR = "taesd"
MARKER = "streamcanvas_tiny_model.json"

# Words the tokenizer learns merges from. Any text still tokenizes (byte-level fallback); these only make
# common prompt words a few tokens long instead of one token per letter.
_CORPUS = (
    "a an the of in on with and at by from portrait photo painting drawing sketch of cat dog bird horse "
    "house tree forest mountain river lake sea ocean beach sky cloud sun moon star night day city street "
    "car road bridge castle flower garden field landscape person woman man girl boy face eyes hair smile "
    "red orange yellow green blue purple pink black white gray brown gold silver colorful bright dark "
    "light shadow style oil watercolor pencil digital art anime cartoon realistic detailed sharp soft "
    "cinematic lighting high quality masterpiece beautiful cute small large old new fantasy science "
    "fiction robot dragon space planet galaxy abstract pattern texture wood stone glass metal water fire smooth"
)


def default_tiny_model_dir() -> Path:
    return default_cache_dir() / f"tiny-sd-v{TINY_MODEL_VERSION}"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-character table (the base alphabet of its BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def build_tokenizer_files(vocab_size: int = VOCAB_SIZE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a small CLIP-style BPE vocabulary from the built-in word list.

    Returns the vocabulary (token → id) and the merge list, in the format CLIPTokenizer reads.
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab_tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    words = collections.Counter(_CORPUS.split())
    # Each word is a tuple of symbols, the last one carrying the end-of-word marker, as in CLIP.
    segmented = {word: tuple(word[:-1]) + (word[-1] + "</w>",) for word in words}
    merges: list[tuple[str, str]] = []
    budget = vocab_size - len(vocab_tokens) - 2  # two special tokens
    known = set(vocab_tokens)
    while len(merges) < budget:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, symbols in segmented.items():
            for left, right in zip(symbols, symbols[1:]):
                pairs[(left, right)] += words[word]
        if not pairs:
            break
        (left, right), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        merged = left + right
        merges.append((left, right))
        if merged not in known:
            vocab_tokens.append(merged)
            known.add(merged)
        for word, symbols in segmented.items():
            out: list[str] = []
            index = 0
            while index < len(symbols):
                if index + 1 < len(symbols) and symbols[index] == left and symbols[index + 1] == right:
                    out.append(merged)
                    index += 2
                else:
                    out.append(symbols[index])
                    index += 1
            segmented[word] = tuple(out)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab_tokens)}, merges


TINY_UNET: dict[str, object] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}
"""The tiny UNet's shape, SD and SDXL alike (they differ in conditioning)."""


def build_tiny_components(
    seed: int = 0, vae_channels: tuple[int, ...] = (32, 32, 64, 64), vae_norm_groups: int | None = None
) -> dict[str, object]:
    """The components of a tiny SD-1.x pipeline, with deterministic random weights.

    `vae_channels` are the full VAE's four block widths and `vae_norm_groups` its GroupNorm groups
    (default: as many as the narrowest block has channels, at most 32). The trained toy model uses
    narrower blocks and fewer groups."""
    vocab, merges = build_tokenizer_files()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET, cross_attention_dim=32)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=vae_channels,
        norm_num_groups=vae_norm_groups or min(32, *vae_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        sample_size=256,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(vocab),
            max_position_embeddings=77,
        )
    )
    scheduler = LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
    )
    torch.manual_seed(seed)
    tiny_vae = AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        latent_channels=4,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "tiny_vae": tiny_vae,
    }


def make_tiny_model(directory: Path | str, seed: int = 0) -> Path:
    """Build the tiny model and save it as a diffusers directory; its TAESD-shaped VAE goes in `taesd/`."""
    components = build_tiny_components(seed)
    tiny_vae = components.pop("tiny_vae")
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    return _save_untrained(pipe, tiny_vae, Path(directory), {"seed": seed})


def make_tiny_inpainting_model(directory: Path | str, seed: int = 0) -> Path:
    """The tiny model with an inpainting UNet: 9 input channels (noisy latents, the mask, the masked
    image's latents), as SD inpainting checkpoints have. For the batch queue's inpainting path (the
    live stream takes 4-channel UNets only)."""
    components = build_tiny_components(seed)
    tiny_vae = components.pop("tiny_vae")
    torch.manual_seed(seed + 1)
    components["unet"] = UNet2DConditionModel(**{**TINY_UNET, "in_channels": 9}, cross_attention_dim=32)
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    return _save_untrained(pipe, tiny_vae, Path(directory), {"seed": seed, "inpainting": True})


def _save_untrained(pipe: object, tiny_vae: AutoencoderTiny, target: Path, marker: dict[str, object]) -> Path:
    """Save an untrained tiny pipeline, its TAESD-shaped VAE in `taesd/`, and its marker.

    The directory is written beside its final place and renamed into it, so a crash never leaves a
    half-written model behind for the next start to trip over.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    pipe.save_pretrained(staging, safe_serialization=True)  # type: ignore[attr-defined]
    save_tiny_vae(tiny_vae, staging / TAESD_SUBDIR)
    marker = {"kind": "untrained", "version": TINY_MODEL_VERSION, **marker, "weights_fingerprint": weights_fingerprint(staging)}
    (staging / MARKER).write_text(json.dumps(marker, indent=2))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def save_tiny_vae(tiny_vae: AutoencoderTiny, directory: Path) -> None:
    """`save_pretrained`, less the `block_out_channels` that AutoencoderTiny records in its config for
    diffusers' own use but does not take back: left in, every load of the model warned that it was
    "passed to AutoencoderTiny, but not expected" (madebyollin/taesd's config has no such key either)."""
    tiny_vae.save_pretrained(directory, safe_serialization=True)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("block_out_channels", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def weights_fingerprint(directory: Path | str) -> str:
    """SHA-256 over every weights file of a saved model directory (names and bytes, in path order)."""
    digest = hashlib.sha256()
    root = Path(directory)
    for path in sorted(root.rglob("*.safetensors")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def read_marker(directory: Path | str) -> dict[str, object] | None:
    """The marker of the project's own models (trained or not), or None for any other directory."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def tiny_model_kind(directory: Path | str) -> str | None:
    """"trained" or "untrained" for the project's own models, None for any other model."""
    marker = read_marker(directory)
    return None if marker is None else str(marker.get("kind", "untrained"))


def stream_defaults(directory: Path | str) -> dict[str, object]:
    """The stream parameters the project's own model was made for (its marker says), else none."""
    marker = read_marker(directory) or {}
    return dict(marker.get("stream_defaults", {}))  # type: ignore[call-overload]


def ensure_tiny_model(directory: Path | str | None = None) -> Path:
    """Return the cached tiny model directory, building it first if it is missing or outdated."""
    target = Path(directory) if directory is not None else default_tiny_model_dir()
    marker = target / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("version") == TINY_MODEL_VERSION:
                return target
        except (OSError, ValueError):
            pass  # an unreadable marker means an unusable cache: rebuild below
    return make_tiny_model(target)


def make_tiny_lora(directory: Path | str, model_directory: Path | str, rank: int = 4, seed: int = 0) -> Path:
    """A LoRA for the tiny model's UNet attention layers, saved as diffusers writes LoRAs.

    Its weights are random (not the usual zero init), so loading it visibly changes the frames.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(Path(model_directory) / "unet", local_files_only=True)
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    target = Path(directory)
    StableDiffusionPipeline.save_lora_weights(
        target, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return target


def make_tiny_controlnet(directory: Path | str, model_directory: Path | str, seed: int = 0) -> Path:
    """A ControlNet for a tiny (or toy) model's UNet, saved as diffusers writes ControlNets.

    Built from the UNet as ControlNet training starts (`ControlNetModel.from_unet`), but with random
    weights where training would start from zeros (and a livelier conditioning embedding), so that the
    control image visibly changes frames.
    """
    from diffusers import ControlNetModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_directory) / "unet", local_files_only=True)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # The conditioning embedding as trained ones behave: its output follows the control image (at
        # default init it is nearly constant), and residuals a fraction of the UNet's activations.
        embedding = controlnet.controlnet_cond_embedding
        for conv in [embedding.conv_in, *embedding.blocks, embedding.conv_out]:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
            conv.bias.zero_()
        embedding.conv_out.weight.mul_(8.0)
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
    target = Path(directory)
    controlnet.save_pretrained(target, safe_serialization=True)
    return target


def make_tiny_sdxl_model(directory: Path | str, seed: int = 0) -> Path:
    """A tiny, untrained, SDXL-shaped model (as SDXL-turbo is laid out): two text encoders whose hidden
    states are concatenated, the second with a projection whose pooled output goes, with the size and
    crop "time ids", into the UNet's added conditioning. Saved as a StableDiffusionXLPipeline directory,
    with a TAESD-shaped VAE in `taesd/`."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    components = build_tiny_components(seed)
    tiny_vae = components.pop("tiny_vae")
    vocab, merges = build_tokenizer_files()
    torch.manual_seed(seed)
    components["unet"] = UNet2DConditionModel(
        **TINY_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids, and the pooled text embedding
        cross_attention_dim=64,  # both encoders' hidden states, side by side
    )
    torch.manual_seed(seed + 1)
    config = components["text_encoder"].config
    components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**{**config.to_dict(), "projection_dim": 32}))
    components["tokenizer_2"] = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    return _save_untrained(StableDiffusionXLPipeline(**components), tiny_vae, Path(directory), {"seed": seed, "shape": "sdxl"})
