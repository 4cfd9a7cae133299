"""The trained toy model: its training, its autoencoders, and frames through a real server that show the
canvas and the prompt (not merely differ).

Which model each test uses: everything here but the training tests runs on the trained toy model (the
server's default, trained once per test run); tests elsewhere that only need the shapes use the untrained
tiny model (`tiny_model_dir`), which builds in under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conftest import TEST_RESOLUTION
from helpers import Client, ServerProcess, decode_frame
from streamcanvas.pipelines import drawings
from streamcanvas.pipelines.loading import ModelSpec, load_model
from streamcanvas.pipelines.tiny import MARKER, weights_fingerprint
from streamcanvas.pipelines.toy_model import Style, TrainingPlan, ensure_toy_model, restyle, train_toy_model, trained_by

SIZE = TEST_RESOLUTION
HELD_OUT_SEED = 10_000
"""Pictures drawn from this seed were never trained on (training draws from the plan's seed, 0)."""

QUICK = TrainingPlan().scaled(0.01)
"""The real recipe with a hundredth of the steps: seconds, for the tests of the training itself."""


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR in dB of two batches of images in [-1, 1]."""
    mse = (a.clamp(-1, 1) - b).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(4 / mse)).mean())


def test_training_is_seeded_and_deterministic(tmp_path: Path) -> None:
    first = train_toy_model(tmp_path / "a", QUICK, progress=False)
    second = train_toy_model(tmp_path / "b", QUICK, progress=False)
    other_seed = train_toy_model(tmp_path / "c", TrainingPlan(seed=1).scaled(0.01), progress=False)
    assert weights_fingerprint(first) == weights_fingerprint(second)
    assert weights_fingerprint(first) != weights_fingerprint(other_seed)
    marker = json.loads((first / MARKER).read_text())
    assert marker["kind"] == "trained" and marker["weights_fingerprint"] == weights_fingerprint(first)
    assert marker["plan_fingerprint"] == QUICK.fingerprint and marker["plan"]["unet_steps"] == QUICK.unet_steps


def test_a_cached_toy_model_is_reused_and_a_changed_plan_retrains(tmp_path: Path) -> None:
    path = ensure_toy_model(tmp_path / "toy", QUICK, progress=False)
    built = (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_toy_model(tmp_path / "toy", QUICK, progress=False) == path
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == built
    changed = TrainingPlan(seed=3).scaled(0.01)
    assert not trained_by(path, changed)
    ensure_toy_model(tmp_path / "toy", changed, progress=False)
    assert trained_by(path, changed) and not trained_by(path, QUICK)


def test_the_default_model_is_the_trained_toy_model(toy_model_dir: Path) -> None:
    model = load_model(ModelSpec(model=str(toy_model_dir)))
    assert model.toy_model == "trained" and model.is_test_model
    assert model.describe()["toy_model"] == "trained"


def test_both_autoencoders_round_trip_held_out_drawings(toy_model_dir: Path) -> None:
    """On drawings the training never saw, at 256². The aim is 25 dB; the autoencoder measures 24–25.2 dB
    on such sets (untrained: about 5 dB). The full VAE, trained for a third of the steps, reaches about
    15 dB: recognisable, blurred."""
    model = load_model(ModelSpec(model=str(toy_model_dir)))
    pictures = torch.from_numpy(drawings.pictures(HELD_OUT_SEED, 48, 256, webcam_share=0.0)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        taesd = model.pipe.vae.decode(model.pipe.vae.encode(pictures).latents).sample
        full = model.full_vae.decode(model.full_vae.encode(pictures).latent_dist.mode()).sample
    assert psnr(taesd, pictures) >= 24.0
    assert psnr(full, pictures) >= 14.0


def test_the_training_target_tints_by_colour_word() -> None:
    """The rule the UNet learns (a test of the data, not of the model)."""
    image = torch.zeros(1, 3, 16, 16)
    assert Style.of("A Blue, smooth house") == Style("blue", "smooth")
    assert Style.of("a house") == Style()
    red, blue = restyle(image, [Style("red")]), restyle(image, [Style("blue")])
    assert (red[0, 0] > blue[0, 0]).all() and (blue[0, 2] > red[0, 2]).all()
    assert torch.equal(restyle(image, [Style()]), image)


async def render(server: ServerProcess, canvas: np.ndarray, prompt: str) -> np.ndarray:
    async with Client.connect(server.ws_url) as client:
        await client.hello(params={"prompt": prompt, "seed": 5})
        return decode_frame(await client.frame_for(await client.send_canvas(canvas))).astype(np.float64)


def redness(pixels: np.ndarray) -> float:
    return float((pixels[..., 0] - pixels[..., 2]).mean())


async def test_a_red_left_and_blue_right_canvas_renders_red_left_and_blue_right(server: ServerProcess) -> None:
    canvas = np.zeros((SIZE, SIZE, 3), np.uint8)
    canvas[:, : SIZE // 2] = (220, 30, 30)
    canvas[:, SIZE // 2 :] = (30, 60, 220)
    frame = await render(server, canvas, "a painting")
    left, right = frame[:, : SIZE // 2], frame[:, SIZE // 2 :]
    assert redness(left) > redness(right) + 15, (redness(left), redness(right))
    # Mirrored canvas, mirrored frame: the colours come from the canvas, not from the model.
    mirrored = await render(server, canvas[:, ::-1].copy(), "a painting")
    assert redness(mirrored[:, : SIZE // 2]) < redness(mirrored[:, SIZE // 2 :]) - 15


async def test_a_drawn_shape_stays_where_it_was_drawn(server: ServerProcess) -> None:
    """Dark shapes on white paper: the frame is dark where the canvas is and light where it is not."""
    rng = np.random.default_rng(3)
    for _ in range(3):
        canvas = np.full((SIZE, SIZE, 3), 255, np.uint8)
        left, top = rng.integers(8, SIZE // 2, size=2)
        width, height = rng.integers(SIZE // 4, SIZE // 2, size=2)
        canvas[top : top + height, left : left + width] = (30, 30, 30)
        frame = await render(server, canvas, "a drawing")
        drawn = (canvas.mean(axis=2) < 128).ravel().astype(np.float64)
        darkness = 255 - frame.mean(axis=2).ravel()
        correlation = float(np.corrcoef(drawn, darkness)[0, 1])
        assert correlation > 0.7, correlation
