"""Per-session StreamDiffusion state over shared model weights.

`StreamPipeline` is the small interface the session layer drives:

    stream = StreamPipeline(model, width=256, height=256)
    stream.configure(StreamParams(prompt="a red house", strength=0.5), img2img=True)
    result = stream.render(canvas_rgb, tag=input_seq)   # off the event loop

Every session owns one: its latent buffers, noise, prompt embeddings and generator are never shared, so
two people's canvases cannot bleed into each other's frames. The weights (UNet, VAE, text encoder) are
shared read-only across all sessions.

The denoising itself is the `streamdiffusion` package's (stream batch, residual CFG, the similar-image
filter). Upstream's frame call is CUDA-only (it times itself with `torch.cuda.Event`), and its
`prepare()` re-encodes the prompt on every change; `_SessionStream` replaces those two entry points and
keeps the rest of the library's loop as it is.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar, get_args

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from streamdiffusion import StreamDiffusion

from streamcanvas.trt_engines.components import size_ids

from .adapters import LORA_WEIGHT_RANGE, MAX_ACTIVE_LORAS, LoraWeights
from .controls import MAX_CONTROLS, ControlRows, ControlSpec, control_tensor, controlled_unet, merge_rows, preprocess
from .errors import NO_DEPTH_MODEL, InvalidParameter, UnknownName, quoted
from .loading import LoadedModel

logger = logging.getLogger(__name__)

T = TypeVar("T")
CfgType = Literal["none", "full", "self", "initialize"]
CFG_TYPES: tuple[str, ...] = get_args(CfgType)

SCHEDULE_STEPS = 50
"""Length of the LCM schedule that t_index_list indexes into (as in StreamDiffusion's examples)."""

MAX_STEPS = 4
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1


def nth_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a batch: seed + index, which wraps round to 0 past MAX_SEED, so that
    every image's seed can be sent again (ComfyUI's seeds, up to 2**63 - 1, just add: torch takes 64 bits)."""
    return (seed + index) % (MAX_SEED + 1) if seed <= MAX_SEED else seed + index


PromptText = str | tuple[tuple[str, float], ...]
"""A prompt, or weighted prompts ((text, weight), ...) whose embeddings are mixed by weight."""

MAX_PROMPTS = 8
MAX_TRANSITION_FRAMES = 240
MAX_FEEDBACK = 0.9


@dataclass(frozen=True)
class StreamParams:
    """Everything a client can change while streaming. Invalid values raise InvalidParameter.

    Lists and maps from the wire (weighted prompts, LoRA weights, controls) are accepted as they come
    and kept as tuples, so that parameters stay hashable and comparable."""

    prompt: PromptText = ""
    negative_prompt: str = ""
    prompt_template: str = "{prompt}"
    """Wraps every prompt: "{prompt}" is replaced by it (style presets set this)."""
    style: str = ""
    """The style preset these parameters came from, if any (applied by the session; informational here)."""
    strength: float = 0.5
    steps: int = 2
    seed: int = 2
    guidance_scale: float = 1.2
    delta: float = 1.0
    cfg_type: CfgType = "self"
    denoising_batch: bool = True
    similar_filter: bool = False
    similar_threshold: float = 0.98
    transition_frames: int = 0
    """Frames over which a new prompt's embeddings (and a new seed's noise) are blended in; 0 snaps."""
    loras: LoraWeights = ()
    controls: tuple[ControlSpec, ...] = ()
    feedback: float = 0.0
    """Temporal consistency for webcam input: each input's latent is averaged with the ones before it,
    which weigh this much (0 = off)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt", _prompt(self.prompt))
        object.__setattr__(self, "loras", _loras(self.loras))
        controls = self.controls
        if not isinstance(controls, (list, tuple)):
            raise InvalidParameter("controls", f"must be an array of control maps, got {type(controls).__name__}")
        if len(controls) > MAX_CONTROLS:
            raise InvalidParameter("controls", f"at most {MAX_CONTROLS} controls, got {len(controls)}")
        object.__setattr__(self, "controls", tuple(ControlSpec.parse(control) for control in controls))
        for name in ("negative_prompt", "prompt_template", "style"):
            if not isinstance(getattr(self, name), str):
                raise InvalidParameter(name, "must be a string")
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise InvalidParameter(name, f"longer than {MAX_PROMPT_CHARS} characters")
        _check_range("strength", self.strength, 0.02, 1.0)
        _check_range("steps", self.steps, 1, MAX_STEPS)
        _check_range("seed", self.seed, 0, MAX_SEED)
        _check_range("guidance_scale", self.guidance_scale, 0.0, 20.0)
        _check_range("delta", self.delta, 0.0, 5.0)
        _check_range("similar_threshold", self.similar_threshold, 0.0, 1.0)
        _check_range("transition_frames", self.transition_frames, 0, MAX_TRANSITION_FRAMES)
        _check_range("feedback", self.feedback, 0.0, MAX_FEEDBACK)
        if self.cfg_type not in CFG_TYPES:
            raise InvalidParameter("cfg_type", f"{quoted(self.cfg_type)} is not one of {', '.join(CFG_TYPES)}")
        if self.cfg_type == "full" and not self.denoising_batch:
            # streamdiffusion 0.1.1 raises UnboundLocalError in prepare() for this combination.
            raise InvalidParameter("cfg_type", "'full' needs denoising_batch=true")

    def replace(self, **changes: object) -> StreamParams:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidParameter(sorted(unknown)[0], "unknown parameter")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def t_index_list(self, img2img: bool) -> list[int]:
        """Indices into the 50-step LCM schedule: strength picks the first, steps how many."""
        start = 0 if not img2img else min(SCHEDULE_STEPS - 1, round(SCHEDULE_STEPS * (1.0 - self.strength)))
        span = SCHEDULE_STEPS - start
        return sorted({start + (index * span) // self.steps for index in range(self.steps)})

    @property
    def active_loras(self) -> LoraWeights:
        """The LoRAs with a weight other than 0 (a weight of 0 is the same as leaving one out)."""
        return tuple(pair for pair in self.loras if pair[1] != 0)

    def prompts(self) -> list[tuple[str, float]]:
        """The prompt as (text, weight) pairs, each wrapped in the template."""
        pairs = [(self.prompt, 1.0)] if isinstance(self.prompt, str) else list(self.prompt)
        return [(self.prompt_template.replace("{prompt}", text), weight) for text, weight in pairs]

    def as_wire(self) -> dict[str, object]:
        """These parameters as the protocol writes them (maps and arrays, as a client sends them)."""
        wire = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        wire["prompt"] = self.prompt if isinstance(self.prompt, str) else [list(pair) for pair in self.prompt]
        wire["loras"] = dict(self.loras)
        wire["controls"] = [dataclasses.asdict(control) for control in self.controls]
        return wire


def _prompt(value: object) -> PromptText:
    if isinstance(value, str):
        if len(value) > MAX_PROMPT_CHARS:
            raise InvalidParameter("prompt", f"longer than {MAX_PROMPT_CHARS} characters")
        return value
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_PROMPTS:
        raise InvalidParameter("prompt", f"must be a string or 1 to {MAX_PROMPTS} [text, weight] pairs")
    pairs = []
    for entry in value:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or isinstance(entry[1], bool)
            or not isinstance(entry[1], (int, float))
        ):
            raise InvalidParameter("prompt", f"each weighted prompt must be [text, weight], got {entry!r:.80}")
        text, weight = entry
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidParameter("prompt", f"longer than {MAX_PROMPT_CHARS} characters")
        if not 0.0 <= weight <= 100.0:
            raise InvalidParameter("prompt", f"weight {weight} is outside [0, 100]")
        pairs.append((text, float(weight)))
    if sum(weight for _, weight in pairs) <= 0:
        raise InvalidParameter("prompt", "the weights of a weighted prompt must not all be 0")
    return tuple(pairs)


def _loras(value: object) -> LoraWeights:
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(item, (list, tuple)) and len(item) == 2 for item in value):
        items = [tuple(item) for item in value]
    else:
        raise InvalidParameter("loras", f"must be a map of LoRA name to weight, got {type(value).__name__}")
    if len(items) > MAX_ACTIVE_LORAS:
        raise InvalidParameter("loras", f"at most {MAX_ACTIVE_LORAS} LoRAs at once, got {len(items)}")
    low, high = LORA_WEIGHT_RANGE
    for name, weight in items:
        if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise InvalidParameter("loras", "must be a map of LoRA name (a string) to weight (a number)")
        if not low <= weight <= high:
            raise InvalidParameter("loras", f"weight of {quoted(name)} is {quoted(weight)}, outside [{low}, {high}]")
    return tuple(sorted((name, float(weight)) for name, weight in items))


def _check_range(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(name, f"must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidParameter(name, f"{value} is outside [{low}, {high}]")


@dataclass(frozen=True)
class RenderResult:
    image: np.ndarray | None
    """H×W×3 uint8 RGB, or None when the similar-image filter skipped this input."""
    answers: int
    """Tag of the newest input this frame fully reflects (the stream batch delays inputs by depth-1)."""
    inference_ms: float


class _SessionStream(StreamDiffusion):
    """StreamDiffusion with the prompt prepared separately and a device-agnostic frame call."""

    def prepare_stream(self, generator: torch.Generator, guidance_scale: float, delta: float) -> None:
        """Noise, timesteps and LCM scalings: what upstream's prepare() does, minus the prompt."""
        self.generator = generator
        self.added_conditions: dict[str, torch.Tensor] | None = None
        self.guidance_scale = 1.0 if self.cfg_type == "none" else guidance_scale
        self.delta = delta
        latent_shape = (4, self.latent_height, self.latent_width)
        if self.denoising_steps_num > 1:
            self.x_t_latent_buffer = torch.zeros(
                ((self.denoising_steps_num - 1) * self.frame_bff_size, *latent_shape),
                dtype=self.dtype,
                device=self.device,
            )
        else:
            self.x_t_latent_buffer = None
        self.scheduler.set_timesteps(SCHEDULE_STEPS, self.device)
        self.timesteps = self.scheduler.timesteps.to(self.device)
        self.sub_timesteps = [self.timesteps[index] for index in self.t_list]
        repeats = self.frame_bff_size if self.use_denoising_batch else 1
        self.sub_timesteps_tensor = torch.repeat_interleave(
            torch.tensor(self.sub_timesteps, dtype=torch.long, device=self.device), repeats=repeats, dim=0
        )
        self.init_noise = torch.randn((self.batch_size, *latent_shape), generator=generator).to(
            device=self.device, dtype=self.dtype
        )
        self.stock_noise = torch.zeros_like(self.init_noise)

        scalings = [self.scheduler.get_scalings_for_boundary_condition_discrete(t) for t in self.sub_timesteps]
        steps = len(self.t_list)
        self.c_skip = self._column([c_skip for c_skip, _ in scalings], steps)
        self.c_out = self._column([c_out for _, c_out in scalings], steps)
        alphas = self.scheduler.alphas_cumprod
        alpha_sqrt = self._column([alphas[t].sqrt() for t in self.sub_timesteps], steps)
        beta_sqrt = self._column([(1 - alphas[t]).sqrt() for t in self.sub_timesteps], steps)
        self.alpha_prod_t_sqrt = torch.repeat_interleave(alpha_sqrt, repeats=repeats, dim=0)
        self.beta_prod_t_sqrt = torch.repeat_interleave(beta_sqrt, repeats=repeats, dim=0)

    def _column(self, values: list, steps: int) -> torch.Tensor:
        stacked = torch.stack([torch.as_tensor(value) for value in values])
        return stacked.view(steps, 1, 1, 1).to(dtype=self.dtype, device=self.device)

    def set_prompt_embeddings(
        self,
        conditional: torch.Tensor,
        unconditional: torch.Tensor,
        pooled: torch.Tensor | None = None,
        unconditional_pooled: torch.Tensor | None = None,
    ) -> None:
        """Arrange already-encoded prompt embeddings for the stream batch and CFG mode (for SDXL also the
        pooled embeddings and size ids of the UNet's added conditioning, row for row the same)."""
        self.prompt_embeds = self._arranged(conditional, unconditional)
        self.added_conditions = None
        if pooled is not None and unconditional_pooled is not None:
            text_embeds = self._arranged(pooled, unconditional_pooled)
            time_ids = size_ids(self.height, self.width, text_embeds.shape[0], text_embeds.device, text_embeds.dtype)
            self.added_conditions = {"text_embeds": text_embeds, "time_ids": time_ids}

    def _arranged(self, conditional: torch.Tensor, unconditional: torch.Tensor) -> torch.Tensor:
        repeats = [1] * (conditional.dim() - 1)
        rows = conditional.repeat(self.batch_size, *repeats)
        if self.guidance_scale > 1.0 and self.cfg_type == "full":
            return torch.cat([unconditional.repeat(self.batch_size, *repeats), rows], dim=0)
        if self.guidance_scale > 1.0 and self.cfg_type == "initialize":
            return torch.cat([unconditional.repeat(self.frame_bff_size, *repeats), rows], dim=0)
        return rows

    # One denoising-batch step, split around its UNet call so that several sessions' steps can share
    # one call (`render_together`). `finish_step(unet(*unet_inputs(x)))` is `predict_x0_batch(x)`.

    def unet_inputs(self, x_t_latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's UNet batch: (latents, timesteps, prompt embeddings), CFG rows included."""
        if not self.use_denoising_batch:
            raise RuntimeError("only a denoising-batch stream splits its step around the UNet call")
        if self.denoising_steps_num > 1:
            x_t_latent = torch.cat((x_t_latent, self.x_t_latent_buffer), dim=0)
            self.stock_noise = torch.cat((self.init_noise[0:1], self.stock_noise[:-1]), dim=0)
        self._step_latent = x_t_latent
        timesteps = self.sub_timesteps_tensor
        latents = x_t_latent
        if self.guidance_scale > 1.0 and self.cfg_type == "initialize":
            latents, timesteps = torch.cat([latents[0:1], latents]), torch.cat([timesteps[0:1], timesteps])
        elif self.guidance_scale > 1.0 and self.cfg_type == "full":
            latents, timesteps = torch.cat([latents, latents]), torch.cat([timesteps, timesteps])
        return latents, timesteps, self.prompt_embeds

    def finish_step(self, model_pred: torch.Tensor) -> torch.Tensor:
        """The rest of the step, given the UNet's output for `unet_inputs`: the newest finished x0."""
        x_t_latent = self._step_latent
        # Upstream's unet_step does the CFG arithmetic, the scheduler step and the stock noise; it is
        # handed the UNet output already computed instead of calling the UNet again.
        unet = self.unet
        self.unet = _Computed(model_pred)
        try:
            x0_batch, _ = self.unet_step(x_t_latent, self.sub_timesteps_tensor)
        finally:
            self.unet = unet
        if self.denoising_steps_num == 1:
            self.x_t_latent_buffer = None
            return x0_batch
        buffer = self.alpha_prod_t_sqrt[1:] * x0_batch[:-1]
        if self.do_add_noise:
            buffer = buffer + self.beta_prod_t_sqrt[1:] * self.init_noise[1:]
        self.x_t_latent_buffer = buffer
        return x0_batch[-1].unsqueeze(0)

    def encode_image(self, image_tensors: torch.Tensor) -> torch.Tensor:
        return self.noised(encode_latents(self.vae, image_tensors))

    def noised(self, latent: torch.Tensor) -> torch.Tensor:
        """An encoded canvas, noised to the stream's first timestep."""
        return self.add_noise(latent, self.init_noise[0], 0)


def encode_latents(vae: object, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled latents of a batch of images in [-1, 1]. The latent distribution's mode instead of a
    sample: same canvas, same latent, less flicker."""
    pixels = pixels.to(dtype=vae.dtype)  # type: ignore[attr-defined]
    return retrieve_latents(vae.encode(pixels), sample_mode="argmax") * vae.config.scaling_factor  # type: ignore[attr-defined]


class _Computed:
    """Stands in for the UNet inside `finish_step`: answers with the output computed already."""

    def __init__(self, output: torch.Tensor) -> None:
        self.output = output

    def __call__(self, *args: object, **kwargs: object) -> tuple[torch.Tensor]:
        return (self.output,)


@dataclass
class PendingFrame:
    """A frame begun by `StreamPipeline.begin`, waiting for its UNet calls: `primes` steps that push
    the latent into the stream batch (after an idle spell), then the step that renders the frame."""

    stream: StreamPipeline
    latent: torch.Tensor | None
    """None until the canvas in `pixels` is encoded (with the other streams' canvases)."""
    primes: int
    started: float
    pixels: torch.Tensor | None = None


@dataclass
class _Blend:
    """A transition in progress: prompt embeddings (and seed noise) moving from one value to another
    over `frames` frames, then held while the stream batch fills with the end value."""

    frames: int
    embeddings_from: tuple[torch.Tensor, ...]
    embeddings_to: tuple[torch.Tensor, ...]
    noise_from: tuple[torch.Tensor, torch.Tensor] | None = None
    noise_to: tuple[torch.Tensor, torch.Tensor] | None = None
    answered: int | None = None
    """The input the frames answered when the transition began: until it is over, they answer no newer
    one (an input is answered by the first frame that fully shows it, and a blend shows it part-way)."""
    done: int = 0

    def embeddings(self) -> tuple[torch.Tensor, ...]:
        if self.done >= self.frames:
            return self.embeddings_to
        share = self.done / self.frames
        return tuple(torch.lerp(a, b, share) for a, b in zip(self.embeddings_from, self.embeddings_to))

    def noise(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.noise_from is None or self.noise_to is None:
            return None
        if self.done >= self.frames:
            return self.noise_to
        share = self.done / self.frames
        return tuple(slerp(a, b, share) for a, b in zip(self.noise_from, self.noise_to))  # type: ignore[return-value]


def slerp(a: torch.Tensor, b: torch.Tensor, share: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors, row by row: the result keeps the norm (so the
    statistics) of Gaussian noise, which a straight line between two samples does not."""
    flat_a, flat_b = a.reshape(a.shape[0], -1).float(), b.reshape(b.shape[0], -1).float()
    cosine = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp_min(1e-12)
    omega = torch.arccos(cosine.clamp(-1.0, 1.0)).unsqueeze(1)
    sine = torch.sin(omega)
    straight = sine.abs() < 1e-6
    mixed = (torch.sin((1 - share) * omega) * flat_a + torch.sin(share * omega) * flat_b) / sine.where(~straight, torch.ones_like(sine))
    mixed = torch.where(straight, torch.lerp(flat_a, flat_b, share), mixed)
    return mixed.reshape(a.shape).to(a.dtype)


class _StreamUNet:
    """The stream's UNet with what upstream's step does not pass it: the ControlNets' residuals, and
    SDXL's added conditioning (both per row, as `control_rows` and `set_prompt_embeddings` built them)."""

    def __init__(self, unet: object, pipeline: StreamPipeline) -> None:
        self.unet = unet
        self.pipeline = pipeline

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor, **_: object) -> tuple[torch.Tensor]:
        stream = self.pipeline._stream
        assert stream is not None
        controls = self.pipeline.control_rows(timesteps, latents.shape[0])
        return (controlled_unet(self.unet, latents, timesteps, encoder_hidden_states, controls, stream.added_conditions),)


class StreamPipeline:
    """One session's img2img / txt2img stream. Not thread-safe: one worker thread drives it."""

    def __init__(self, model: LoadedModel, width: int, height: int) -> None:
        scale = model.pipe.vae_scale_factor
        if width % scale or height % scale:
            raise InvalidParameter("resolution", f"{width}x{height} is not a multiple of {scale}")
        self.model = model
        self.width = width
        self.height = height
        self.params: StreamParams | None = None
        self.img2img = True
        self.prompt_encodings = 0
        self._stream: _SessionStream | None = None
        self.backend = "torch"
        """What runs this stream's UNet and VAE: the model's backend, or torch where its engines do not
        cover this stream's size or batch (or its controls and LoRAs, which only torch's UNet takes)."""
        self._embeddings: tuple[torch.Tensor, ...] | None = None
        self._embedded_prompt: tuple[object, ...] | None = None
        self._noise: torch.Tensor | None = None
        self._blend: _Blend | None = None
        self._controls: list[tuple[ControlSpec, object, list[bool]]] = []
        self._control_images: list[torch.Tensor | None] = []
        self._controls_prepared_for: int | None = None
        """The input whose control images `_control_images` holds (a flush renders the same one again)."""
        self._step_of: dict[int, int] = {}
        self._previous_latent: torch.Tensor | None = None
        self._primed = False
        self._fed: collections.deque[int] = collections.deque(maxlen=MAX_STEPS)

    @property
    def depth(self) -> int:
        """How many frames an input takes to pass through the stream batch."""
        if self._stream is None or not self._stream.use_denoising_batch:
            return 1
        return self._stream.denoising_steps_num

    @property
    def settled(self) -> bool:
        """True once the newest input fed has been fully denoised into a frame (and any transition has
        played out): until then the slot renders the same input again."""
        return self._primed and len(set(self._fed)) <= 1 and self._blend is None

    def configure(self, params: StreamParams, img2img: bool) -> None:
        """Apply new parameters, redoing only what they invalidate (the model is never reloaded)."""
        previous = self.params
        self.model.adapters.check(params.loras)
        controls = [(spec, self.model.controlnets.get(spec.model)) for spec in params.controls]
        if self.model.depth is None and any(spec.preprocessor == "depth" for spec in params.controls):
            raise UnknownName("controls", NO_DEPTH_MODEL)
        seed_changed = previous is not None and params.seed != previous.seed
        blend_seed = seed_changed and params.transition_frames > 0
        rebuild = (
            previous is None
            or img2img != self.img2img
            or params.t_index_list(img2img) != previous.t_index_list(self.img2img)
            or (params.cfg_type, params.denoising_batch) != (previous.cfg_type, previous.denoising_batch)
            or (seed_changed and not blend_seed)
        )
        # Where a transition starts, taken before a rebuild (new steps, strength or CFG) starts a new stream:
        # the prompt's embeddings, the seed's noise, and the input the frames answer until it is over.
        embeddings_from = self._current_embeddings()
        noise_from = self._current_noise() if blend_seed else None
        answered = self._blend.answered if self._blend is not None else (self._fed[0] if self._fed else None)
        self.params = params
        self.img2img = img2img
        prompt_key = (tuple(params.prompts()), params.negative_prompt, params.active_loras)
        prompt_changed = prompt_key != self._embedded_prompt
        if prompt_changed:
            self._embeddings = self._encode_prompt(params)
            self._embedded_prompt = prompt_key
        if rebuild:
            self._build_stream(params, img2img)
            if self._blend is not None:
                self._blend.noise_from = self._blend.noise_to = None  # the new stream's noise is its own
        else:
            assert self._stream is not None
            self._stream.guidance_scale = 1.0 if params.cfg_type == "none" else params.guidance_scale
            self._stream.delta = params.delta
        stream = self._stream
        assert stream is not None and self._embeddings is not None
        self._use_backend(stream, params, controls)
        if not params.transition_frames:
            if self._blend is not None and self._blend.noise_to is not None:
                stream.init_noise, self._noise = self._blend.noise_to  # a blend cut short lands where it was going
            self._blend = None
        elif prompt_changed or noise_from is not None:
            self._start_blend(params, embeddings_from, noise_from, stream, answered)
        stream.set_prompt_embeddings(*(self._blend.embeddings() if self._blend else self._embeddings))
        if params.similar_filter:
            stream.enable_similar_image_filter(params.similar_threshold)
        else:
            stream.disable_similar_image_filter()
        if previous is not None and previous.replace(similar_filter=params.similar_filter, similar_threshold=params.similar_threshold) != params:
            # New parameters change the frame of an unchanged input: the filter must let the next input
            # through, or a still canvas would never show them (it compares inputs, not what they render).
            stream.similar_filter.prev_tensor = None
            stream.similar_filter.skip_count = 0
        if not params.feedback:
            self._previous_latent = None

    def _current_embeddings(self) -> tuple[torch.Tensor, ...] | None:
        if self._blend is not None:
            return self._blend.embeddings()
        return self._embeddings

    def _current_noise(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._blend is not None and (noise := self._blend.noise()) is not None:
            return noise
        if self._stream is None or self._noise is None:
            return None
        return self._stream.init_noise, self._noise

    def _start_blend(
        self,
        params: StreamParams,
        embeddings_from: tuple[torch.Tensor, ...] | None,
        noise_from: tuple[torch.Tensor, torch.Tensor] | None,
        stream: _SessionStream,
        answered: int | None,
    ) -> None:
        """Blend from where the stream was towards its new prompt (and seed) over `transition_frames`."""
        assert self._embeddings is not None
        noise_to = self._seed_noise(params.seed, stream) if noise_from is not None else None
        if noise_from is not None and noise_to is not None:
            if [tensor.shape for tensor in noise_from] != [tensor.shape for tensor in noise_to]:
                noise_from = noise_to = None  # new steps make a deeper or shallower stream batch: the seed cuts in
            else:
                stream.init_noise, self._noise = noise_from  # a rebuilt stream starts at its new seed: go back
        if noise_from is None and self._blend is not None and self._blend.noise_to is not None:
            # A prompt change while a seed change is still blending in: the noise goes on to the new seed.
            noise_from, noise_to = self._blend.noise(), self._blend.noise_to
        if embeddings_from is None:  # the first configure: nothing to blend from
            self._blend = None
            return
        self._blend = _Blend(params.transition_frames, embeddings_from, self._embeddings, noise_from, noise_to, answered)

    def _advance_blend(self) -> None:
        """One frame further into the transition (called as each frame is fed)."""
        blend, stream = self._blend, self._stream
        if blend is None or stream is None:
            return
        blend.done += 1
        stream.set_prompt_embeddings(*blend.embeddings())
        if (noise := blend.noise()) is not None:
            stream.init_noise, self._noise = noise
        if blend.done >= blend.frames + self.depth - 1:
            self._blend = None

    def _seed_noise(self, seed: int, stream: _SessionStream) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream noise and txt2img noise a stream with this seed starts from (drawn in the order
        `prepare_stream` draws its own, so a stream built with the seed and one blended to it agree)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latent_shape = (4, stream.latent_height, stream.latent_width)
        placement = self.model.placement
        init_noise = torch.randn((stream.batch_size, *latent_shape), generator=generator)
        noise = torch.randn((1, *latent_shape), generator=generator)
        return (
            init_noise.to(device=placement.device, dtype=placement.dtype),
            noise.to(device=placement.device, dtype=placement.dtype),
        )

    def _encode_prompt(self, params: StreamParams) -> tuple[torch.Tensor, ...]:
        self.prompt_encodings += 1
        return encode_prompts(self.model, params.prompts(), params.negative_prompt, params.active_loras)

    def _build_stream(self, params: StreamParams, img2img: bool) -> None:
        stream = _SessionStream(
            self.model.pipe,
            t_index_list=params.t_index_list(img2img),
            torch_dtype=self.model.placement.dtype,
            width=self.width,
            height=self.height,
            use_denoising_batch=params.denoising_batch,
            frame_buffer_size=1,
            cfg_type=params.cfg_type,
        )
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        stream.prepare_stream(generator, params.guidance_scale, params.delta)
        # txt2img starts every frame from the same seeded noise, so a prompt change is all that moves it.
        stream.init_noise, self._noise = self._seed_noise(params.seed, stream)
        self._stream = stream
        self._step_of = {int(timestep): index for index, timestep in enumerate(stream.sub_timesteps)}
        self._previous_latent = None
        self._primed = False
        self._fed.clear()

    @property
    def needs_torch_unet(self) -> bool:
        """LoRAs and ControlNet residuals go into torch's UNet unless the backend compiled a UNet that takes
        them (graphs with the LoRA-touched weights as inputs; the ControlNets and a UNet with residual
        inputs)."""
        if self.params is None:
            return False
        backend = self.model.backend
        loras = bool(self.params.active_loras) and not backend.takes_loras
        return loras or (bool(self.params.controls) and not backend.takes_controls)

    @property
    def glue_threads(self) -> int | None:
        """Torch threads for this stream's frames: 1 while ONNX Runtime runs every one of its networks on
        the CPU (torch then only moves small tensors between the calls, and its idle OpenMP threads would
        spin on the cores ONNX Runtime's own threads need: 5 to 10% fewer frames, measured at 256² and
        512²); None keeps the calling thread's own count."""
        if self.backend != "onnxruntime" or self.model.placement.device.type != "cpu":
            return None
        return 1

    def _use_backend(self, stream: _SessionStream, params: StreamParams, controls: list[tuple[ControlSpec, object]]) -> None:
        # The UNet's batch is the stream batch, doubled for full CFG or one more for "initialize" (whether
        # CFG applies depends on guidance_scale, which changes without a rebuild: assume the larger).
        unet_batch = {"full": 2 * stream.batch_size, "initialize": stream.batch_size + 1}.get(params.cfg_type, stream.batch_size)
        backend = self.model.backend
        compiled = backend.compiled_for(self.width, self.height, unet_batch)
        unet, vae = compiled if compiled is not None else (self.model.pipe.unet, self.model.pipe.vae)
        if compiled is None:
            if backend.name != "torch":
                logger.info(
                    "%s does not cover %dx%d with UNet batch %d; this stream runs on torch",
                    backend.name, self.width, self.height, unet_batch,
                )
            self.backend = "torch"
        elif self.needs_torch_unet:
            unet = self.model.pipe.unet
            for_loras = bool(params.active_loras) and not backend.takes_loras
            self.backend = f"{backend.name} (VAE); torch (UNet, for {'LoRAs' if for_loras else 'controls'})"
        else:
            self.backend = backend.name
            # The compiled ControlNets go with the compiled UNet (they are the same networks as the
            # torch ones, exported from them).
            controls = [(spec, backend.controlnets[spec.model]) for spec, _ in controls]
        steps = stream.denoising_steps_num
        self._controls = [(spec, net, spec.keeps(steps)) for spec, net in controls]
        self._controls_prepared_for = None
        stream.unet = _StreamUNet(unet, self) if controls or self.model.architecture == "sdxl" else unet
        stream.vae = vae

    def control_rows(self, timesteps: torch.Tensor, rows: int) -> list[ControlRows]:
        """This stream's ControlNets for a UNet call of `rows` latents at these timesteps: each one's
        control image for every row and its scale there (0 where the step is outside start…end, or no
        control image exists yet)."""
        placement = self.model.placement
        steps = [self._step_of.get(int(timestep), 0) for timestep in timesteps.reshape(-1).tolist()]
        if len(steps) == 1:
            steps = steps * rows
        parts = []
        for (spec, net, keeps), image in zip(self._controls, self._control_images):
            if image is None:
                image = torch.zeros((1, 3, self.height, self.width), device=placement.device, dtype=placement.dtype)
                scales = [0.0] * rows
            else:
                scales = [spec.scale if keeps[step] else 0.0 for step in steps]
            parts.append(
                ControlRows(
                    net,  # type: ignore[arg-type]
                    image.expand(rows, -1, -1, -1),
                    torch.tensor(scales, device=placement.device, dtype=placement.dtype),
                )
            )
        return parts

    @property
    def batchable(self) -> bool:
        """Whether this stream's frames can share a UNet call with other streams (`render_together`):
        configured, with a denoising batch (one UNet call a frame)."""
        return self._stream is not None and self._stream.use_denoising_batch

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Streams whose frames may share a UNet call agree on this: size, embedding length, the LoRAs
        active (the weights are the model's for the call) and which ControlNets they use."""
        assert self.params is not None
        return (
            self.width,
            self.height,
            self.model.pipe.tokenizer.model_max_length,
            self.params.active_loras,
            tuple(spec.model for spec in self.params.controls),
        )

    def render(
        self, image: np.ndarray | None, tag: int = 0, refill: bool = False, layer: np.ndarray | None = None
    ) -> RenderResult:
        """Turn one input (H×W×3 uint8 RGB, or None for txt2img) into one output frame. `layer` is the
        session's control layer, for controls whose source is "layer".

        Inputs arriving back to back are pipelined through the stream batch: each frame finishes the
        input fed `depth - 1` frames earlier. With `refill`, a new input after an idle spell (the stream
        settled) is pushed through the whole batch at once, so its first frame already shows it.
        """
        (result,) = self.denoise(image, tag, refill, layer).decode()
        if isinstance(result, Exception):
            raise result
        return result

    @torch.no_grad()
    def denoise(
        self, image: np.ndarray | None, tag: int = 0, refill: bool = False, layer: np.ndarray | None = None
    ) -> Decoding:
        """`render` up to the VAE decode: the frame's latent, which `Decoding.decode` turns into the
        frame. The stream is free for its next frame as soon as this returns."""
        started = time.perf_counter()
        with torch_threads(self.glue_threads):
            fed = self._feed(image, tag, refill, started, layer)
            if isinstance(fed, RenderResult):
                return Decoding.of(self, [fed], stream_vae=True)
            source, primes = fed
            stream = self._stream
            assert stream is not None and self.params is not None
            with self.model.adapters.wanted(self.params.active_loras):
                latent = stream.noised(self._with_feedback(encode_latents(stream.vae, source))) if self.img2img else source
                for _ in range(primes):
                    stream.predict_x0_batch(latent)
                denoised = stream.predict_x0_batch(latent)
            return Decoding.of(self, [_Denoised(denoised, self._answers(), started)], stream_vae=True)

    @torch.no_grad()
    def begin(
        self, image: np.ndarray | None, tag: int = 0, refill: bool = False, layer: np.ndarray | None = None
    ) -> PendingFrame | RenderResult:
        """`render` up to its UNet calls: the input's latent and how many steps it takes, for
        `render_together` to batch (or the finished result, when the similar-image filter skipped it)."""
        if not self.batchable:
            raise RuntimeError("begin() needs a configured stream with a denoising batch")
        started = time.perf_counter()
        fed = self._feed(image, tag, refill, started, layer)
        if isinstance(fed, RenderResult):
            return fed
        source, primes = fed
        if self.img2img:
            return PendingFrame(self, None, primes, started, pixels=source)
        return PendingFrame(self, source, primes, started)

    def _feed(
        self, image: np.ndarray | None, tag: int, refill: bool, started: float, layer: np.ndarray | None
    ) -> tuple[torch.Tensor, int] | RenderResult:
        """Check one input and account for it in the stream batch: the canvas as pixels in [-1, 1]
        (img2img; encoding is left to the caller) or the starting noise (txt2img), and how many steps
        must push it into the stream batch before the step that renders the frame. Also moves any
        transition a frame on, and prepares this frame's control images."""
        stream = self._stream
        if stream is None:
            raise RuntimeError("configure() must be called before render()")
        if self.img2img:
            if image is None:
                raise InvalidParameter("image", "img2img needs an input image")
            _check_image("image", image, self.width, self.height)
            pixels = torch.from_numpy(image).to(self.model.placement.device).permute(2, 0, 1).unsqueeze(0)
            pixels = pixels.to(self.model.placement.dtype) / 127.5 - 1.0
            # The filter judges new inputs only. A transition renders the same input frame after frame, and
            # an input it let through is rendered again until the stream batch has fully shown it: neither
            # may be held still.
            fresh = not self._fed or tag != self._fed[-1]
            if stream.similar_image_filter and fresh and self._blend is None and stream.similar_filter(pixels) is None:
                return RenderResult(None, self._fed[-1] if self._fed else tag, _elapsed_ms(started, stream))
        if layer is not None:
            _check_image("layer", layer, self.width, self.height)
        self._advance_blend()
        if self.img2img:
            latent = pixels
        else:
            assert self._noise is not None
            latent = self._noise
        if tag != self._controls_prepared_for:
            self._prepare_controls(image, layer)
            self._controls_prepared_for = tag
        primes = 0
        if not self._primed or (refill and self.settled and tag != self._fed[-1]):
            # Fill the stream batch with this input, so the frame is not decoded from zero latents (or,
            # after an idle spell, from the previous input's).
            primes = self.depth - 1
            self._fed.extend([tag] * self.depth)
            self._primed = True
        else:
            self._fed.append(tag)
        while len(self._fed) > self.depth:
            self._fed.popleft()
        return latent, primes

    def _prepare_controls(self, image: np.ndarray | None, layer: np.ndarray | None) -> None:
        placement = self.model.placement
        self._control_images = []
        for spec, _, _ in self._controls:
            source = image if spec.source == "canvas" else layer
            self._control_images.append(
                None
                if source is None
                else control_tensor(preprocess(source, spec.preprocessor, self.model.depth), placement.device, placement.dtype)
            )

    def _with_feedback(self, latent: torch.Tensor) -> torch.Tensor:
        """The input's latent averaged with the inputs before it (an exponential moving average with
        the `feedback` share for the past), before noising: sensor noise on a still camera averages
        out, at the price of a trail behind fast motion."""
        assert self.params is not None
        previous = self._previous_latent
        if not self.params.feedback:
            return latent
        if previous is not None and previous.shape == latent.shape:
            latent = torch.lerp(latent, previous, self.params.feedback)
        self._previous_latent = latent
        return latent

    def _answers(self) -> int:
        """The newest input this frame fully shows: the oldest in the stream batch, or, during a
        transition, the one answered when it began."""
        if self._blend is not None and self._blend.answered is not None:
            return self._blend.answered
        return self._fed[0]


@torch.no_grad()
def encode_prompts(
    model: LoadedModel, prompts: Sequence[tuple[str, float]], negative_prompt: str | None, loras: LoraWeights = ()
) -> tuple[torch.Tensor, ...]:
    """Prompt embeddings with the model's text encoder(s) and these LoRAs: the conditional ones of
    weighted prompts mixed by weight, and the negative prompt's. SD gives (conditional, unconditional),
    SDXL also (pooled, unconditional pooled), mixed the same way."""
    total = sum(weight for _, weight in prompts)
    mixed: list[torch.Tensor] | None = None
    with model.adapters.wanted(loras), model.prompt_lock:
        for text, weight in prompts:
            encoded = model.pipe.encode_prompt(
                prompt=text,
                device=model.placement.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative_prompt,
            )
            # Even places hold conditional embeddings (they mix), odd ones the negative prompt's.
            parts = [tensor * (weight / total) if index % 2 == 0 else tensor for index, tensor in enumerate(encoded)]
            mixed = parts if mixed is None else [a + b if index % 2 == 0 else a for index, (a, b) in enumerate(zip(mixed, parts))]
    assert mixed is not None, "at least one prompt"
    return tuple(mixed)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """The calling thread's torch thread count set to `count` (None: left as it is), then put back."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_image(name: str, image: np.ndarray, width: int, height: int) -> None:
    if image.shape != (height, width, 3) or image.dtype != np.uint8:
        raise InvalidParameter(name, f"expected {height}x{width}x3 uint8, got {image.shape} {image.dtype}")


class FrameInput(NamedTuple):
    """One stream's input to `render_together`, as `StreamPipeline.render` takes it."""

    stream: StreamPipeline
    image: np.ndarray | None
    tag: int = 0
    refill: bool = False
    layer: np.ndarray | None = None


def render_together(frames: Sequence[FrameInput | tuple]) -> list[RenderResult | Exception]:
    """Render one frame for each of several streams with one UNet call and one VAE decode.

    The streams must be `batchable`, distinct, and share a `batch_key` and a model. Every stream keeps
    its own latents, noise, timesteps, prompt, CFG mode and controls: only the calls are stacked, so
    each frame equals the one the stream renders alone up to float rounding. A failure in one stream's
    own part is returned in its place; one in the shared calls is returned for all of them.
    """
    return denoise_together(frames).decode() if frames else []


@torch.no_grad()
def denoise_together(frames: Sequence[FrameInput | tuple]) -> Decoding:
    """`render_together` up to the VAE decode (see `StreamPipeline.denoise`)."""
    frames = [FrameInput(*frame) for frame in frames]
    streams = [frame.stream for frame in frames]
    if not frames:
        raise ValueError("nothing to render")
    if len({id(stream) for stream in streams}) != len(streams):
        raise ValueError("a stream can take part in a batch only once")
    if len({(stream.batch_key, id(stream.model)) for stream in streams}) != 1:
        raise ValueError("streams rendered together must share a model, a size, LoRAs and ControlNets")
    with torch_threads(streams[0].glue_threads):
        return Decoding.of(streams[0], _denoise_together(frames))


def _denoise_together(frames: list[FrameInput]) -> list[RenderResult | Exception | _Denoised]:
    results: list[RenderResult | Exception | _Denoised | None] = [None] * len(frames)
    pending: list[tuple[int, PendingFrame]] = []
    for index, frame in enumerate(frames):
        try:
            begun = frame.stream.begin(frame.image, frame.tag, frame.refill, frame.layer)
        except Exception as error:  # noqa: BLE001 - this stream's input or state: only its frame fails
            results[index] = error
            continue
        if isinstance(begun, RenderResult):
            results[index] = begun
        else:
            pending.append((index, begun))
    if pending:
        first = pending[0][1].stream
        assert first.params is not None
        try:
            with first.model.adapters.wanted(first.params.active_loras):
                denoised = _run_pending([p for _, p in pending])
            for (index, frame), latent in zip(pending, denoised):
                results[index] = _Denoised(latent, frame.stream._answers(), frame.started)
        except Exception as error:  # noqa: BLE001 - the shared call failed: every frame in it did
            for index, _ in pending:
                results[index] = error
    assert all(result is not None for result in results)
    return results  # type: ignore[return-value]


def _run_pending(pending: list[PendingFrame]) -> list[torch.Tensor]:
    """The denoised latent of every pending frame."""
    model = pending[0].stream.model
    canvases = [frame for frame in pending if frame.pixels is not None]
    for chunk in _chunks(canvases, model.backend.max_batch):
        vae = _components(chunk[0].stream, len(chunk))[1]
        latents = encode_latents(vae, torch.cat([frame.pixels for frame in chunk]))  # type: ignore[misc]
        for frame, latent in zip(chunk, latents.split(1)):
            assert frame.stream._stream is not None
            frame.latent, frame.pixels = frame.stream._stream.noised(frame.stream._with_feedback(latent)), None
    # Streams that refill take their priming steps together too (at most MAX_STEPS - 1 rounds).
    while priming := [frame for frame in pending if frame.primes > 0]:
        _step_together(priming)
        for frame in priming:
            frame.primes -= 1
    return _step_together(pending)


@dataclass(frozen=True)
class _Denoised:
    """A frame's denoised latent, waiting for the VAE: the input it answers and when it began."""

    latent: torch.Tensor
    answers: int
    started: float


class Decoding:
    """Frames rendered up to their VAE decode (`StreamPipeline.denoise`, `denoise_together`), in the
    order they were asked for; `decode()` finishes them, in one VAE call per batch the backend allows.

    It holds everything it needs and reads nothing of the streams, whose state has moved on to the next
    frame by then: the latents are new tensors (a step never writes into the one it returned) and the
    VAE a shared read-only network. So a slot can decode one frame on a second thread while its worker
    denoises the next (`--overlap-decode`).
    """

    def __init__(
        self,
        frames: list[RenderResult | Exception | _Denoised],
        vae_for: Callable[[int], Any],
        scaling: float,
        max_batch: int | None,
        threads: int | None,
    ) -> None:
        self.frames = frames
        self._vae_for = vae_for
        self._scaling = scaling
        self._max_batch = max_batch
        self._threads = threads

    @classmethod
    def of(cls, stream: StreamPipeline, frames: list[RenderResult | Exception | _Denoised], stream_vae: bool = False) -> Decoding:
        """The decoding of these frames of streams like `stream` (its model and size), with the VAE
        the stream itself uses (`stream_vae`), or the one the backend has for each batch."""
        model = stream.model
        vae = stream._stream.vae if stream_vae and stream._stream is not None else None
        return cls(
            frames,
            (lambda _: vae) if vae is not None else functools.partial(_vae_for, stream.model, stream.width, stream.height),
            model.pipe.vae.config.scaling_factor,
            model.backend.max_batch,
            stream.glue_threads,
        )

    @property
    def beside_denoising(self) -> bool:
        """Whether decoding these frames on another thread while the next are denoised pays: when
        ONNX Runtime runs the networks on the CPU in its own thread pools and torch's glue runs on one
        thread. Eager torch's OpenMP pools on two busy threads outnumber the cores; its frames then got
        slower, not faster (256², 2 cores: 8.5 frames/s against 10.75 one thing at a time)."""
        return self._threads == 1

    @property
    def answers(self) -> list[int | None]:
        """For each frame, the input it will answer once decoded (None for a skipped or failed one)."""
        return [frame.answers if isinstance(frame, _Denoised) else None for frame in self.frames]

    @torch.no_grad()
    def decode(self) -> list[RenderResult | Exception]:
        """Each frame's result: the image, or what the stream answered already (a skipped input, an
        error). A failure of a shared VAE call is every one of its frames' result."""
        waiting = [(index, frame) for index, frame in enumerate(self.frames) if isinstance(frame, _Denoised)]
        images: dict[int, RenderResult | Exception] = {}
        with torch_threads(self._threads):
            for chunk in _chunks(waiting, self._max_batch):
                try:
                    vae = self._vae_for(len(chunk))
                    latents = torch.cat([frame.latent for _, frame in chunk]) / self._scaling
                    decoded = vae.decode(latents, return_dict=False)[0]
                    pixels = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                except Exception as error:  # noqa: BLE001 - the shared call failed: every frame in it did
                    images.update((index, error) for index, _ in chunk)
                    continue
                done = time.perf_counter()
                for row, (index, frame) in enumerate(chunk):
                    images[index] = RenderResult(pixels[row], frame.answers, (done - frame.started) * 1000.0)
        return [images[index] if isinstance(frame, _Denoised) else frame for index, frame in enumerate(self.frames)]


def _step_together(frames: list[PendingFrame]) -> list[torch.Tensor]:
    """One denoising-batch step of every frame's stream, in as few UNet calls as the backend's batch
    range allows (one, unless TensorRT's profile is smaller): each stream's newest x0. The streams'
    ControlNets run once per UNet call too, over all its rows."""
    streams = [frame.stream._stream for frame in frames]
    assert all(stream is not None for stream in streams)
    inputs = [stream.unet_inputs(frame.latent) for stream, frame in zip(streams, frames)]  # type: ignore[union-attr, arg-type]
    controls = [frame.stream.control_rows(timesteps, latents.shape[0]) for frame, (latents, timesteps, _) in zip(frames, inputs)]
    added = [stream.added_conditions for stream in streams]  # type: ignore[union-attr]
    sizes = [latents.shape[0] for latents, _, _ in inputs]
    shares: list[torch.Tensor] = []
    for chunk in _chunks(list(zip(inputs, controls, added)), frames[0].stream.model.backend.max_batch, sizes):
        chunk_sizes = [latents.shape[0] for (latents, _, _), _, _ in chunk]
        unet = _components(frames[0].stream, sum(chunk_sizes))[0]
        conditions = [extra for _, _, extra in chunk]
        model_pred = controlled_unet(
            unet,
            torch.cat([latents for (latents, _, _), _, _ in chunk]),
            torch.cat([timesteps for (_, timesteps, _), _, _ in chunk]),
            torch.cat([embeddings for (_, _, embeddings), _, _ in chunk]),
            merge_rows([rows for _, rows, _ in chunk]),
            None if conditions[0] is None else {key: torch.cat([extra[key] for extra in conditions]) for key in conditions[0]},  # type: ignore[index]
        )
        shares.extend(model_pred.split(chunk_sizes))
    return [stream.finish_step(share) for stream, share in zip(streams, shares)]  # type: ignore[union-attr]


def _components(stream: StreamPipeline, batch: int) -> tuple[object, object]:
    """The (unet, vae) for a call of this batch at this stream's size: compiled where they cover it
    (the UNet on torch for streams with controls or LoRAs)."""
    compiled = stream.model.backend.compiled_for(stream.width, stream.height, batch)
    if compiled is None:
        return stream.model.pipe.unet, stream.model.pipe.vae
    return (stream.model.pipe.unet if stream.needs_torch_unet else compiled[0]), compiled[1]


def _vae_for(model: LoadedModel, width: int, height: int, batch: int) -> Any:
    """The VAE for a decode of this batch at this size: compiled where the backend covers it."""
    compiled = model.backend.compiled_for(width, height, batch)
    return model.pipe.vae if compiled is None else compiled[1]


def _chunks(items: list[T], limit: int | None, sizes: list[int] | None = None) -> list[list[T]]:
    """`items` in order, cut into runs whose sizes (1 each unless given) add up to at most `limit` (an
    item larger than the limit is a run of its own); one run when there is no limit."""
    if not items:
        return []
    if limit is None:
        return [list(items)]
    runs: list[list[T]] = [[]]
    total = 0
    for item, size in zip(items, sizes or [1] * len(items)):
        if runs[-1] and total + size > limit:
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += size
    return runs


def _elapsed_ms(started: float, stream: StreamDiffusion) -> float:
    if stream.device.type == "cuda":
        torch.cuda.synchronize(stream.device)
    return (time.perf_counter() - started) * 1000.0
