"""The trained toy model: the tiny SD-1.x-shaped model, trained offline in minutes on generated drawings.

The untrained tiny model (`pipelines.tiny`) has the right shapes but its frames are dark noise that
depends on the canvas by a tenth of a grey level. This module trains the same architecture briefly, on
this machine, on pictures it draws itself (`pipelines.drawings`), so that the default server shows
something a person recognises:

1. **Autoencoder** (the TAESD-shaped `AutoencoderTiny` the live loop uses): trained towards an identity
   round trip. Its first three latent channels are guided towards the picture's colours averaged over
   each 8×8 block, which both speeds training up (an unguided run settles on grey for a long while) and
   makes the latent space readable.
2. **Full VAE** (the `AutoencoderKL` batch jobs decode with): its encoder is taught the autoencoder's
   latents and its decoder to turn them back into the picture, so both VAEs share one latent space and
   the UNet serves both.
3. **Text encoder** (the CLIP text model, from random weights): taught first to say, at every token
   position, which colour word and which effect word the prompt holds. Without this stage the UNet
   never learnt the words apart in its step budget (every colour gave the same brownish tint): the
   cross-attention has nothing to find in a random encoder's output.
4. **UNet and text encoder**: a denoiser in that latent space whose clean target is the picture
   *restyled by the prompt*: a colour word tints it (`COLOURS`), an effect word changes its texture
   (`EFFECTS`), any other words change nothing. img2img at strength 0.3–0.6 returns the canvas,
   recognisable, blurred and restyled. Colours and `dark` are learnt well; `sketch` and `smooth` are
   not (they change x0 by a few grey levels at most): the frames hold too little fine detail for a blur to
   show, and edge-drawing is more than this UNet learns in its steps.

What it is not: a picture generator. txt2img from pure noise gives a vague tinted blur, and it knows no
words beyond the ones above. It is there so that everything can be built, tested and shown on machines
that cannot download real weights; real weights go in with `--model`.

Deterministic: the same `TrainingPlan` gives the same weights on the same torch version and CPU kernel
family (training runs on a fixed number of threads, its data and order are drawn from seeded generators).
The plan's fingerprint is saved in the model directory, so a changed plan or version retrains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from tqdm import tqdm

from . import drawings
from .paths import default_cache_dir
from .tiny import _CORPUS, MARKER, TAESD_SUBDIR, build_tiny_components, read_marker, save_tiny_vae, weights_fingerprint

TOY_MODEL_VERSION = 5
"""Bumped whenever what training produces changes (data, targets, losses), so cached copies retrain."""

TRAINING_THREADS = 2
"""Training always runs on this many torch threads: the reduction order, and so the weights, depend on it."""

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.95, 0.55, 0.1),
    "yellow": (0.95, 0.88, 0.15),
    "green": (0.15, 0.7, 0.2),
    "blue": (0.12, 0.3, 0.9),
    "purple": (0.55, 0.2, 0.75),
    "pink": (0.95, 0.5, 0.7),
    "brown": (0.5, 0.3, 0.15),
}
"""Colour words: the picture keeps its light and shade and takes on this colour."""

EFFECTS: tuple[str, ...] = ("smooth", "sketch", "dark")
"""Texture words: `smooth` blurs, `sketch` turns the picture into dark lines on paper, `dark` dims it
(to a mean brightness of at most `DARK_MEAN`)."""

STREAM_DEFAULTS: dict[str, object] = {"cfg_type": "none"}
"""Sessions on the toy model start without CFG: StreamDiffusion's residual CFG ("self", the default for
real models) builds its noise estimate on the assumption that the UNet predicts the noise that was
added, and with this UNet (which predicts the noise towards a *restyled* picture) it loses the canvas at
strength 0.5 (input–output correlation −0.1 instead of 0.9, measured on a drawn square). "full" works
too, at twice the UNet batch."""

TINT_AMOUNT = 0.75
DARK_MEAN = 0.3
SMOOTH_SIGMA_DIVISOR = 16
"""`smooth` blurs with a Gaussian of σ = picture width / this. At width/48 its target was sharper than
what the model renders anyway, and the word changed nothing visible."""
GUIDE_SCALE = 1.5
"""The autoencoder's first three latent channels are guided towards block-averaged RGB in [-1, 1] times this."""


@dataclass(frozen=True)
class TrainingPlan:
    """How the toy model is trained. Tests use `scaled()` copies: same recipe, fewer steps."""

    seed: int = 0
    pictures: int = 2000
    picture_size: int = 128
    autoencoder_steps: int = 2000
    autoencoder_crop: int = 48
    vae_steps: int = 800
    vae_crop: int = 48
    text_steps: int = 300
    text_batch: int = 64
    unet_steps: int = 1500
    batch: int = 16
    learning_rate: float = 3e-3
    unet_learning_rate: float = 2e-3
    vae_channels: tuple[int, ...] = (16, 16, 32, 32)
    vae_norm_groups: int = 4
    """Four channels to a group at the narrowest block. One channel to a group (instance norm) held the
    full VAE at 14 dB whatever the steps; four groups reach 24 dB (measured on held-out 256² drawings)."""

    def scaled(self, factor: float) -> TrainingPlan:
        return dataclasses.replace(
            self,
            pictures=max(32, round(self.pictures * factor)),
            autoencoder_steps=max(2, round(self.autoencoder_steps * factor)),
            vae_steps=max(2, round(self.vae_steps * factor)),
            text_steps=max(2, round(self.text_steps * factor)),
            unet_steps=max(2, round(self.unet_steps * factor)),
        )

    @property
    def fingerprint(self) -> str:
        fields = {"version": TOY_MODEL_VERSION, "torch": torch.__version__, **dataclasses.asdict(self)}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


SHIPPED_TOY_MODEL = Path(__file__).resolve().parent / "toy_weights"
"""The toy model's weights as the package ships them (about 8 MB), trained by `TrainingPlan()` with
`streamcanvas make-tiny-model --train` (`make toy-weights` refreshes them). Training takes longer than a
first start should wait, so the server loads these; tests/test_toy_model.py retrains and compares."""


def default_toy_model_dir() -> Path:
    """Where a toy model is trained when the shipped one does not fit (another plan or version)."""
    return default_cache_dir() / f"toy-sd-v{TOY_MODEL_VERSION}"


def cpu_signature() -> dict[str, object]:
    """What the weights' last bits depend on besides the plan and torch: the CPU's kernels and threads.

    The same plan on another kind of CPU (AVX2 instead of AVX-512, say) trains to weights that behave
    the same but differ in their rounding, so a fingerprint is only comparable between equal signatures."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"capability": torch.backends.cpu.get_cpu_capability(), "model": model, "threads": TRAINING_THREADS}


# -- what the prompt asks for ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """What a prompt asks of the toy model: a colour, an effect, both or neither."""

    colour: str | None = None
    effect: str | None = None

    @classmethod
    def of(cls, prompt: str) -> Style:
        """The first colour word and the first effect word of the prompt (the model learns the same rule)."""
        words = [word.strip(".,;:!?\"'()").lower() for word in prompt.split()]
        colour = next((word for word in words if word in COLOURS), None)
        effect = next((word for word in words if word in EFFECTS), None)
        return cls(colour, effect)


def restyle(images: torch.Tensor, styles: list[Style]) -> torch.Tensor:
    """What the toy model is trained to render: B×3×H×W images in [-1, 1], each restyled by its Style.

    Each denoising step restyles what the step before it rendered, so the colour and `dark` keep the
    picture's brightness where they can: a tint that scaled the light by the colour's own luma made a
    blue frame darker at every step (black by the third)."""
    out = []
    for image, style in zip(images, styles):
        pixels = (image + 1) / 2  # 3×H×W in [0, 1]
        if style.effect == "smooth":
            pixels = _blur(pixels, sigma=image.shape[-1] / SMOOTH_SIGMA_DIVISOR)
        elif style.effect == "sketch":
            pixels = _sketch(pixels)
        elif style.effect == "dark":
            # At most DARK_MEAN bright on average: a picture that is already that dark stays as it is.
            pixels = pixels * min(1.0, DARK_MEAN / max(float(pixels.mean()), 1e-6))
        if style.colour is not None:
            # In YCbCr: the light (Y) stays, the chroma moves TINT_AMOUNT of the way to the colour's.
            luma, chroma = _luma_chroma(pixels)
            _, target = _luma_chroma(torch.tensor(COLOURS[style.colour]).view(3, 1, 1))
            chroma = (1 - TINT_AMOUNT) * chroma + TINT_AMOUNT * target
            pixels = torch.cat(
                [luma + 1.403 * chroma[1:], luma - 0.344 * chroma[:1] - 0.714 * chroma[1:], luma + 1.773 * chroma[:1]]
            ).clamp(0, 1)
        out.append(pixels * 2 - 1)
    return torch.stack(out)


def _luma_chroma(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB (3×H×W in [0, 1]) to luma Y (1×H×W) and chroma Cb, Cr (2×H×W), as in JPEG's YCbCr."""
    luma = 0.299 * pixels[:1] + 0.587 * pixels[1:2] + 0.114 * pixels[2:]
    return luma, torch.cat([(pixels[2:] - luma) * 0.564, (pixels[:1] - luma) * 0.713])


def _blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(pixels[None], (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]


def _sketch(pixels: torch.Tensor) -> torch.Tensor:
    """Dark pencil lines where the picture has edges, on white paper."""
    luma = (pixels * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)[None]
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel.view(1, 1, 3, 3))
    gy = F.conv2d(padded, sobel.t().reshape(1, 1, 3, 3))
    # Lines a 64th of the picture wide: thin ones would not survive the 8× latent.
    radius = max(1, pixels.shape[-1] // 64)
    edges = F.max_pool2d((gx**2 + gy**2).sqrt(), 2 * radius + 1, stride=1, padding=radius).clamp(0, 1)
    return (1 - edges)[0].expand(3, -1, -1)


_FILLERS = [word for word in _CORPUS.split() if word not in COLOURS and word not in EFFECTS]
"""Words that ask for nothing. The style words are left out, or a filler "blue" would teach "no tint"."""


def random_prompt(rng: random.Random) -> tuple[str, Style]:
    """A training prompt: maybe a colour, maybe an effect, and up to five other words, in any order.

    One filler in three is a made-up word, which the tokenizer splits into letters as it does every word
    outside its vocabulary: without them, "a blue house on a hill" (`hill` is not in it) came out red."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [
        rng.choice(_FILLERS) if rng.random() < 2 / 3 else "".join(rng.choice(letters) for _ in range(rng.randint(2, 8)))
        for _ in range(rng.randint(0, 5))
    ]
    colour = rng.choice(list(COLOURS)) if rng.random() < 0.6 else None
    effect = rng.choice(EFFECTS) if rng.random() < 0.35 else None
    for word in (colour, effect):
        if word is not None:
            words.insert(rng.randint(0, len(words)), word)
    return " ".join(words), Style(colour, effect)


# -- training ---------------------------------------------------------------------------------------------


class _Progress:
    """One bar over every stage's steps: stage name, elapsed time and ETA."""

    def __init__(self, plan: TrainingPlan, enabled: bool) -> None:
        total = plan.autoencoder_steps + plan.vae_steps + plan.text_steps + plan.unet_steps
        self.bar = tqdm(total=total, unit="step", disable=not enabled, dynamic_ncols=True, desc="training the toy model")

    def stage(self, name: str) -> None:
        self.bar.set_description(name)

    def step(self, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _batches(data: torch.Tensor, plan: TrainingPlan, steps: int, crop: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    size = data.shape[-1]
    for _ in range(steps):
        index = torch.randint(0, len(data), (plan.batch,), generator=generator)
        left, top = torch.randint(0, size - crop + 1, (2,), generator=generator).tolist()
        yield data[index][:, :, top : top + crop, left : left + crop]


def _optimizer(
    parameters: list[torch.nn.Parameter], learning_rate: float, steps: int, faster: list[torch.nn.Parameter] = ()  # type: ignore[assignment]
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam with warm-up and cosine decay; `faster` parameters learn at three times the rate."""
    groups = [{"params": parameters, "lr": learning_rate}]
    if faster:
        groups.append({"params": list(faster), "lr": 3 * learning_rate})
    optimizer = torch.optim.Adam(groups)
    warmup = max(1, min(50, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    return optimizer, schedule


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler, parameters: list[torch.nn.Parameter]) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()
    return float(loss.detach())


def _guide(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images, 8) * GUIDE_SCALE


def train_autoencoder(autoencoder: torch.nn.Module, data: torch.Tensor, plan: TrainingPlan, generator: torch.Generator, progress: _Progress) -> None:
    progress.stage("autoencoder (TAESD)")
    parameters = list(autoencoder.parameters())
    optimizer, schedule = _optimizer(parameters, plan.learning_rate, plan.autoencoder_steps)
    autoencoder.train()
    for images in _batches(data, plan, plan.autoencoder_steps, plan.autoencoder_crop, generator):
        latents = autoencoder.encoder(images)
        decoded = autoencoder.decoder(latents)
        error = decoded - images
        loss = error.pow(2).mean() + 0.5 * error.abs().mean() + (latents[:, :3] - _guide(images)).pow(2).mean()
        progress.step(_step(loss, optimizer, schedule, parameters))
    autoencoder.eval()


def train_full_vae(vae: torch.nn.Module, autoencoder: torch.nn.Module, data: torch.Tensor, plan: TrainingPlan, generator: torch.Generator, progress: _Progress) -> None:
    """The KL autoencoder learns the autoencoder's latent space: encoder mean → its latents, decoder → pictures."""
    progress.stage("full VAE")
    parameters = list(vae.parameters())
    optimizer, schedule = _optimizer(parameters, plan.learning_rate, plan.vae_steps)
    vae.train()
    for images in _batches(data, plan, plan.vae_steps, plan.vae_crop, generator):
        with torch.no_grad():
            target = autoencoder.encoder(images)
        moments = vae.quant_conv(vae.encoder(images))
        mean, log_variance = moments.chunk(2, dim=1)
        decoded = vae.decoder(vae.post_quant_conv(target))
        error = decoded - images
        loss = (
            error.pow(2).mean()
            + 0.5 * error.abs().mean()
            + (mean - target).pow(2).mean()
            + 0.01 * (log_variance + 8).pow(2).mean()  # a narrow posterior: samples stay close to the mean
        )
        progress.step(_step(loss, optimizer, schedule, parameters))
    vae.eval()


def _tokens(tokenizer: object, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids  # type: ignore[operator,no-any-return]


def train_prompt_reader(text_encoder: torch.nn.Module, tokenizer: object, plan: TrainingPlan, progress: _Progress) -> None:
    """The text encoder learns to carry the prompt's colour and effect into every token position.

    A linear probe reads both from the mean of the last hidden states (classification, cross-entropy);
    the probe is thrown away. The UNet's cross-attention, which starts out averaging over the tokens,
    then finds the style in what it averages."""
    progress.stage("text encoder (prompt words)")
    rng = random.Random(plan.seed + 1)
    colours: list[str | None] = [None, *COLOURS]
    effects: list[str | None] = [None, *EFFECTS]
    width = text_encoder.config.hidden_size  # type: ignore[attr-defined]
    probe = torch.nn.Linear(width, len(colours) + len(effects))  # from the global generator, seeded by the build
    parameters = list(text_encoder.parameters()) + list(probe.parameters())
    optimizer, schedule = _optimizer(parameters, plan.learning_rate, plan.text_steps)
    text_encoder.train()
    for _ in range(plan.text_steps):
        prompts, styles = zip(*(random_prompt(rng) for _ in range(plan.text_batch)))
        logits = probe(text_encoder(_tokens(tokenizer, list(prompts)))[0].mean(dim=1))
        colour = torch.tensor([colours.index(style.colour) for style in styles])
        effect = torch.tensor([effects.index(style.effect) for style in styles])
        loss = F.cross_entropy(logits[:, : len(colours)], colour) + F.cross_entropy(logits[:, len(colours) :], effect)
        progress.step(_step(loss, optimizer, schedule, parameters))
    text_encoder.eval()


def train_denoiser(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: object,
    scheduler: object,
    autoencoder: torch.nn.Module,
    data: torch.Tensor,
    plan: TrainingPlan,
    generator: torch.Generator,
    progress: _Progress,
) -> None:
    """ε-prediction in the latent space, towards the latent of the restyled picture (min-SNR-5 weighting).

    Each picture gets one prompt, drawn once; the restyled targets are encoded up front, by style."""
    progress.stage("UNet and text encoder")
    rng = random.Random(plan.seed)
    prompts, styles = zip(*(random_prompt(rng) for _ in range(len(data))))
    with torch.no_grad():
        clean = torch.cat([autoencoder.encoder(chunk) for chunk in data.split(64)])
        target = clean.clone()
        for style in set(styles) - {Style()}:
            chosen = torch.tensor([index for index, other in enumerate(styles) if other == style])
            for part in chosen.split(64):
                target[part] = autoencoder.encoder(restyle(data[part], [style] * len(part)))
    tokens = _tokens(tokenizer, list(prompts))
    alphas = scheduler.alphas_cumprod  # type: ignore[attr-defined]
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    # The UNet's cross-attention has to learn where the style is in the text encoder's output: it and
    # the text encoder learn faster than the rest.
    cross_attention = [p for name, p in unet.named_parameters() if "attn2" in name]
    chosen = {id(p) for p in cross_attention}
    optimizer, schedule = _optimizer(
        [p for p in unet.parameters() if id(p) not in chosen], plan.unet_learning_rate, plan.unet_steps,
        faster=cross_attention + list(text_encoder.parameters()),
    )
    unet.train()
    text_encoder.train()
    for _ in range(plan.unet_steps):
        index = torch.randint(0, len(data), (plan.batch,), generator=generator)
        embeddings = text_encoder(tokens[index])[0]
        timesteps = _training_timesteps(plan.batch, len(alphas), generator)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        noise = torch.randn(clean[index].shape, generator=generator)
        noisy = alpha.sqrt() * clean[index] + (1 - alpha).sqrt() * noise
        # The noise that turns `noisy` back into the *target* (the restyled picture), not into its input.
        wanted = (noisy - alpha.sqrt() * target[index]) / (1 - alpha).sqrt()
        predicted = unet(noisy, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]
        snr = alpha / (1 - alpha)
        loss = (snr.clamp(max=5.0) / snr * (predicted - wanted).pow(2)).mean()
        progress.step(_step(loss, optimizer, schedule, parameters))
    unet.eval()
    text_encoder.eval()


def _training_timesteps(count: int, train_steps: int, generator: torch.Generator) -> torch.Tensor:
    """Three in four from the range img2img at strength 0.2–0.7 denoises from (the live loop's use), the
    rest from anywhere, so txt2img still starts somewhere."""
    focused = torch.randint(train_steps // 20, (train_steps * 7) // 10, (count,), generator=generator)
    anywhere = torch.randint(0, train_steps, (count,), generator=generator)
    return torch.where(torch.rand(count, generator=generator) < 0.75, focused, anywhere)


def train_toy_model(directory: Path | str, plan: TrainingPlan = TrainingPlan(), progress: bool = True) -> Path:
    """Build the tiny model, train it by `plan`, and save it as a diffusers directory (TAESD in `taesd/`).

    Written beside its final place and renamed into it, as the untrained model is.
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    bar = _Progress(plan, progress)
    started = time.perf_counter()
    try:
        with torch.random.fork_rng():
            generator = torch.Generator().manual_seed(plan.seed)
            components = build_tiny_components(plan.seed, vae_channels=plan.vae_channels, vae_norm_groups=plan.vae_norm_groups)
            bar.stage("drawing pictures")
            pixels = drawings.pictures(plan.seed, plan.pictures, plan.picture_size)
            data = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
            autoencoder = components["tiny_vae"]
            train_autoencoder(autoencoder, data, plan, generator, bar)  # type: ignore[arg-type]
            autoencoder.requires_grad_(False)  # type: ignore[attr-defined]
            train_full_vae(components["vae"], autoencoder, data, plan, generator, bar)  # type: ignore[arg-type]
            train_prompt_reader(components["text_encoder"], components["tokenizer"], plan, bar)  # type: ignore[arg-type]
            train_denoiser(
                components["unet"], components["text_encoder"], components["tokenizer"], components["scheduler"],  # type: ignore[arg-type]
                autoencoder, data, plan, generator, bar,  # type: ignore[arg-type]
            )
    finally:
        bar.close()
        torch.set_num_threads(threads)
    tiny_vae = components.pop("tiny_vae")
    # Both VAEs hand the UNet latents as they come out of the autoencoder's encoder.
    components["vae"].register_to_config(scaling_factor=1.0)  # type: ignore[attr-defined]
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # type: ignore[arg-type]
    pipe.save_pretrained(staging, safe_serialization=True)
    save_tiny_vae(tiny_vae, staging / TAESD_SUBDIR)  # type: ignore[arg-type]
    marker = {
        "kind": "trained",
        "version": TOY_MODEL_VERSION,
        "plan": dataclasses.asdict(plan),
        "plan_fingerprint": plan.fingerprint,
        "weights_fingerprint": weights_fingerprint(staging),
        "training_seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "cpu": cpu_signature(),
        "stream_defaults": STREAM_DEFAULTS,
    }
    (staging / MARKER).write_text(json.dumps(marker, indent=2))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def _trained_marker(directory: Path) -> dict[str, object] | None:
    marker = read_marker(directory)
    return marker if marker is not None and marker.get("kind") == "trained" else None


def trained_by(directory: Path, plan: TrainingPlan) -> bool:
    """True if `directory` holds a toy model trained by `plan` (same recipe, version and torch)."""
    marker = _trained_marker(directory)
    return marker is not None and marker.get("plan_fingerprint") == plan.fingerprint


def shipped_for(plan: TrainingPlan) -> bool:
    """True if the shipped weights were trained by `plan` and this version of the recipe.

    The torch version is not compared: weights trained under another torch load and behave the same."""
    marker = _trained_marker(SHIPPED_TOY_MODEL)
    return marker is not None and marker.get("version") == TOY_MODEL_VERSION and marker.get("plan") == json.loads(
        json.dumps(dataclasses.asdict(plan))
    )


def ensure_toy_model(directory: Path | str | None = None, plan: TrainingPlan = TrainingPlan(), progress: bool = True) -> Path:
    """A trained toy model: with no `directory`, the shipped one if it was trained by `plan`, else the
    one in the cache, trained first if it is missing or was trained by another plan.

    Two processes starting at once on an empty cache both train (minutes, the same weights), and the
    second rename wins; nothing half-written is ever read."""
    if directory is None and shipped_for(plan):
        return SHIPPED_TOY_MODEL
    target = Path(directory) if directory is not None else default_toy_model_dir()
    if trained_by(target, plan):
        return target
    return train_toy_model(target, plan, progress)

