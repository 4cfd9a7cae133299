"""Result files: one PNG per image, with the job's parameters embedded as PNG text chunks.

Each image carries two text chunks: `parameters`, in the one-paragraph form A1111-style tools read
(prompt, then "Steps: …, Sampler: …, Seed: …"), and `streamcanvas`, the full JSON of the job. Files are
written beside their final name and renamed into place, so a worker killed mid-write leaves no
half-written image, and a retried attempt overwrites an earlier one's files with identical ones.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .store import ResultRecord


SAMPLERS: dict[str, tuple[str, list[str]]] = {
    "Euler a": ("euler_a", ["k_euler_a", "k_euler_ancestral"]),
    "Euler": ("euler", ["k_euler"]),
    "DPM++ 2M": ("dpmpp_2m", ["k_dpmpp_2m"]),
    "DDIM": ("ddim", []),
    "PLMS": ("pndm", []),
    "UniPC": ("unipc", []),
    "Heun": ("heun", ["k_heun"]),
    "LCM": ("lcm", ["k_lcm"]),
}
"""A1111's sampler names (and older aliases) → our scheduler: what the A1111 routes take, and what the
images' A1111 text says, so png-info's answer can be sent back."""
SCHEDULER_NAMES = {scheduler: name for name, (scheduler, _) in SAMPLERS.items()}


def result_path(results_dir: Path, job_id: str, index: int, suffix: str = ".png") -> Path:
    return results_dir / job_id / f"{index}{suffix}"


def infotext(params: dict[str, Any], seed: int, model_name: str) -> str:
    """The A1111 'parameters' text of one image. A weighted prompt is written in A1111's composable form,
    `a cat :0.7 AND a dog :0.3`."""
    lines = [prompt_text(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {prompt_text(params['negative_prompt'])}")
    fields = [
        f"Steps: {params['steps']}",
        f"Sampler: {SCHEDULER_NAMES.get(params['scheduler'], params['scheduler'])}",
        f"CFG scale: {params['guidance_scale']}",
        f"Seed: {seed}",
        f"Size: {params['width']}x{params['height']}",
        f"Model: {model_name}",
    ]
    if "strength" in params:
        fields.append(f"Denoising strength: {params['strength']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def prompt_text(prompt: str | list[Any] | tuple[Any, ...]) -> str:
    if isinstance(prompt, str):
        return prompt
    return " AND ".join(f"{text} :{weight:g}" for text, weight in prompt)


@dataclass(frozen=True)
class ResultImage:
    """One image a job made, with what its file says about it."""

    image: Image.Image
    seed: int
    text: dict[str, str]
    """PNG text chunks besides `streamcanvas` (A1111's `parameters`; a workflow's `prompt`)."""
    record: dict[str, Any]
    """This image's `streamcanvas` JSON: the parameters it was made with."""


@dataclass(frozen=True)
class ResultFile:
    """A result that is not an image (a video job's MP4), already encoded."""

    data: bytes
    suffix: str
    width: int
    height: int
    seed: int


def described(params: dict[str, Any], images: list[Image.Image], model_name: str) -> list[ResultImage]:
    """A txt2img/img2img job's images: image i has seed + i, the A1111 text and the job's parameters."""
    results = []
    for index, image in enumerate(images):
        seed = params["seed"] + index
        text = {"parameters": infotext(params, seed, model_name)}
        results.append(ResultImage(image, seed, text, {"model": model_name, **params, "seed": seed}))
    return results


def write_results(
    results_dir: Path, job_id: str, kind: str, produced: list[ResultImage | ResultFile], rendered_on: dict[str, Any] | None = None
) -> list[ResultRecord]:
    """Write each image as a PNG with its text chunks and our own JSON (`streamcanvas`), which adds
    `rendered_on` (on the CPU, the torch thread counts it ran on); files as they are."""
    directory = results_dir / job_id
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for index, result in enumerate(produced):
        suffix = result.suffix if isinstance(result, ResultFile) else ".png"
        path = result_path(results_dir, job_id, index, suffix)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        if isinstance(result, ResultFile):
            partial.write_bytes(result.data)
            width, height = result.width, result.height
        else:
            info = PngInfo()
            for key, value in result.text.items():
                info.add_text(key, value)
            info.add_text("streamcanvas", json.dumps({"job_id": job_id, "kind": kind, "index": index, **result.record, **(rendered_on or {})}))
            result.image.save(partial, format="PNG", pnginfo=info)
            width, height = result.image.width, result.image.height
        os.replace(partial, path)
        records.append(ResultRecord(index, str(path), result.seed, width, height, path.stat().st_size))
    return records


def delete_results(results_dir: Path, job_id: str) -> None:
    shutil.rmtree(results_dir / job_id, ignore_errors=True)
