"""Where tuning runs: the on/off switch, the interpreter, the device's name and the versions that key the
cache."""

from __future__ import annotations

import os

import torch

from .._version import __version__

ENV_ENABLE = "MBF_TRITON_AUTOTUNE"
MODES = ("auto", "off", "force")

_ENABLED_OVERRIDE: bool | None = None


def set_enabled(enabled: bool | None) -> None:
    """Turn autotuning on (``True``), off (``False``: the kernels' fixed heuristic configs) or back to the
    environment (``None``: ``MBF_TRITON_AUTOTUNE``, default on). Affects every
    :class:`~mbf_triton.tuning.Tuner` built without an explicit ``mode``."""
    global _ENABLED_OVERRIDE
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled={enabled!r} must be True, False or None")
    _ENABLED_OVERRIDE = enabled


def enabled_override() -> bool | None:
    """What :func:`set_enabled` said last (``None``: follow the environment)."""
    return _ENABLED_OVERRIDE


def is_enabled() -> bool:
    """Whether tuning is switched on (by :func:`set_enabled`, else ``MBF_TRITON_AUTOTUNE``)."""
    if _ENABLED_OVERRIDE is not None:
        return _ENABLED_OVERRIDE
    return os.environ.get(ENV_ENABLE, "1").strip().lower() not in ("0", "false", "off", "no")


def interpreted() -> bool:
    """Whether the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-interpreter" if interpreted() else "cpu"


def versions() -> dict[str, str]:
    import triton

    return {"triton": triton.__version__, "mbf_triton": __version__, "torch": torch.__version__}
