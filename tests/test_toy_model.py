"""The trained toy model: its training, its autoencoders, and frames through a real server that show the
canvas and the prompt (not merely differ).

Which model each test uses: everything here but the training tests runs on the trained toy model (the
server's default, the weights the package ships); tests elsewhere that only need the shapes use the
untrained tiny model (`tiny_model_dir`), which builds in under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TEST_RESOLUTION, BackgroundRetraining
from helpers import Client, ServerProcess, decode_frame
from streamcanvas.pipelines import drawings
from streamcanvas.pipelines.loading import ModelSpec, load_model
from streamcanvas.pipelines.tiny import MARKER, weights_fingerprint
from streamcanvas.pipelines.toy_model import (
    SHIPPED_TOY_MODEL,
    TOY_MODEL_VERSION,
    Style,
    TrainingPlan,
    default_toy_model_dir,
    ensure_toy_model,
    restyle,
    shipped_for,
    train_toy_model,
    trained_by,
)

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


def test_the_shipped_weights_are_intact_and_fit_the_recipe() -> None:
    marker = json.loads((SHIPPED_TOY_MODEL / MARKER).read_text())
    assert shipped_for(TrainingPlan()), (
        f"pipelines/toy_weights was trained by {marker.get('plan')} (version {marker.get('version')}), not by "
        f"TrainingPlan() of version {TOY_MODEL_VERSION}: run `make toy-weights`"
    )
    assert marker["weights_fingerprint"] == weights_fingerprint(SHIPPED_TOY_MODEL)
    assert ensure_toy_model(progress=False) == SHIPPED_TOY_MODEL


def test_a_plan_the_shipped_weights_do_not_fit_is_trained_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMCANVAS_CACHE_DIR", str(tmp_path))
    path = ensure_toy_model(plan=QUICK, progress=False)
    assert path == tmp_path / default_toy_model_dir().name and trained_by(path, QUICK)


WORD_EFFECT_FLOORS = {"red": 0.05, "blue": 0.05, "dark": 0.4}
"""The least each word must do in a retrained model (`behaviour`'s units: mean channel difference in
[-1, 1]; 0.05 is about 6 of 255 levels). The measurements they come from are in the test below."""


@pytest.mark.slow
@pytest.mark.background_retraining
@pytest.mark.timeout(2400)
def test_the_training_script_reproduces_the_shipped_weights(background_retraining: BackgroundRetraining) -> None:
    """`streamcanvas make-tiny-model --train` (what `make toy-weights` runs), with the whole plan, from scratch.

    On the machine that trained the shipped weights they come out the same to the bit. On another CPU
    the rounding differs (AVX2 and AVX-512 kernels do; so may two CPUs that report the same model name
    but have other cache sizes, which oneDNN picks its blocking by), training follows another trajectory,
    and the retrained model must still do what the recipe is for: round trips as good, and every word
    moving the picture its own way by a margin an undertrained model does not reach. The margins come
    from measurements (`behaviour`, held-out drawings): shipped (Xeon) red 0.68, blue 0.55, dark 0.79;
    retrained on an AMD EPYC red 0.37, blue 0.11, dark 0.70 (same recipe: a weaker but visible blue);
    the same recipe with a tenth of its steps red 0.0000, blue -0.0002, dark 0.24, 15 dB round trip.
    So the effect's size varies between trajectories by up to five times and is not compared with the
    shipped one's; its sign and a floor are. (That training is deterministic on one machine is
    `test_training_is_seeded_and_deterministic`.)"""
    returncode, output = background_retraining.wait(timeout=2300)
    assert returncode == 0, output
    retrained_dir = background_retraining.model
    shipped = json.loads((SHIPPED_TOY_MODEL / MARKER).read_text())
    retrained = json.loads((retrained_dir / MARKER).read_text())
    assert retrained["plan"] == shipped["plan"] and retrained["version"] == shipped["version"]
    if retrained["weights_fingerprint"] == shipped["weights_fingerprint"]:
        return
    print(f"other weights: trained on {retrained['cpu']} (torch {retrained['torch']}), shipped from {shipped['cpu']} (torch {shipped['torch']})")
    ours, theirs = (behaviour(load_model(ModelSpec(model=str(path)))) for path in (retrained_dir, SHIPPED_TOY_MODEL))
    assert abs(ours["round_trip_db"] - theirs["round_trip_db"]) < 1.0, (ours, theirs)
    for word, floor in WORD_EFFECT_FLOORS.items():
        assert ours[word] >= floor and theirs[word] >= floor, (word, ours, theirs)


def behaviour(model) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """What a toy model does with held-out drawings: its round trip and what each word does to x0 (t=499)."""
    pipe = model.pipe
    pictures = torch.from_numpy(drawings.pictures(HELD_OUT_SEED, 32, 128, webcam_share=0.0)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(pictures).latents
        out = {"round_trip_db": psnr(pipe.vae.decode(latents).sample, pictures)}
        alpha = pipe.scheduler.alphas_cumprod[499]
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        frames = {}
        for word in ("", "red", "blue", "dark"):
            tokens = pipe.tokenizer([word] * len(latents), padding="max_length", max_length=77, return_tensors="pt").input_ids
            predicted = pipe.unet(noisy, 499, encoder_hidden_states=pipe.text_encoder(tokens)[0]).sample
            frames[word] = pipe.vae.decode((noisy - (1 - alpha).sqrt() * predicted) / alpha.sqrt()).sample.clamp(-1, 1)
    out["red"] = float((frames["red"][:, 0] - frames["red"][:, 2]).mean() - (frames[""][:, 0] - frames[""][:, 2]).mean())
    out["blue"] = float((frames["blue"][:, 2] - frames["blue"][:, 0]).mean() - (frames[""][:, 2] - frames[""][:, 0]).mean())
    out["dark"] = float(frames[""].mean() - frames["dark"].mean())
    return out


def test_the_default_model_is_the_trained_toy_model(toy_model_dir: Path) -> None:
    model = load_model(ModelSpec(model=str(toy_model_dir)))
    assert model.toy_model == "trained" and model.is_test_model
    assert model.describe()["toy_model"] == "trained"


def test_both_autoencoders_round_trip_held_out_drawings(toy_model_dir: Path) -> None:
    """On drawings the training never saw, at 256². The aim is 25 dB: the autoencoder measures 26.3 dB on
    this set, the full VAE 24.1 dB (untrained: about 5 dB)."""
    model = load_model(ModelSpec(model=str(toy_model_dir)))
    pictures = torch.from_numpy(drawings.pictures(HELD_OUT_SEED, 48, 256, webcam_share=0.0)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        taesd = model.pipe.vae.decode(model.pipe.vae.encode(pictures).latents).sample
        full = model.full_vae.decode(model.full_vae.encode(pictures).latent_dist.mode()).sample
    assert psnr(taesd, pictures) >= 25.0
    assert psnr(full, pictures) >= 23.0


def test_the_training_target_tints_by_colour_word() -> None:
    """The rule the UNet learns (a test of the data, not of the model)."""
    image = torch.zeros(1, 3, 16, 16)
    assert Style.of("A Blue, smooth house") == Style("blue", "smooth")
    assert Style.of("a house") == Style()
    red, blue = restyle(image, [Style("red")]), restyle(image, [Style("blue")])
    assert (red[0, 0] > blue[0, 0]).all() and (blue[0, 2] > red[0, 2]).all()
    assert torch.equal(restyle(image, [Style()]), image)


async def render(server: ServerProcess, canvas: np.ndarray, prompt: str, **params: object) -> np.ndarray:
    async with Client.connect(server.ws_url) as client:
        await client.hello(params={"prompt": prompt, "seed": 5, **params})
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


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.6])
async def test_a_drawn_shape_stays_where_it_was_drawn(server: ServerProcess, strength: float) -> None:
    """Dark shapes on white paper: the frame is dark where the canvas is and light where it is not, over
    the strengths img2img is used at."""
    rng = np.random.default_rng(3)
    for _ in range(3):
        canvas = np.full((SIZE, SIZE, 3), 255, np.uint8)
        left, top = rng.integers(8, SIZE // 2, size=2)
        width, height = rng.integers(SIZE // 4, SIZE // 2, size=2)
        canvas[top : top + height, left : left + width] = (30, 30, 30)
        frame = await render(server, canvas, "a drawing", strength=strength)
        drawn = (canvas.mean(axis=2) < 128).ravel().astype(np.float64)
        darkness = 255 - frame.mean(axis=2).ravel()
        correlation = float(np.corrcoef(drawn, darkness)[0, 1])
        assert correlation > 0.7, correlation


def blueness(pixels: np.ndarray) -> float:
    return -redness(pixels)


async def test_the_prompt_restyles_the_same_canvas(server: ServerProcess) -> None:
    """The same drawings, four prompts: "blue …" renders bluer than "red …", "dark …" darker than the plain one."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    frames: dict[str, list[np.ndarray]] = {"plain": [], "red": [], "blue": [], "dark": []}
    for _ in range(3):
        canvas = drawings.drawing(rng, SIZE)
        for word in frames:
            frames[word].append(await render(server, canvas, f"a {'' if word == 'plain' else word + ' '}house on a hill"))
    red, blue, plain, dark = (np.stack(frames[word]) for word in ("red", "blue", "plain", "dark"))
    # Measured (v5): blueness blue 72, red -114; redness red 114, plain 12; mean brightness dark 66, plain 192.
    assert blueness(blue) > blueness(red) + 60, (blueness(blue), blueness(red))
    assert redness(red) > redness(plain) + 40 and blueness(blue) > blueness(plain) + 40, (redness(red), redness(blue), redness(plain))
    assert dark.mean() < plain.mean() - 60, (dark.mean(), plain.mean())

