"""Named LoRAs loaded once as PEFT adapters, chosen per caller without touching anyone else's frames.

The adapters live in the shared UNet (and text encoder), and which are active with which weights is
state of those modules. Every thread says what it wants (`LoraAdapters.wanted`, default: none), and a
hook on each module's forward applies the calling thread's wish under one lock, held for that one call.
So a live session with two LoRAs, another with none and a batch job can share the weights from three
threads: a switch costs one `set_adapters` (measured by `benchmarks/live_controls.py`), never a reload,
and a stream without LoRAs on a model that has none loaded pays nothing at all.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .errors import ModelLoadError, UnknownName

logger = logging.getLogger(__name__)

LoraWeights = tuple[tuple[str, float], ...]
"""(name, weight) pairs, sorted by name: the adapters a caller wants active. Empty: none."""

MAX_ACTIVE_LORAS = 8
LORA_WEIGHT_RANGE = (-4.0, 4.0)
MERGED_SETS = 4
"""How many LoRA sets' merged weights (for compiled UNets, see `LoraAdapters.merged`) are kept at once;
each costs as much memory as the weights the LoRAs touch. The least recently used goes first."""


class LoraAdapters:
    """The LoRAs of one loaded pipeline (possibly none), and the lock and hooks that share them."""

    def __init__(self, pipe: object, paths: Mapping[str, Path]) -> None:
        self.pipe = pipe
        self.paths = dict(paths)
        self.switches = 0
        self.switch_ms_total = 0.0
        self._lock = threading.RLock()
        self._applied: LoraWeights = ()
        self._wanted = threading.local()
        self._merged: collections.OrderedDict[LoraWeights, list[torch.Tensor]] = collections.OrderedDict()
        self.merges = 0
        self.merge_ms_total = 0.0
        for name, path in self.paths.items():
            try:
                pipe.load_lora_weights(str(path), adapter_name=name, local_files_only=True)  # type: ignore[attr-defined]
            except (OSError, ValueError, KeyError, RuntimeError) as error:
                raise ModelLoadError(f"could not load the LoRA {name!r} from {path}: {error}") from error
        if not self.paths:
            return
        pipe.disable_lora()  # type: ignore[attr-defined]
        encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
        for module in [pipe.unet, *(encoder for encoder in encoders if encoder is not None)]:  # type: ignore[attr-defined]
            module.register_forward_pre_hook(self._before_call)
            module.register_forward_hook(self._after_call, always_call=True)
        logger.info("LoRAs loaded as adapters: %s", ", ".join(self.paths))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.paths)

    def check(self, weights: LoraWeights) -> None:
        for name, _ in weights:
            if name not in self.paths:
                raise UnknownName.listing("loras", "LoRA", name, self.names, "--lora NAME=PATH")

    @contextlib.contextmanager
    def wanted(self, weights: LoraWeights) -> Iterator[None]:
        """Within this block, this thread's UNet and text-encoder calls run with these LoRAs."""
        self.check(weights)
        previous = getattr(self._wanted, "weights", ())
        self._wanted.weights = weights
        try:
            yield
        finally:
            self._wanted.weights = previous

    def current(self) -> LoraWeights:
        """The LoRAs this thread wants now (set by `wanted`)."""
        return getattr(self._wanted, "weights", ())

    def lifted(self) -> tuple[str, ...]:
        """The UNet parameters the loaded LoRAs change (their layers' base weights), by name, for graphs
        that take them as inputs; empty when there are no LoRAs or one of them cannot be merged into its
        layer's weight as a plain sum (DoRA, LoRA biases, embedding LoRAs)."""
        if not self.paths:
            return ()
        from peft.tuners.lora import Conv2d, Linear, LoraLayer

        names = []
        for name, module in self.pipe.unet.named_modules():  # type: ignore[attr-defined]
            if not isinstance(module, LoraLayer):
                continue
            plain = isinstance(module, (Linear, Conv2d)) and not any(module.use_dora.values())
            if not plain or any(getattr(module, "lora_bias", {}).values()):
                logger.info("the LoRA layer %s is not a plain low-rank update; compiled UNets do not take these LoRAs", name)
                return ()
            names.append(f"{name}.base_layer.weight")
        return tuple(names)

    @torch.no_grad()
    def merged(self, weights: LoraWeights, names: tuple[str, ...]) -> list[torch.Tensor]:
        """The parameters `names` (from `lifted`) with these LoRAs merged in at these weights:
        base + Σ weight × B·A × alpha/rank for each active LoRA, what PEFT's forward adds beside the base
        layer. Computed once per LoRA set and kept for the `MERGED_SETS` most recently used."""
        with self._lock:
            cached = self._merged.get(weights)
            if cached is not None:
                self._merged.move_to_end(weights)
                return cached
            started = time.perf_counter()
            self._apply(weights)  # set_adapters: each layer's scaling includes its LoRA's weight
            modules = dict(self.pipe.unet.named_modules())  # type: ignore[attr-defined]
            result = []
            for name in names:
                layer = modules[name.removesuffix(".base_layer.weight")]
                merged = layer.base_layer.weight.detach().clone()
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        merged += layer.get_delta_weight(adapter)
                result.append(merged.contiguous())
            self._merged[weights] = result
            while len(self._merged) > MERGED_SETS:
                self._merged.popitem(last=False)
            self.merges += 1
            self.merge_ms_total += (time.perf_counter() - started) * 1000
            return result

    def _before_call(self, module: torch.nn.Module, args: object) -> None:
        self._lock.acquire()
        try:
            self._apply(getattr(self._wanted, "weights", ()))
        except BaseException:
            self._lock.release()
            raise

    def _after_call(self, module: torch.nn.Module, args: object, output: object) -> None:
        self._lock.release()

    def _apply(self, weights: LoraWeights) -> None:
        if weights == self._applied:
            return
        started = time.perf_counter()
        pipe = self.pipe
        if weights:
            pipe.enable_lora()  # type: ignore[attr-defined]
            pipe.set_adapters([name for name, _ in weights], adapter_weights=[weight for _, weight in weights])  # type: ignore[attr-defined]
        else:
            pipe.disable_lora()  # type: ignore[attr-defined]
        self._applied = weights
        self.switches += 1
        self.switch_ms_total += (time.perf_counter() - started) * 1000

    def describe(self) -> dict[str, object]:
        return {
            "names": list(self.names),
            "switches": self.switches,
            "switch_ms_mean": round(self.switch_ms_total / self.switches, 3) if self.switches else None,
            "merges": self.merges,
            "merge_ms_mean": round(self.merge_ms_total / self.merges, 3) if self.merges else None,
        }


def parse_named_path(text: str, what: str) -> tuple[str, str]:
    """`NAME=PATH` → (NAME, PATH); names are what clients send, so they are kept short and plain."""
    name, equals, path = text.partition("=")
    if not equals or not name or not path:
        raise ValueError(f"{what} {text!r}: expected NAME=PATH")
    if len(name) > 64 or not all(char.isalnum() or char in "-_." for char in name):
        raise ValueError(f"{what} name {name!r}: use up to 64 letters, digits, '-', '_' or '.'")
    return name, path
