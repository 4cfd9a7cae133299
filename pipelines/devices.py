"""Choosing the device and dtype a model runs on."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch

from .errors import DeviceUnavailable

T = TypeVar("T")

DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["auto", "float32", "float16", "bfloat16"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DevicePlacement:
    device: torch.device
    dtype: torch.dtype

    @property
    def description(self) -> str:
        name = str(self.device)
        if self.device.type == "cuda":
            name = f"{name} ({torch.cuda.get_device_name(self.device)})"
        return f"{name}, {str(self.dtype).removeprefix('torch.')}"


def choose_placement(device: DeviceName | str = "auto", dtype: DtypeName | str = "auto") -> DevicePlacement:
    """CUDA with float16 where a GPU is present, else the CPU with float32; either can be overridden."""
    if device == "auto":
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError as error:
            raise DeviceUnavailable(f"unknown device {device!r}: {error}") from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device {device!r} was requested but this torch build sees no CUDA GPU "
                f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch"
            )
        if resolved.type not in ("cpu", "cuda"):
            raise DeviceUnavailable(f"device {device!r} is not supported; use cpu or cuda")
    if dtype == "auto":
        resolved_dtype = torch.float16 if resolved.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        resolved_dtype = _DTYPES[dtype]
    else:
        raise DeviceUnavailable(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    if resolved.type == "cpu" and resolved_dtype == torch.float16:
        raise DeviceUnavailable("float16 on the CPU is not supported by these kernels; use float32 or bfloat16")
    return DevicePlacement(device=resolved, dtype=resolved_dtype)


def in_short_lived_thread(function: Callable[[], T]) -> T:
    """Run one-off torch work (loading, warm-up) on a thread that exits when it is done.

    On the CPU, every thread that runs torch ops keeps its own OpenMP thread pool for as long as it
    lives. Once the pools together hold more threads than there are cores, libgomp throttles its
    spin-waiting and every parallel region pays a futex wake-up: measured ~30% slower frames on two
    cores. So only slot workers run torch for long; everything else runs here and takes its pool with it.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(function())
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread below
            failure.append(error)

    thread = threading.Thread(target=target, name="torch-one-off")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
