"""The node classes a workflow may use, each declared once (its inputs, outputs and how it runs).

The set covers ComfyUI's default text-to-image and image-to-image API workflows, LoRAs, ControlNets,
image and latent scaling (the "hires fix" graphs) and upscaling with a super-resolution model. Values
passed between nodes keep ComfyUI's shapes where clients can see them: IMAGE is a float tensor
[batch, height, width, 3] in 0…1, MASK [batch, height, width]; LATENT holds scaled latents.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from streamcanvas.pipelines.stream import encode_prompts
from streamcanvas.pipelines.super_resolution import SuperResolution

from .rendering import SIGMA_OPTIONS, QualityRenderer, RenderControl, RenderRequest, StepCallback, sigma_spacings
from .results import ResultImage
from .upscaling import super_resolve
from .workflow import Catalog, Input, Node

MAX_BATCH = 8
MAX_SEED = 2**63 - 1

SAMPLERS = {
    # ComfyUI's sampler_name → our scheduler
    "euler": "euler",
    "euler_ancestral": "euler_a",
    "heun": "heun",
    "dpmpp_2m": "dpmpp_2m",
    "ddim": "ddim",
    "uni_pc": "unipc",
    "lcm": "lcm",
}
SCALING = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROPS = ("disabled", "center")


# --- the values that flow between nodes ---------------------------------------------------------------


@dataclass(frozen=True)
class ModelValue:
    """MODEL (and CLIP and VAE): a loaded model by name, with the LoRAs applied to this part of it."""

    name: str
    loras: tuple[tuple[str, float], ...] = ()

    def with_lora(self, lora: str, weight: float) -> ModelValue:
        kept = tuple((name, value) for name, value in self.loras if name != lora)
        return ModelValue(self.name, kept + (((lora, weight),) if weight else ()))


@dataclass(frozen=True)
class Conditioning:
    text: str
    clip: ModelValue
    controls: tuple[RenderControl, ...] = ()


@dataclass(frozen=True)
class Latent:
    samples: torch.Tensor
    """[batch, channels, height / 8, width / 8], scaled as the UNet takes it."""
    empty: bool = False
    """Made by EmptyLatentImage: a sampler at full denoise starts from pure noise."""
    noise_mask: torch.Tensor | None = None
    """[batch or 1, height, width] in 0…1: a sampler only paints where it is 1 (inpainting)."""


@dataclass
class NodeContext:
    """What nodes of one run share: the renderer, the uploaded images the workflow reads, progress,
    the run's limits and what its output nodes have saved. Made fresh for every job."""

    renderer: QualityRenderer
    images: Mapping[str, bytes]
    on_step: StepCallback
    max_width: int
    max_height: int
    graph: dict[str, Any]
    extra_pnginfo: dict[str, Any] = field(default_factory=dict)
    node_id: str = ""
    results: list[ResultImage] = field(default_factory=list)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def check_size(self, width: int, height: int, what: str) -> None:
        if not (0 < width <= self.max_width and 0 < height <= self.max_height):
            raise ValueError(f"{what} would be {width}x{height}, over the limit of {self.max_width}x{self.max_height}")

    def save(self, images: torch.Tensor, prefix: str, folder: str, seeds: list[int] | None = None) -> dict[str, Any]:
        """Keep a batch of images as this node's results; returns its ComfyUI `ui` output."""
        entries = []
        stem = prefix.replace("\\", "/").rsplit("/", 1)[-1] or "ComfyUI"
        for array in _to_uint8(images):
            number = self.counters.get(stem, 0) + 1
            self.counters[stem] = number
            filename = f"{stem}_{number:05}_.png"
            text = {"prompt": json.dumps(self.graph)}
            text.update({key: json.dumps(value) for key, value in self.extra_pnginfo.items()})
            seed = seeds[len(entries)] if seeds and len(entries) < len(seeds) else 0
            index = len(self.results)
            self.results.append(ResultImage(Image.fromarray(array), seed % 2**63, text, {"node": self.node_id, "filename": filename, "type": folder}))
            entries.append({"filename": filename, "subfolder": "", "type": folder, "index": index})
        self.outputs.setdefault(self.node_id, {"images": []})["images"].extend(entries)
        return {"images": entries}


# --- the nodes --------------------------------------------------------------------------------------

REGISTRY: dict[str, Node] = {}


def registered(cls: type[Node]) -> type[Node]:
    REGISTRY[cls.name] = cls()
    return cls


def _max_width(catalog: Catalog) -> float:
    return catalog.max_width


def _max_height(catalog: Catalog) -> float:
    return catalog.max_height


@registered
class CheckpointLoaderSimple(Node):
    name = "CheckpointLoaderSimple"
    display_name = "Load Checkpoint"
    category = "loaders"
    description = "One of the server's models (GET /v1/models); nothing is loaded from a path."
    inputs = (Input("ckpt_name", "COMBO", options=lambda catalog: catalog.checkpoints),)
    outputs = (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"))

    def run(self, context: NodeContext, ckpt_name: str) -> tuple[Any, ...]:
        context.renderer.models.get(ckpt_name)  # a model the server no longer has fails here
        return ModelValue(ckpt_name), ModelValue(ckpt_name), ModelValue(ckpt_name)


@registered
class LoraLoader(Node):
    name = "LoraLoader"
    display_name = "Load LoRA"
    category = "loaders"
    inputs = (
        Input("model", "MODEL"),
        Input("clip", "CLIP"),
        Input("lora_name", "COMBO", options=lambda catalog: catalog.loras),
        Input("strength_model", "FLOAT", 1.0, -4.0, 4.0, 0.01),
        Input("strength_clip", "FLOAT", 1.0, -4.0, 4.0, 0.01),
    )
    outputs = (("MODEL", "MODEL"), ("CLIP", "CLIP"))

    def run(self, context: NodeContext, model: ModelValue, clip: ModelValue, lora_name: str, strength_model: float, strength_clip: float) -> tuple[Any, ...]:
        _check_lora(context, model.name, lora_name)
        return model.with_lora(lora_name, strength_model), clip.with_lora(lora_name, strength_clip)


@registered
class LoraLoaderModelOnly(Node):
    name = "LoraLoaderModelOnly"
    display_name = "Load LoRA (model only)"
    category = "loaders"
    inputs = (Input("model", "MODEL"), Input("lora_name", "COMBO", options=lambda catalog: catalog.loras), Input("strength_model", "FLOAT", 1.0, -4.0, 4.0, 0.01))
    outputs = (("MODEL", "MODEL"),)

    def run(self, context: NodeContext, model: ModelValue, lora_name: str, strength_model: float) -> tuple[Any, ...]:
        _check_lora(context, model.name, lora_name)
        return (model.with_lora(lora_name, strength_model),)


@registered
class CLIPTextEncode(Node):
    name = "CLIPTextEncode"
    display_name = "CLIP Text Encode (Prompt)"
    category = "conditioning"
    inputs = (Input("text", "STRING", "", multiline=True), Input("clip", "CLIP"))
    outputs = (("CONDITIONING", "CONDITIONING"),)

    def run(self, context: NodeContext, text: str, clip: ModelValue) -> tuple[Any, ...]:
        return (Conditioning(text, clip),)


@registered
class EmptyLatentImage(Node):
    name = "EmptyLatentImage"
    display_name = "Empty Latent Image"
    category = "latent"
    inputs = (
        Input("width", "INT", 512, 64, _max_width, 8),
        Input("height", "INT", 512, 64, _max_height, 8),
        Input("batch_size", "INT", 1, 1, MAX_BATCH),
    )
    outputs = (("LATENT", "LATENT"),)

    def run(self, context: NodeContext, width: int, height: int, batch_size: int) -> tuple[Any, ...]:
        return (Latent(torch.zeros(batch_size, 4, height // 8, width // 8), empty=True),)


@registered
class KSampler(Node):
    name = "KSampler"
    display_name = "KSampler"
    category = "sampling"
    description = "Denoises a latent with the model's UNet; denoise below 1 starts from the latent given."
    inputs = (
        Input("model", "MODEL"),
        Input("seed", "INT", 0, 0, MAX_SEED),
        Input("steps", "INT", 20, 1, 150),
        Input("cfg", "FLOAT", 8.0, 0.0, 30.0, 0.1),
        Input("sampler_name", "COMBO", options=tuple(SAMPLERS)),
        Input("scheduler", "COMBO", options=tuple(SIGMA_OPTIONS)),
        Input("positive", "CONDITIONING"),
        Input("negative", "CONDITIONING"),
        Input("latent_image", "LATENT"),
        Input("denoise", "FLOAT", 1.0, 0.0, 1.0, 0.01),
    )
    outputs = (("LATENT", "LATENT"),)

    def extra_checks(self, values: Mapping[str, Any], catalog: Catalog) -> list[dict[str, Any]]:
        sampler, spacing = values.get("sampler_name"), values.get("scheduler")
        if sampler is not None and spacing is not None and spacing not in sigma_spacings(SAMPLERS[sampler]):
            allowed = ", ".join(sigma_spacings(SAMPLERS[sampler]))
            return [
                {
                    "type": "value_not_in_list",
                    "message": "Value not in list",
                    "details": f"scheduler: {spacing!r} does not work with the {sampler} sampler here; one of {allowed}",
                    "extra_info": {"input_name": "scheduler", "received_value": spacing},
                }
            ]
        if values.get("denoise") == 0:
            return [{"type": "value_smaller_than_min", "message": "Value 0 smaller than min of 0.01", "details": "denoise", "extra_info": {"input_name": "denoise", "received_value": 0}}]
        return []

    def run(
        self,
        context: NodeContext,
        model: ModelValue,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        positive: Conditioning,
        negative: Conditioning,
        latent_image: Latent,
        denoise: float,
    ) -> tuple[Any, ...]:
        loaded = context.renderer.models.get(model.name)
        batch, _, latent_height, latent_width = latent_image.samples.shape
        scale = loaded.pipe.vae_scale_factor
        width, height = latent_width * scale, latent_height * scale
        context.check_size(width, height, "the sampled image")
        positive_parts = encode_prompts(loaded, [(positive.text, 1.0)], None, positive.clip.loras)
        negative_parts = encode_prompts(loaded, [(negative.text, 1.0)], None, negative.clip.loras)
        embeddings = (positive_parts[0], negative_parts[0]) + ((positive_parts[2], negative_parts[2]) if len(positive_parts) == 4 else ())
        from_noise = latent_image.empty and denoise >= 1.0 and latent_image.noise_mask is None
        mask = None
        if latent_image.noise_mask is not None:
            first = latent_image.noise_mask.reshape(-1, *latent_image.noise_mask.shape[-2:])[0]
            grey = (first.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            mask = np.asarray(Image.fromarray(grey).resize((width, height), Image.Resampling.BILINEAR))
        request = RenderRequest(
            prompt=positive.text,
            negative_prompt=negative.text,
            width=width,
            height=height,
            # ComfyUI runs `steps` steps whatever the denoise; diffusers runs steps × strength.
            steps=steps if from_noise else max(steps, int(steps / denoise)),
            scheduler=SAMPLERS[sampler_name],
            guidance_scale=cfg,
            seed=seed,
            batch_size=batch,
            strength=denoise,
            loras=model.loras,
            controls=positive.controls,
            model=model.name,
            embeddings=embeddings,
            init_latents=None if from_noise else latent_image.samples,
            sigmas=scheduler,  # type: ignore[arg-type]
            mask=mask,
        )
        samples = context.renderer.sample(request, context.on_step)
        return (Latent(samples.float().cpu()),)


@registered
class VAEDecode(Node):
    name = "VAEDecode"
    display_name = "VAE Decode"
    category = "latent"
    inputs = (Input("samples", "LATENT"), Input("vae", "VAE"))
    outputs = (("IMAGE", "IMAGE"),)

    @torch.inference_mode()
    def run(self, context: NodeContext, samples: Latent, vae: ModelValue) -> tuple[Any, ...]:
        loaded = context.renderer.models.get(vae.name)
        module = loaded.quality_vae
        factor = float(getattr(module.config, "scaling_factor", 1.0))
        decoded = []
        for latent in samples.samples:  # one at a time: a batch of large images fits in memory
            pixels = module.decode(latent[None].to(loaded.placement.device, module.dtype) / factor).sample
            decoded.append((pixels[0].float().cpu() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0))
        return (torch.stack(decoded),)


@registered
class VAEEncode(Node):
    name = "VAEEncode"
    display_name = "VAE Encode"
    category = "latent"
    inputs = (Input("pixels", "IMAGE"), Input("vae", "VAE"))
    outputs = (("LATENT", "LATENT"),)

    @torch.inference_mode()
    def run(self, context: NodeContext, pixels: torch.Tensor, vae: ModelValue) -> tuple[Any, ...]:
        loaded = context.renderer.models.get(vae.name)
        module = loaded.quality_vae
        factor = float(getattr(module.config, "scaling_factor", 1.0))
        height, width = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
        if height < 8 or width < 8:
            raise ValueError(f"an image of {pixels.shape[2]}x{pixels.shape[1]} is too small to encode")
        latents = []
        for image in pixels[:, :height, :width]:
            tensor = (image.permute(2, 0, 1)[None] * 2 - 1).to(loaded.placement.device, module.dtype)
            encoded = module.encode(tensor)
            latent = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
            latents.append(latent[0].float().cpu() * factor)
        return (Latent(torch.stack(latents)),)


@registered
class SetLatentNoiseMask(Node):
    name = "SetLatentNoiseMask"
    display_name = "Set Latent Noise Mask"
    category = "latent/inpaint"
    description = "The sampler repaints only where the mask is 1; elsewhere the latent is kept at every step."
    inputs = (Input("samples", "LATENT"), Input("mask", "MASK"))
    outputs = (("LATENT", "LATENT"),)

    def run(self, context: NodeContext, samples: Latent, mask: torch.Tensor) -> tuple[Any, ...]:
        return (Latent(samples.samples, samples.empty, mask.reshape(-1, *mask.shape[-2:]).float()),)


@registered
class VAEEncodeForInpaint(Node):
    name = "VAEEncodeForInpaint"
    display_name = "VAE Encode (for Inpainting)"
    category = "latent/inpaint"
    description = "Encodes the image with the masked area greyed out (grown by grow_mask_by pixels), and keeps the mask."
    inputs = (Input("pixels", "IMAGE"), Input("vae", "VAE"), Input("mask", "MASK"), Input("grow_mask_by", "INT", 6, 0, 64))
    outputs = (("LATENT", "LATENT"),)

    def run(self, context: NodeContext, pixels: torch.Tensor, vae: ModelValue, mask: torch.Tensor, grow_mask_by: int) -> tuple[Any, ...]:
        height, width = pixels.shape[1], pixels.shape[2]
        sized = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]).float(), size=(height, width), mode="bilinear")
        if grow_mask_by:
            sized = F.max_pool2d(sized, kernel_size=2 * grow_mask_by + 1, stride=1, padding=grow_mask_by)
        keep = (sized[:, 0] < 0.5).float()[..., None]
        greyed = pixels * keep + 0.5 * (1 - keep)
        (encoded,) = REGISTRY["VAEEncode"].run(context, pixels=greyed, vae=vae)
        return (Latent(encoded.samples, False, sized[:, 0].round()),)


@registered
class LoadImage(Node):
    name = "LoadImage"
    display_name = "Load Image"
    category = "image"
    description = "An image sent to POST /upload/image (as `name` or `subfolder/name`)."
    inputs = (Input("image", "COMBO", options=lambda catalog: catalog.images(), lookup=lambda catalog, name: catalog.has_image(name)),)
    outputs = (("IMAGE", "IMAGE"), ("MASK", "MASK"))

    def run(self, context: NodeContext, image: str) -> tuple[Any, ...]:
        with Image.open(io.BytesIO(context.images[image])) as opened:
            context.check_size(opened.width, opened.height, f"image {image!r}")
            rgba = opened.convert("RGBA")
            pixels = torch.from_numpy(np.asarray(rgba.convert("RGB"), dtype=np.float32) / 255.0)[None]
            has_alpha = "A" in opened.getbands() or "transparency" in opened.info
            alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        # ComfyUI's mask is 1 where the image is transparent (what to paint), 64×64 zeros without alpha.
        mask = torch.from_numpy(1.0 - alpha)[None] if has_alpha else torch.zeros(1, 64, 64)
        return pixels, mask


@registered
class SaveImage(Node):
    name = "SaveImage"
    display_name = "Save Image"
    category = "image"
    output_node = True
    inputs = (Input("images", "IMAGE"), Input("filename_prefix", "STRING", "ComfyUI"))
    outputs = ()

    def run(self, context: NodeContext, images: torch.Tensor, filename_prefix: str) -> tuple[Any, ...]:
        context.save(images, filename_prefix, "output")
        return ()


@registered
class PreviewImage(Node):
    name = "PreviewImage"
    display_name = "Preview Image"
    category = "image"
    output_node = True
    inputs = (Input("images", "IMAGE"),)
    outputs = ()

    def run(self, context: NodeContext, images: torch.Tensor) -> tuple[Any, ...]:
        context.save(images, "ComfyUI_temp", "temp")
        return ()


@registered
class ImageScale(Node):
    name = "ImageScale"
    display_name = "Upscale Image"
    category = "image/upscaling"
    description = "Resize to width × height (0 keeps the aspect ratio from the other side)."
    inputs = (
        Input("image", "IMAGE"),
        Input("upscale_method", "COMBO", options=SCALING),
        Input("width", "INT", 512, 0, _max_width, 1),
        Input("height", "INT", 512, 0, _max_height, 1),
        Input("crop", "COMBO", options=CROPS),
    )
    outputs = (("IMAGE", "IMAGE"),)

    def run(self, context: NodeContext, image: torch.Tensor, upscale_method: str, width: int, height: int, crop: str) -> tuple[Any, ...]:
        width, height = _target_size(image.shape[2], image.shape[1], width, height)
        context.check_size(width, height, "the scaled image")
        return (_scale_images(image, upscale_method, width, height, crop),)


@registered
class ImageScaleBy(Node):
    name = "ImageScaleBy"
    display_name = "Upscale Image By"
    category = "image/upscaling"
    inputs = (Input("image", "IMAGE"), Input("upscale_method", "COMBO", options=SCALING), Input("scale_by", "FLOAT", 1.0, 0.01, 8.0, 0.01))
    outputs = (("IMAGE", "IMAGE"),)

    def run(self, context: NodeContext, image: torch.Tensor, upscale_method: str, scale_by: float) -> tuple[Any, ...]:
        width, height = max(1, round(image.shape[2] * scale_by)), max(1, round(image.shape[1] * scale_by))
        context.check_size(width, height, "the scaled image")
        return (_scale_images(image, upscale_method, width, height, "disabled"),)


@registered
class UpscaleModelLoader(Node):
    name = "UpscaleModelLoader"
    display_name = "Load Upscale Model"
    category = "loaders"
    description = "One of the server's super-resolution networks (--upscaler NAME=PATH); nothing is loaded from a path."
    inputs = (Input("model_name", "COMBO", options=lambda catalog: catalog.upscale_models),)
    outputs = (("UPSCALE_MODEL", "UPSCALE_MODEL"),)

    def run(self, context: NodeContext, model_name: str) -> tuple[Any, ...]:
        _network(context, model_name)  # a network the server no longer has fails here
        return (model_name,)


@registered
class ImageUpscaleWithModel(Node):
    name = "ImageUpscaleWithModel"
    display_name = "Upscale Image (using Model)"
    category = "image/upscaling"
    description = "The image made larger by the network's own factor (x2, x4), tile by tile."
    inputs = (Input("upscale_model", "UPSCALE_MODEL"), Input("image", "IMAGE"))
    outputs = (("IMAGE", "IMAGE"),)

    def run(self, context: NodeContext, upscale_model: str, image: torch.Tensor) -> tuple[Any, ...]:
        network = _network(context, upscale_model)
        width, height = image.shape[2] * network.scale, image.shape[1] * network.scale
        context.check_size(width, height, "the upscaled image")
        larger = [
            np.asarray(super_resolve(network, Image.fromarray(array), width, height, context.on_step), dtype=np.float32) / 255.0
            for array in _to_uint8(image)
        ]
        return (torch.from_numpy(np.stack(larger)),)


@registered
class LatentUpscale(Node):
    name = "LatentUpscale"
    display_name = "Upscale Latent"
    category = "latent"
    inputs = (
        Input("samples", "LATENT"),
        Input("upscale_method", "COMBO", options=SCALING[:4]),
        Input("width", "INT", 512, 0, _max_width, 8),
        Input("height", "INT", 512, 0, _max_height, 8),
        Input("crop", "COMBO", options=CROPS),
    )
    outputs = (("LATENT", "LATENT"),)

    def run(self, context: NodeContext, samples: Latent, upscale_method: str, width: int, height: int, crop: str) -> tuple[Any, ...]:
        latent = samples.samples
        width, height = _target_size(latent.shape[3] * 8, latent.shape[2] * 8, width, height)
        context.check_size(width, height, "the upscaled latent")
        scaled = _scale_nchw(_cropped(latent, width / height, crop), upscale_method, max(1, width // 8), max(1, height // 8))
        return (Latent(scaled, samples.empty),)


@registered
class LatentUpscaleBy(Node):
    name = "LatentUpscaleBy"
    display_name = "Upscale Latent By"
    category = "latent"
    inputs = (Input("samples", "LATENT"), Input("upscale_method", "COMBO", options=SCALING[:4]), Input("scale_by", "FLOAT", 1.5, 0.01, 8.0, 0.01))
    outputs = (("LATENT", "LATENT"),)

    def run(self, context: NodeContext, samples: Latent, upscale_method: str, scale_by: float) -> tuple[Any, ...]:
        latent = samples.samples
        width, height = max(1, round(latent.shape[3] * scale_by)), max(1, round(latent.shape[2] * scale_by))
        context.check_size(width * 8, height * 8, "the upscaled latent")
        return (Latent(_scale_nchw(latent, upscale_method, width, height), samples.empty),)


@registered
class ControlNetLoader(Node):
    name = "ControlNetLoader"
    display_name = "Load ControlNet Model"
    category = "loaders"
    description = "One of the server's ControlNets (--controlnet NAME=PATH)."
    inputs = (Input("control_net_name", "COMBO", options=lambda catalog: catalog.controlnets),)
    outputs = (("CONTROL_NET", "CONTROL_NET"),)

    def run(self, context: NodeContext, control_net_name: str) -> tuple[Any, ...]:
        return (control_net_name,)


@registered
class ControlNetApply(Node):
    name = "ControlNetApply"
    display_name = "Apply ControlNet (old)"
    category = "conditioning/controlnet"
    inputs = (Input("conditioning", "CONDITIONING"), Input("control_net", "CONTROL_NET"), Input("image", "IMAGE"), Input("strength", "FLOAT", 1.0, 0.0, 10.0, 0.01))
    outputs = (("CONDITIONING", "CONDITIONING"),)

    def run(self, context: NodeContext, conditioning: Conditioning, control_net: str, image: torch.Tensor, strength: float) -> tuple[Any, ...]:
        return (_with_control(context, conditioning, control_net, image, strength, 0.0, 1.0),)


@registered
class ControlNetApplyAdvanced(Node):
    name = "ControlNetApplyAdvanced"
    display_name = "Apply ControlNet"
    category = "conditioning/controlnet"
    inputs = (
        Input("positive", "CONDITIONING"),
        Input("negative", "CONDITIONING"),
        Input("control_net", "CONTROL_NET"),
        Input("image", "IMAGE"),
        Input("strength", "FLOAT", 1.0, 0.0, 10.0, 0.01),
        Input("start_percent", "FLOAT", 0.0, 0.0, 1.0, 0.001),
        Input("end_percent", "FLOAT", 1.0, 0.0, 1.0, 0.001),
        Input("vae", "VAE", optional=True),
    )
    outputs = (("CONDITIONING", "positive"), ("CONDITIONING", "negative"))

    def extra_checks(self, values: Mapping[str, Any], catalog: Catalog) -> list[dict[str, Any]]:
        if values.get("start_percent", 0.0) >= values.get("end_percent", 1.0):
            return [{"type": "value_not_valid", "message": "start_percent must be below end_percent", "details": f"start_percent {values['start_percent']}, end_percent {values['end_percent']}", "extra_info": {"input_name": "start_percent"}}]
        return []

    def run(
        self,
        context: NodeContext,
        positive: Conditioning,
        negative: Conditioning,
        control_net: str,
        image: torch.Tensor,
        strength: float,
        start_percent: float,
        end_percent: float,
        vae: ModelValue | None = None,
    ) -> tuple[Any, ...]:
        # diffusers applies a ControlNet's residuals to both halves of the guidance batch, which is what
        # ComfyUI does with this pair; the negative conditioning passes through unchanged.
        return _with_control(context, positive, control_net, image, strength, start_percent, end_percent), negative


# --- helpers ----------------------------------------------------------------------------------------


def _network(context: NodeContext, name: str) -> SuperResolution:
    for _, model in context.renderer.models:
        if name in model.upscalers.networks:
            return model.upscalers.networks[name]
    raise ValueError(f"the server has no upscale model {name!r}")


def _check_lora(context: NodeContext, model: str, lora: str) -> None:
    names = context.renderer.models.get(model).adapters.names
    if lora not in names:
        raise ValueError(f"the model {model!r} has no LoRA {lora!r} (it has: {', '.join(names) or 'none'})")


def _with_control(context: NodeContext, conditioning: Conditioning, net: str, image: torch.Tensor, strength: float, start: float, end: float) -> Conditioning:
    names = context.renderer.models.get(conditioning.clip.name).controlnets.names
    if net not in names:
        raise ValueError(f"the model {conditioning.clip.name!r} has no ControlNet {net!r} (it has: {', '.join(names) or 'none'})")
    control = RenderControl(net, strength, start, end, _to_uint8(image[:1])[0])
    return Conditioning(conditioning.text, conditioning.clip, conditioning.controls + (control,))


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def _target_size(width: int, height: int, wanted_width: int, wanted_height: int) -> tuple[int, int]:
    if wanted_width == 0 and wanted_height == 0:
        return width, height
    if wanted_width == 0:
        return max(1, round(width * wanted_height / height)), wanted_height
    if wanted_height == 0:
        return wanted_width, max(1, round(height * wanted_width / width))
    return wanted_width, wanted_height


def _cropped(nchw: torch.Tensor, aspect: float, crop: str) -> torch.Tensor:
    """Center crop to the target's aspect ratio (ComfyUI's crop="center"), or nothing."""
    if crop != "center":
        return nchw
    height, width = nchw.shape[2:]
    if width / height > aspect:
        keep = max(1, round(height * aspect))
        left = (width - keep) // 2
        return nchw[:, :, :, left : left + keep]
    keep = max(1, round(width / aspect))
    top = (height - keep) // 2
    return nchw[:, :, top : top + keep, :]


def _scale_nchw(nchw: torch.Tensor, method: str, width: int, height: int) -> torch.Tensor:
    if method == "lanczos":
        scaled = []
        for image in nchw:
            pil = Image.fromarray((image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))
            pil = pil.resize((width, height), Image.Resampling.LANCZOS)
            scaled.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1))
        return torch.stack(scaled)
    mode = {"nearest-exact": "nearest-exact", "bilinear": "bilinear", "area": "area", "bicubic": "bicubic"}[method]
    options = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(nchw, size=(height, width), mode=mode, **options)


def _scale_images(images: torch.Tensor, method: str, width: int, height: int, crop: str) -> torch.Tensor:
    nchw = _cropped(images.permute(0, 3, 1, 2), width / height, crop)
    return _scale_nchw(nchw, method, width, height).clamp(0, 1).permute(0, 2, 3, 1)
