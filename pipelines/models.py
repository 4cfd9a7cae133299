"""Several models served at once: loaded one after another, each checked against the device's memory
before it is loaded, and chosen by name (a session's `hello.model`, a batch job's `model`).

    models = load_models([("turbo", ModelSpec(model="stabilityai/sd-turbo")), ("toy", ModelSpec())])
    models.default.name, models.get("turbo")

The memory a model takes is counted from its weight files' headers (safetensors: every tensor's shape,
at the dtype it is loaded in), before anything is read, so a set of models that does not fit stops the
server at start-up with the sizes in the message instead of failing halfway through loading.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .devices import choose_placement
from .errors import NO_DEPTH_MODEL, ModelLoadError, UnknownName
from .loading import LoadedModel, ModelSpec, load_model, resolve_model_path
from .stream import StreamParams
from .toy_model import ensure_toy_model

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "toy"
"""The name of the trained toy model when no --model is given."""
MEMORY_SHARE = 0.9
"""Of the device's memory (CUDA: total; CPU: available at start), the share models may take."""


@dataclass(frozen=True)
class ModelChoice:
    """What a client may name on one model (its LoRAs and ControlNets, whether it has a depth network),
    and where its sessions' parameters start. Sessions and batch jobs check their names against it."""

    loras: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()
    defaults: StreamParams | None = None
    depth: bool = False
    upscalers: tuple[tuple[str, int], ...] = ()
    """Super-resolution networks by name, with the factor each one upscales by."""
    owner: str = "this server"
    """Who has these, in an error's words: the server, or with several models this one."""
    hint: str | None = None
    """What to say when it has no LoRAs or ControlNets (None: the flag that adds them)."""

    @classmethod
    def of(cls, model: LoadedModel, owner: str = "this server", hint: str | None = None) -> ModelChoice:
        defaults = StreamParams().replace(**model.stream_defaults)
        return cls(
            model.adapters.names, model.controlnets.names, defaults, model.depth is not None, tuple(model.upscalers.scales.items()), owner, hint
        )

    def check(self, params: StreamParams) -> None:
        """Raise UnknownName, listing what exists, for a LoRA, ControlNet or depth this model lacks."""
        for name, _ in params.loras:
            if name not in self.loras:
                raise UnknownName.listing("loras", "LoRA", name, self.loras, "--lora NAME=PATH", self.owner, self.hint)
        for control in params.controls:
            if control.model not in self.controlnets:
                raise UnknownName.listing(
                    "controls", "ControlNet", control.model, self.controlnets, "--controlnet NAME=PATH", self.owner, self.hint
                )
            if control.preprocessor == "depth" and not self.depth:
                raise UnknownName("controls", NO_DEPTH_MODEL)


@dataclass
class ModelSet:
    """The loaded models by name, in the order given; the first is the default."""

    models: dict[str, LoadedModel]
    sizes: dict[str, int]
    """Bytes of weights each model holds on its device, as counted before loading."""
    budget: int | None = None

    @classmethod
    def single(cls, model: LoadedModel, name: str = DEFAULT_MODEL_NAME) -> ModelSet:
        """One model already loaded (its size unknown: 0)."""
        return cls({name: model}, {name: 0})

    @property
    def default(self) -> LoadedModel:
        return next(iter(self.models.values()))

    @property
    def default_name(self) -> str:
        return next(iter(self.models))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.models)

    def get(self, name: str | None) -> LoadedModel:
        if name is None:
            return self.default
        if name not in self.models:
            raise UnknownName.listing("model", "model", name, self.models)
        return self.models[name]

    def choices(self) -> dict[str, ModelChoice]:
        if len(self.models) == 1:
            return {name: ModelChoice.of(model) for name, model in self.models.items()}
        default = next(iter(self.models))
        hint = f"LoRAs and ControlNets load on the default model, {default!r}"
        return {
            name: ModelChoice.of(model, f"model {name!r}", None if name == default else hint) for name, model in self.models.items()
        }

    def __iter__(self) -> Iterator[tuple[str, LoadedModel]]:
        return iter(self.models.items())

    def describe(self) -> list[dict[str, object]]:
        return [
            {**model.describe(), "id": name, "default": index == 0, "weight_bytes": self.sizes[name]}
            for index, (name, model) in enumerate(self.models.items())
        ]


def weight_bytes(directory: Path, dtype: torch.dtype) -> int:
    """Bytes the floating-point weights under `directory` take once loaded as `dtype` (integer tensors
    at their own size), read from safetensors headers; other weight files count at their file size."""
    element = torch.empty((), dtype=dtype).element_size()
    files = [path for path in directory.rglob("*") if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt")]
    names = {path.name for path in files}
    total = 0
    for path in files:
        if ".fp16." in path.name and path.name.replace(".fp16.", ".") in names:
            continue  # a variant beside the full-precision file: one of them is loaded
        if path.suffix != ".safetensors":
            total += path.stat().st_size
            continue
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for side in entry["shape"]:
                count *= side
            floating = entry["dtype"] in ("F64", "F32", "F16", "BF16")
            stored = entry["data_offsets"][1] - entry["data_offsets"][0]
            total += count * element if floating else stored
    return total


def memory_budget(device: torch.device) -> int:
    """What the models may take on this device: MEMORY_SHARE of a GPU's memory, or of the memory this
    machine has available now."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * MEMORY_SHARE)
    available = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    if available is None:
        raise ModelLoadError("cannot tell this machine's available memory (/proc/meminfo); pass --memory-budget")
    return int(available * MEMORY_SHARE)


def _model_directory(spec: ModelSpec) -> Path:
    return ensure_toy_model() if spec.model is None else resolve_model_path(spec.model)


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"


def load_models(specs: list[tuple[str, ModelSpec]], budget_bytes: int | None = None) -> ModelSet:
    """Load every model, the first being the default. Before each, its weights are counted and the
    total checked against the budget (`budget_bytes`, else `memory_budget` of the device): a model that
    does not fit is a ModelLoadError naming every model's size and the budget."""
    if not specs:
        raise ValueError("at least one model is needed")
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise ModelLoadError(f"model names must differ: {names}")
    placement = choose_placement(specs[0][1].device, specs[0][1].dtype)
    budget = budget_bytes if budget_bytes is not None else memory_budget(placement.device)
    sizes: dict[str, int] = {}
    for name, spec in specs:
        directory = _model_directory(spec)
        extras = [resolve_model_path(path, what=f"ControlNet {net!r}") for net, path in spec.controlnets]
        extras += [resolve_model_path(path, what=f"LoRA {lora!r}") for lora, path in spec.adapters]
        extras += [resolve_model_path(path, what=f"upscaler {upscaler!r}") for upscaler, path in spec.upscalers]
        sizes[name] = weight_bytes(directory, placement.dtype) + sum(weight_bytes(path, placement.dtype) for path in extras)
    total = sum(sizes.values())
    if total > budget:
        listed = ", ".join(f"{name} {_gib(size)}" for name, size in sizes.items())
        raise ModelLoadError(
            f"the models do not fit in {placement.device} memory: {listed} = {_gib(total)}, over the budget of "
            f"{_gib(budget)} ({'--memory-budget' if budget_bytes is not None else f'{MEMORY_SHARE:.0%} of what the device has'}); "
            "serve fewer or smaller models, or another --dtype"
        )
    models = {}
    for name, spec in specs:
        models[name] = load_model(spec)
        logger.info("model %s: %s of weights", name, _gib(sizes[name]))
    return ModelSet(models, sizes, budget)
