"""Models load offline from a directory or the Hugging Face cache, through the real from_pretrained path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from diffusers import AutoencoderKL, AutoencoderTiny

from streamcanvas.pipelines import tiny, toy_model
from streamcanvas.pipelines.devices import choose_placement
from streamcanvas.pipelines.errors import DeviceUnavailable, ModelLoadError, ModelNotFound
from streamcanvas.pipelines.loading import ModelSpec, load_model


def test_tiny_model_has_the_shape_of_sd1(tiny_model) -> None:  # type: ignore[no-untyped-def]
    pipe = tiny_model.pipe
    assert pipe.vae_scale_factor == 8, "latents must be 1/8 of the image, as in real SD"
    assert isinstance(pipe.vae, AutoencoderTiny)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.tokenizer.model_max_length == 77
    assert len(pipe.tokenizer("a red house").input_ids) < len("a red house") + 2  # merges were learned
    assert tiny_model.is_test_model and tiny_model.toy_model == "untrained"


def test_full_vae_can_be_chosen(tiny_model_dir: Path) -> None:
    model = load_model(ModelSpec(model=str(tiny_model_dir), tiny_vae="none"))
    assert isinstance(model.pipe.vae, AutoencoderKL) and model.vae_kind == "AutoencoderKL"


def test_the_default_model_is_the_shipped_trained_toy_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --model: the trained toy model's shipped weights, loaded as they are (nothing trained, nothing
    written to the cache)."""
    monkeypatch.setenv("STREAMCANVAS_CACHE_DIR", str(tmp_path))
    model = load_model(ModelSpec())
    assert model.path == toy_model.SHIPPED_TOY_MODEL
    assert model.toy_model == "trained" and model.name == "streamcanvas trained toy model"
    assert not (tmp_path / toy_model.default_toy_model_dir().name).exists()


def test_a_repo_id_is_resolved_from_the_local_hugging_face_cache(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lay the tiny model out as the hub cache does, then load it by repo id with no network."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    repo = hub / "models--streamcanvas--tiny-test"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    model = load_model(ModelSpec(model="streamcanvas/tiny-test"))
    assert model.path == repo / "snapshots" / commit
    assert model.name == "streamcanvas/tiny-test"
    with pytest.raises(ModelNotFound, match="not in the Hugging Face cache") as missing:
        load_model(ModelSpec(model="stabilityai/sd-turbo"))
    assert str(hub) in str(missing.value)


def test_clear_errors_for_models_that_are_not_there(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no such directory"):
        load_model(ModelSpec(model=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(ModelSpec(model=str(tmp_path / "empty")))
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(ModelNotFound, match="is a file"):
        load_model(ModelSpec(model=str(tmp_path / "file.safetensors")))


def test_a_broken_model_directory_is_a_load_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelLoadError, match=str(broken)):
        load_model(ModelSpec(model=str(broken)))


def test_device_choice() -> None:
    placement = choose_placement()
    assert str(placement.device) == "cpu" and str(placement.dtype) == "torch.float32"
    assert str(choose_placement("cpu", "bfloat16").dtype) == "torch.bfloat16"
    with pytest.raises(DeviceUnavailable, match="no CUDA"):
        choose_placement("cuda")
    with pytest.raises(DeviceUnavailable):
        choose_placement("cpu", "float16")
    with pytest.raises(DeviceUnavailable):
        choose_placement("tpu")


@pytest.mark.cuda
def test_cuda_defaults_to_float16() -> None:
    placement = choose_placement()
    assert placement.device.type == "cuda" and str(placement.dtype) == "torch.float16"


def test_a_lora_is_fused_into_the_unet(tiny_model_dir: Path, tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from streamcanvas.pipelines.stream import StreamParams, StreamPipeline

    lora = tiny.make_tiny_lora(tmp_path / "lora", tiny_model_dir)
    with_lora = load_model(ModelSpec(model=str(tiny_model_dir), lora=str(lora)))
    assert with_lora.describe()["lora"] == str(lora)

    def render(model) -> np.ndarray:  # type: ignore[no-untyped-def]
        stream = StreamPipeline(model, 64, 64)
        stream.configure(StreamParams(prompt="a cat"), img2img=True)
        return stream.render(np.full((64, 64, 3), 90, np.uint8)).image

    assert not np.array_equal(render(tiny_model), render(with_lora))
    with pytest.raises(ModelNotFound, match="LoRA"):
        load_model(ModelSpec(model=str(tiny_model_dir), lora=str(tmp_path / "no-lora")))
