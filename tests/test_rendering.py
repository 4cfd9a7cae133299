"""The full-quality renderer on the tiny model, in-process: the full VAE, schedulers, the step callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamcanvas.batch_fallback.rendering import SCHEDULERS, QualityRenderer, RenderRequest
from streamcanvas.pipelines.loading import ModelSpec, load_model


def request(**changes) -> RenderRequest:  # type: ignore[no-untyped-def]
    fields = {
        "prompt": "a cat", "negative_prompt": "", "width": 64, "height": 64, "steps": 3,
        "scheduler": "euler", "guidance_scale": 7.0, "seed": 3, "batch_size": 1,
    }
    return RenderRequest(**{**fields, **changes})


def test_batch_renders_decode_with_the_full_vae_while_live_frames_use_taesd(tiny_model) -> None:  # type: ignore[no-untyped-def]
    assert type(tiny_model.pipe.vae).__name__ == "AutoencoderTiny"
    assert type(tiny_model.quality_vae).__name__ == "AutoencoderKL"
    steps: list[tuple[int, int]] = []
    previews: list[bytes] = []

    def on_step(step: int, total: int, make_preview) -> None:  # type: ignore[no-untyped-def]
        steps.append((step, total))
        previews.append(make_preview())

    images = QualityRenderer(tiny_model).render(request(batch_size=2), on_step)
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert all(preview.startswith(b"\xff\xd8") for preview in previews)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_renders_reproducibly(tiny_model, scheduler: str) -> None:  # type: ignore[no-untyped-def]
    renderer = QualityRenderer(tiny_model)
    first = np.asarray(renderer.render(request(scheduler=scheduler), lambda *_: None)[0])
    again = np.asarray(renderer.render(request(scheduler=scheduler), lambda *_: None)[0])
    other = np.asarray(renderer.render(request(scheduler=scheduler, seed=4), lambda *_: None)[0])
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_a_raise_in_the_callback_stops_the_render_at_that_step(tiny_model) -> None:  # type: ignore[no-untyped-def]
    seen: list[int] = []

    def stop_at_two(step: int, total: int, make_preview) -> None:  # type: ignore[no-untyped-def]
        seen.append(step)
        if step == 2:
            raise KeyboardInterrupt  # any exception; the executor raises JobCancelled here

    with pytest.raises(KeyboardInterrupt):
        QualityRenderer(tiny_model).render(request(steps=10), stop_at_two)
    assert seen == [1, 2]


@pytest.mark.cuda
def test_a_cuda_render_matches_the_cpu_one(tiny_model_dir: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    on_cuda = load_model(ModelSpec(model=str(tiny_model_dir), device="cuda", dtype="float32"))
    cpu = np.asarray(QualityRenderer(tiny_model).render(request(), lambda *_: None)[0], dtype=np.int16)
    cuda = np.asarray(QualityRenderer(on_cuda).render(request(), lambda *_: None)[0], dtype=np.int16)
    assert np.abs(cpu - cuda).max() <= 3
