"""Devices and precision: ``--device auto`` (cuda, then mps, then cpu) and ``--precision`` (autocast).

The weights stay in their dtype (fp32 by default); ``bf16``/``fp16`` run the loss and generation
under ``torch.autocast`` on the pipeline's device, where that device supports the dtype.
"""

from __future__ import annotations

import time
import warnings
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from scdkit.errors import UsageError

DEVICES = ("auto", "cpu", "cuda", "mps")
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Runtime(BaseModel):
    """Where and how a command runs its model(s); never stored in a checkpoint."""

    model_config = ConfigDict(extra="forbid")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp32, or bf16/fp16 autocast")
    compile: bool = Field(False, description="torch.compile the per-step decoder call and the encoder step "
                                             "(the warm-up run's time, compilation included, is reported apart)")
    attention: str | None = Field(None, description="attention backend: sdpa, eager, chunked, flash or auto "
                                                    "(default: $SCDKIT_ATTENTION, then the registry's)")


def resolve_device(name: str = "auto") -> tuple[torch.device, str]:
    """The device for ``name`` (``auto``: cuda, then mps, then cpu; ``cuda:1`` picks a GPU) and a line
    saying what was chosen. Asking for a device this machine lacks is a UsageError."""
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise UsageError(f"--device {name}: unknown device; choose one of: {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        for candidate in ("cuda", "mps"):
            if _available(candidate):
                return torch.device(candidate), f"device: auto picked {candidate}"
        return torch.device("cpu"), "device: auto picked cpu (no cuda or mps)"
    if not _available(kind):
        raise UsageError(f"--device {name}: not available on this machine (torch {torch.__version__}, "
                         f"torch.{'cuda' if kind == 'cuda' else 'backends.mps'}.is_available() is False)")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device, f"device: {name}"


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind == "cpu"


def check_precision(precision: str, device: torch.device) -> None:
    """A UsageError unless ``precision`` can run on ``device``."""
    if precision not in AUTOCAST_DTYPES:
        raise UsageError(f"--precision {precision}: choose one of: {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this CUDA device does not support bf16; use fp16")
    with warnings.catch_warnings(record=True) as caught:  # torch warns (and disables) for an unsupported dtype
        warnings.simplefilter("always")
        with torch.autocast(device.type, dtype=dtype):
            enabled = torch.is_autocast_enabled(device.type)
    if not enabled or any("autocast" in str(w.message).lower() for w in caught):
        raise UsageError(f"--precision {precision}: autocast to {precision} is not supported on {device.type}")


def synchronize(device: torch.device) -> float:
    """Wait for the device's queued work, then return ``time.perf_counter()``: a timestamp that means
    the work is done (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()
