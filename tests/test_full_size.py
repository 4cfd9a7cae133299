"""The full-size stand-in models: real architectures and parameter counts, checked without real weights.

Everything here is built on the meta device (no memory for weights) or, for the save path, with the
tiny model's components standing in, so the file runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler
from safetensors import safe_open

from streamcanvas.pipelines import full_size
from streamcanvas.pipelines.full_size import (
    ARCHITECTURES,
    FULL_SIZE_MARKER,
    build_full_size_components,
    ensure_full_size_model,
    full_size_model_info,
    make_full_size_model,
    parameter_counts,
)
from streamcanvas.pipelines.tiny import TAESD_SUBDIR, build_tiny_components

# Published parameter counts of the real models, for comparison with ours:
# - UNets: SD 1.5's 859,520,964 and SD 2.x's (sd-turbo's) 865,910,724, as pinned for instance by the
#   buddy-mlir Stable Diffusion examples (`MemRef<float, 1> arg0_unet({865910724})`) and by UNet weight
#   schemas in other ports; SD 1.5's is the figure quoted throughout ("860M UNet").
# - AutoencoderKL: 83,653,863 (the same for SD 1.x, 2.x and sd-turbo), as printed by scripts that count
#   the parameters of the downloaded SD 1.5 VAE.
# - Text encoders: CLIP ViT-L/14's text model 123,060,480 (SD 1.5) and OpenCLIP ViT-H/14's, 23 layers
#   deep as SD 2.x uses it, 340,387,840 (buddy-mlir: `arg0_text_encoder({340387840})`).
# - TAESD: 2,445,063 (1,222,532 encoder + 1,222,531 decoder); no published figure was found, this one is
#   counted from `madebyollin/taesd`'s configuration (diffusers' AutoencoderTiny defaults).
PUBLISHED_COUNTS: dict[str, dict[str, int]] = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480, "tiny_vae": 2_445_063},
    "sd-turbo": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840, "tiny_vae": 2_445_063},
}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def meta_components(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    return request.param, build_full_size_components(request.param, device="meta")


def test_architectures() -> None:
    assert ARCHITECTURES == ("sd15", "sd-turbo")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_parameter_counts_are_the_published_ones(architecture: str) -> None:
    assert parameter_counts(architecture) == PUBLISHED_COUNTS[architecture]  # type: ignore[arg-type]


def test_meta_components_allocate_no_weights(meta_components: tuple[str, dict[str, object]]) -> None:
    _, components = meta_components
    for name in ("unet", "vae", "text_encoder", "tiny_vae"):
        module = components[name]
        assert isinstance(module, torch.nn.Module)
        assert all(parameter.is_meta for parameter in module.parameters()), name


def test_unet_config(meta_components: tuple[str, dict[str, object]]) -> None:
    architecture, components = meta_components
    config = components["unet"].config  # type: ignore[attr-defined]
    assert tuple(config.block_out_channels) == (320, 640, 1280, 1280)
    assert config.layers_per_block == 2
    assert config.in_channels == config.out_channels == 4
    assert config.sample_size == 64
    if architecture == "sd15":
        assert config.cross_attention_dim == 768
        assert config.attention_head_dim == 8
        assert config.use_linear_projection is False
    else:
        assert config.cross_attention_dim == 1024
        assert tuple(config.attention_head_dim) == (5, 10, 20, 20)
        assert config.use_linear_projection is True


def test_vae_configs(meta_components: tuple[str, dict[str, object]]) -> None:
    architecture, components = meta_components
    vae = components["vae"].config  # type: ignore[attr-defined]
    assert vae.scaling_factor == 0.18215
    assert vae.latent_channels == 4
    assert tuple(vae.block_out_channels) == (128, 256, 512, 512)
    assert vae.layers_per_block == 2
    assert len(vae.down_block_types) == len(vae.up_block_types) == 4
    assert vae.sample_size == (512 if architecture == "sd15" else 768)
    tiny = components["tiny_vae"].config  # type: ignore[attr-defined]
    assert tiny.latent_channels == 4
    assert tuple(tiny.encoder_block_out_channels) == tuple(tiny.decoder_block_out_channels) == (64, 64, 64, 64)
    assert tuple(tiny.num_encoder_blocks) == (1, 3, 3, 3)
    assert tuple(tiny.num_decoder_blocks) == (3, 3, 3, 1)


def test_text_encoder_and_tokenizer(meta_components: tuple[str, dict[str, object]]) -> None:
    architecture, components = meta_components
    config = components["text_encoder"].config  # type: ignore[attr-defined]
    tokenizer = components["tokenizer"]
    assert config.vocab_size == 49408
    assert config.max_position_embeddings == 77
    expected = (768, 12, 12, "quick_gelu") if architecture == "sd15" else (1024, 23, 16, "gelu")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.hidden_act) == expected
    # The small offline vocabulary's special tokens are the ones the text encoder pools on.
    assert config.bos_token_id == tokenizer.bos_token_id  # type: ignore[attr-defined]
    assert config.eos_token_id == tokenizer.eos_token_id  # type: ignore[attr-defined]
    prompt = "a cinematic photo of a dragon"
    ids = tokenizer(prompt, padding="max_length", max_length=77).input_ids  # type: ignore[operator]
    assert len(ids) == 77 and max(ids) < config.vocab_size


def test_scheduler(meta_components: tuple[str, dict[str, object]]) -> None:
    architecture, components = meta_components
    scheduler = components["scheduler"]
    assert isinstance(scheduler, LCMScheduler)
    config = scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert config.num_train_timesteps == 1000
    assert config.steps_offset == 1
    assert config.timestep_spacing == ("leading" if architecture == "sd15" else "trailing")


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="sd-turbo"):
        parameter_counts("sdxl")  # type: ignore[arg-type]


def test_save_path_with_stand_in_components(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """make_full_size_model's saving, marker and atomic rename, with tiny components standing in."""
    built: list[tuple[str, int]] = []

    def tiny_stand_in(architecture: str, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, object]:
        built.append((architecture, seed))
        return build_tiny_components(seed)

    monkeypatch.setattr(full_size, "build_full_size_components", tiny_stand_in)
    target = tmp_path / "models" / "stand-in"
    assert make_full_size_model(target, "sd-turbo", seed=3) == target
    assert built == [("sd-turbo", 3)]
    assert json.loads((target / FULL_SIZE_MARKER).read_text()) == {
        "architecture": "sd-turbo",
        "seed": 3,
        "dtype": "float16",
    }
    assert full_size_model_info(target) == {"architecture": "sd-turbo", "seed": 3, "dtype": "float16"}
    assert (target / "model_index.json").is_file()
    assert (target / TAESD_SUBDIR / "config.json").is_file()
    assert sorted(path.name for path in target.parent.iterdir()) == ["stand-in"]  # no staging left behind
    weight_files = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")
    for weights in weight_files:
        with safe_open(str(target / weights), framework="pt") as file:
            assert {file.get_slice(key).get_dtype() for key in file.keys()} == {"F16"}

    # The same model again is reused as it is; another seed rebuilds it in place.
    assert ensure_full_size_model(target, "sd-turbo", seed=3) == target
    assert len(built) == 1
    ensure_full_size_model(target, "sd-turbo", seed=4)
    assert built[-1] == ("sd-turbo", 4)
    assert full_size_model_info(target)["seed"] == 4  # type: ignore[index]

    from streamcanvas.pipelines.loading import ModelSpec, load_model

    loaded = load_model(ModelSpec(model=str(target)))
    assert loaded.vae_kind.startswith("AutoencoderTiny")
    assert loaded.full_vae is not None
    assert not loaded.is_test_model


def test_model_info_of_a_directory_without_marker(tmp_path: Path) -> None:
    assert full_size_model_info(tmp_path) is None
    (tmp_path / FULL_SIZE_MARKER).write_text("not json")
    assert full_size_model_info(tmp_path) is None
