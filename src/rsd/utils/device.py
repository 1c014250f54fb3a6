"""One rule for turning a device request (``auto``, ``cpu``, ``cuda:1``) into a ``torch.device``."""

from __future__ import annotations

import torch


class DeviceUnavailableError(RuntimeError):
    """The requested device (e.g. ``cuda``) does not exist on this machine."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; a CUDA request without a GPU raises, so a
    run never silently falls back to a 100x slower device."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceUnavailableError(f"invalid device {device!r} ({err}); use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {device!r} was requested but this machine has no usable CUDA GPU (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'none'}): use device=cpu (slow, float32) or device=auto, "
                "or run on a GPU machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"device {device!r} was requested but only {torch.cuda.device_count()} "
                                         "CUDA device(s) are visible")
    elif dev.type not in ("cpu", "mps"):
        raise DeviceUnavailableError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev
