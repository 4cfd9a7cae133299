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

from streamcanvas.pipelines.stream import nth_seed

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
SCHEDULE_TYPES = {
    "Automatic": "normal", "Uniform": "normal", "Normal": "normal", "Karras": "karras", "Exponential": "exponential",
    "Beta": "beta", "Simple": "simple", "SGM Uniform": "sgm_uniform",
}
"""A1111's schedule types (its `scheduler` field, and a sampler name's suffix: "DPM++ 2M Karras") →
our spacing of the noise levels (`sigmas`). The default is written as no schedule type at all."""
SCHEDULE_TYPE_NAMES = {sigmas: name for name, sigmas in SCHEDULE_TYPES.items() if sigmas != "normal"}
UPSCALERS = {"None": None, "Lanczos": "lanczos", "Nearest": "nearest", "Bicubic": "bicubic", "Bilinear": "bilinear"}
"""A1111's upscaler names → our resamplers (a super-resolution network has one name in both)."""
UPSCALER_NAMES = {method: name for name, method in UPSCALERS.items() if method}


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
        *([f"Schedule type: {SCHEDULE_TYPE_NAMES[params['sigmas']]}"] if params.get("sigmas", "normal") != "normal" else []),
        f"CFG scale: {params['guidance_scale']}",
        f"Seed: {seed}",
        f"Size: {params['width']}x{params['height']}",
        f"Model: {model_name}",
    ]
    hires = params.get("hires")
    if "strength" in params or hires:
        fields.append(f"Denoising strength: {hires['strength'] if hires else params['strength']}")
    if hires:  # A1111's hires-fix fields, so that sending the text back rebuilds the same request
        if hires.get("width") or hires.get("height"):
            fields.append(f"Hires resize: {hires.get('width') or 0}x{hires.get('height') or 0}")
        else:
            fields.append(f"Hires upscale: {hires['scale']:g}")
        if hires.get("steps"):
            fields.append(f"Hires steps: {hires['steps']}")
        fields.append(f"Hires upscaler: {upscaler_name(hires['upscaler'])}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def upscaler_name(upscaler: str) -> str:
    """An upscaler as A1111 names it."""
    return UPSCALER_NAMES.get(upscaler, upscaler)


def postprocessing_text(params: dict[str, Any], scale: float | None) -> str:
    """What A1111's extras write about a plain resample (its `postprocessing` text chunk): the factor, or
    the size asked for, and the upscaler. No diffusion settings: there was no diffusion."""
    size = f"Postprocess upscale by: {scale:g}" if scale is not None else f"Postprocess upscale to: {params['width']}x{params['height']}"
    return f"{size}, Postprocess upscaler: {upscaler_name(params['upscaler'])}"


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
    """A txt2img/img2img job's images: image i has seed + i (`nth_seed`), the A1111 text and the job's parameters."""
    results = []
    for index, image in enumerate(images):
        seed = nth_seed(params["seed"], index)
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
