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
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from streamdiffusion import StreamDiffusion

from .errors import InvalidParameter
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


@dataclass(frozen=True)
class StreamParams:
    """Everything a client can change while streaming. Invalid values raise InvalidParameter."""

    prompt: str = ""
    negative_prompt: str = ""
    strength: float = 0.5
    steps: int = 2
    seed: int = 2
    guidance_scale: float = 1.2
    delta: float = 1.0
    cfg_type: CfgType = "self"
    denoising_batch: bool = True
    similar_filter: bool = False
    similar_threshold: float = 0.98

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise InvalidParameter(name, f"longer than {MAX_PROMPT_CHARS} characters")
        _check_range("strength", self.strength, 0.02, 1.0)
        _check_range("steps", self.steps, 1, MAX_STEPS)
        _check_range("seed", self.seed, 0, MAX_SEED)
        _check_range("guidance_scale", self.guidance_scale, 0.0, 20.0)
        _check_range("delta", self.delta, 0.0, 5.0)
        _check_range("similar_threshold", self.similar_threshold, 0.0, 1.0)
        if self.cfg_type not in CFG_TYPES:
            raise InvalidParameter("cfg_type", f"{self.cfg_type!r} is not one of {', '.join(CFG_TYPES)}")
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


def _check_range(name: str, value: float, low: float, high: float) -> None:
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

    def set_prompt_embeddings(self, conditional: torch.Tensor, unconditional: torch.Tensor) -> None:
        """Arrange already-encoded prompt embeddings for the stream batch and CFG mode."""
        embeds = conditional.repeat(self.batch_size, 1, 1)
        if self.guidance_scale > 1.0 and self.cfg_type == "full":
            embeds = torch.cat([unconditional.repeat(self.batch_size, 1, 1), embeds], dim=0)
        elif self.guidance_scale > 1.0 and self.cfg_type == "initialize":
            embeds = torch.cat([unconditional.repeat(self.frame_bff_size, 1, 1), embeds], dim=0)
        self.prompt_embeds = embeds

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
        cover this stream's size or batch."""
        self._embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
        self._embedded_prompt: tuple[str, str] | None = None
        self._noise: torch.Tensor | None = None
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
        """True once the newest input fed has been fully denoised into a frame."""
        return self._primed and len(set(self._fed)) <= 1

    def configure(self, params: StreamParams, img2img: bool) -> None:
        """Apply new parameters, redoing only what they invalidate (the model is never reloaded)."""
        previous = self.params
        rebuild = (
            previous is None
            or img2img != self.img2img
            or params.t_index_list(img2img) != previous.t_index_list(self.img2img)
            or (params.cfg_type, params.denoising_batch, params.seed)
            != (previous.cfg_type, previous.denoising_batch, previous.seed)
        )
        self.params = params
        self.img2img = img2img
        prompt_key = (params.prompt, params.negative_prompt)
        if prompt_key != self._embedded_prompt:
            self._embeddings = self._encode_prompt(*prompt_key)
            self._embedded_prompt = prompt_key
        if rebuild:
            self._build_stream(params, img2img)
        else:
            assert self._stream is not None
            self._stream.guidance_scale = 1.0 if params.cfg_type == "none" else params.guidance_scale
            self._stream.delta = params.delta
        assert self._stream is not None and self._embeddings is not None
        self._stream.set_prompt_embeddings(*self._embeddings)
        if params.similar_filter:
            self._stream.enable_similar_image_filter(params.similar_threshold)
        else:
            self._stream.disable_similar_image_filter()

    @torch.no_grad()
    def _encode_prompt(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        conditional, unconditional = self.model.pipe.encode_prompt(
            prompt=prompt,
            device=self.model.placement.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative_prompt,
        )
        self.prompt_encodings += 1
        return conditional, unconditional

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
        self._use_backend(stream, params.cfg_type)
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        stream.prepare_stream(generator, params.guidance_scale, params.delta)
        # txt2img starts every frame from the same seeded noise, so a prompt change is all that moves it.
        self._noise = torch.randn((1, 4, stream.latent_height, stream.latent_width), generator=generator).to(
            device=self.model.placement.device, dtype=self.model.placement.dtype
        )
        self._stream = stream
        self._primed = False
        self._fed.clear()

    def _use_backend(self, stream: _SessionStream, cfg_type: CfgType) -> None:
        # The UNet's batch is the stream batch, doubled for full CFG or one more for "initialize" (whether
        # CFG applies depends on guidance_scale, which changes without a rebuild: assume the larger).
        unet_batch = {"full": 2 * stream.batch_size, "initialize": stream.batch_size + 1}.get(cfg_type, stream.batch_size)
        backend = self.model.backend
        compiled = backend.compiled_for(self.width, self.height, unet_batch)
        if compiled is not None:
            stream.unet, stream.vae = compiled
            self.backend = backend.name
        else:
            if backend.name != "torch":
                logger.info(
                    "%s does not cover %dx%d with UNet batch %d; this stream runs on torch",
                    backend.name, self.width, self.height, unet_batch,
                )
            self.backend = "torch"

    @property
    def batchable(self) -> bool:
        """Whether this stream's frames can share a UNet call with other streams (`render_together`):
        configured, with a denoising batch (one UNet call a frame)."""
        return self._stream is not None and self._stream.use_denoising_batch

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """Streams whose frames may share a UNet call agree on this: (width, height, embedding length)."""
        return self.width, self.height, self.model.pipe.tokenizer.model_max_length

    @torch.no_grad()
    def render(self, image: np.ndarray | None, tag: int = 0, refill: bool = False) -> RenderResult:
        """Turn one input (H×W×3 uint8 RGB, or None for txt2img) into one output frame.

        Inputs arriving back to back are pipelined through the stream batch: each frame finishes the
        input fed `depth - 1` frames earlier. With `refill`, a new input after an idle spell (the stream
        settled) is pushed through the whole batch at once, so its first frame already shows it.
        """
        started = time.perf_counter()
        fed = self._feed(image, tag, refill, started)
        if isinstance(fed, RenderResult):
            return fed
        source, primes = fed
        stream = self._stream
        assert stream is not None
        latent = stream.encode_image(source) if self.img2img else source
        for _ in range(primes):
            stream.predict_x0_batch(latent)
        denoised = stream.predict_x0_batch(latent)
        return self._output(stream.decode_image(denoised), started)

    @torch.no_grad()
    def begin(self, image: np.ndarray | None, tag: int = 0, refill: bool = False) -> PendingFrame | RenderResult:
        """`render` up to its UNet calls: the input's latent and how many steps it takes, for
        `render_together` to batch (or the finished result, when the similar-image filter skipped it)."""
        if not self.batchable:
            raise RuntimeError("begin() needs a configured stream with a denoising batch")
        started = time.perf_counter()
        fed = self._feed(image, tag, refill, started)
        if isinstance(fed, RenderResult):
            return fed
        source, primes = fed
        if self.img2img:
            return PendingFrame(self, None, primes, started, pixels=source)
        return PendingFrame(self, source, primes, started)

    def _feed(
        self, image: np.ndarray | None, tag: int, refill: bool, started: float
    ) -> tuple[torch.Tensor, int] | RenderResult:
        """Check one input and account for it in the stream batch: the canvas as pixels in [-1, 1]
        (img2img; encoding is left to the caller) or the starting noise (txt2img), and how many steps
        must push it into the stream batch before the step that renders the frame."""
        stream = self._stream
        if stream is None:
            raise RuntimeError("configure() must be called before render()")
        if self.img2img:
            if image is None:
                raise InvalidParameter("image", "img2img needs an input image")
            if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
                raise InvalidParameter(
                    "image", f"expected {self.height}x{self.width}x3 uint8, got {image.shape} {image.dtype}"
                )
            pixels = torch.from_numpy(image).to(self.model.placement.device).permute(2, 0, 1).unsqueeze(0)
            pixels = pixels.to(self.model.placement.dtype) / 127.5 - 1.0
            if stream.similar_image_filter and stream.similar_filter(pixels) is None:
                return RenderResult(None, self._fed[-1] if self._fed else tag, _elapsed_ms(started, stream))
            latent = pixels
        else:
            assert self._noise is not None
            latent = self._noise
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

    def _output(self, decoded: torch.Tensor, started: float) -> RenderResult:
        assert self._stream is not None
        output = ((decoded[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        return RenderResult(output.cpu().numpy(), self._fed[0], _elapsed_ms(started, self._stream))


@torch.no_grad()
def render_together(
    frames: list[tuple[StreamPipeline, np.ndarray | None, int, bool]],
) -> list[RenderResult | Exception]:
    """Render one frame for each of several streams with one UNet call and one VAE decode.

    Each entry is (stream, image, tag, refill) as `StreamPipeline.render` takes them; the streams must
    be `batchable`, distinct, and share a `shape_key` and a model. Every stream keeps its own latents,
    noise, timesteps, prompt and CFG mode: only the calls are stacked, so each frame equals the one
    the stream renders alone up to float rounding. A failure in one stream's own part is returned in
    its place; one in the shared calls is returned for all of them.
    """
    if not frames:
        return []
    streams = [stream for stream, *_ in frames]
    if len({id(stream) for stream in streams}) != len(streams):
        raise ValueError("a stream can take part in a batch only once")
    if len({(stream.shape_key, id(stream.model)) for stream in streams}) != 1:
        raise ValueError("streams rendered together must share a model, a size and an embedding length")
    results: list[RenderResult | Exception | None] = [None] * len(frames)
    pending: list[tuple[int, PendingFrame]] = []
    for index, (stream, image, tag, refill) in enumerate(frames):
        try:
            begun = stream.begin(image, tag, refill)
        except Exception as error:  # noqa: BLE001 - this stream's input or state: only its frame fails
            results[index] = error
            continue
        if isinstance(begun, RenderResult):
            results[index] = begun
        else:
            pending.append((index, begun))
    if pending:
        try:
            for index, result in zip((index for index, _ in pending), _run_pending([p for _, p in pending])):
                results[index] = result
        except Exception as error:  # noqa: BLE001 - the shared call failed: every frame in it did
            for index, _ in pending:
                results[index] = error
    assert all(result is not None for result in results)
    return results  # type: ignore[return-value]


def _run_pending(pending: list[PendingFrame]) -> list[RenderResult]:
    first = pending[0].stream
    model = first.model
    canvases = [frame for frame in pending if frame.pixels is not None]
    for chunk in _chunks(canvases, model.backend.max_batch):
        vae = _components(chunk[0].stream, len(chunk))[1]
        latents = encode_latents(vae, torch.cat([frame.pixels for frame in chunk]))  # type: ignore[misc]
        for frame, latent in zip(chunk, latents.split(1)):
            assert frame.stream._stream is not None
            frame.latent, frame.pixels = frame.stream._stream.noised(latent), None
    # Streams that refill take their priming steps together too (at most MAX_STEPS - 1 rounds).
    while priming := [frame for frame in pending if frame.primes > 0]:
        _step_together(priming)
        for frame in priming:
            frame.primes -= 1
    denoised = _step_together(pending)
    decoded: list[torch.Tensor] = []
    scaling = model.pipe.vae.config.scaling_factor
    for chunk in _chunks(denoised, model.backend.max_batch):
        vae = _components(first, len(chunk))[1]
        decoded.extend(vae.decode(torch.cat(chunk) / scaling, return_dict=False)[0].split(1))
    return [frame.stream._output(image, frame.started) for frame, image in zip(pending, decoded)]


def _step_together(frames: list[PendingFrame]) -> list[torch.Tensor]:
    """One denoising-batch step of every frame's stream, in as few UNet calls as the backend's batch
    range allows (one, unless TensorRT's profile is smaller): each stream's newest x0."""
    streams = [frame.stream._stream for frame in frames]
    assert all(stream is not None for stream in streams)
    inputs = [stream.unet_inputs(frame.latent) for stream, frame in zip(streams, frames)]  # type: ignore[union-attr, arg-type]
    sizes = [latents.shape[0] for latents, _, _ in inputs]
    shares: list[torch.Tensor] = []
    for chunk in _chunks(inputs, frames[0].stream.model.backend.max_batch, sizes):
        chunk_sizes = [latents.shape[0] for latents, _, _ in chunk]
        unet = _components(frames[0].stream, sum(chunk_sizes))[0]
        model_pred = unet(
            torch.cat([latents for latents, _, _ in chunk]),
            torch.cat([timesteps for _, timesteps, _ in chunk]),
            encoder_hidden_states=torch.cat([embeddings for _, _, embeddings in chunk]),
            return_dict=False,
        )[0]
        shares.extend(model_pred.split(chunk_sizes))
    return [stream.finish_step(share) for stream, share in zip(streams, shares)]  # type: ignore[union-attr]


def _components(stream: StreamPipeline, batch: int) -> tuple[object, object]:
    """The (unet, vae) for a call of this batch at this stream's size: compiled where they cover it."""
    compiled = stream.model.backend.compiled_for(stream.width, stream.height, batch)
    return compiled if compiled is not None else (stream.model.pipe.unet, stream.model.pipe.vae)


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
