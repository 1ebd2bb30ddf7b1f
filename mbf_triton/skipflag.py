"""The device-side skip flag of a step: a gradient with NaN/Inf (or GradScaler's ``found_inf``) skips the
whole step on the device, every state-writing op reads the flag, and the host reads it one step late
(:class:`Unsettled`), so ``step()`` never waits for the GPU."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(eq=False)  # compared by identity (list.remove in MBF._settle)
class Unsettled:
    """A step whose skip flag the host has not read yet: its counters are provisional until then."""

    flag: torch.Tensor  # the flag, on the host (a pinned copy of the device's) once ``event`` has completed
    event: Any  # torch.cuda.Event recorded after the copy, or None when ``flag`` can be read as it is
    counted: list[tuple[dict[str, Any], torch.Tensor]]  # (state, its F) whose ``stat_steps`` the step counted
    first_statistics: bool  # some of them started their statistics in this step
    counts_step: bool = True  # False for a step that raised: ``steps`` was not incremented



def nonfinite_flags(grads: list[torch.Tensor], found_inf: torch.Tensor | None = None,
                     ) -> dict[torch.device, torch.Tensor]:
    """Per device of ``grads``, a one-element bool flag, true if any gradient entry (on any device) is NaN
    or Inf (max |g| is then NaN or Inf), or if GradScaler's ``found_inf`` is set. A few small launches, no
    host synchronisation."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        gs = by_device.setdefault(g.device, [])
        if g.numel():  # an empty FSDP2 shard has nothing to check (and no infinity norm)
            gs.append(g)
    # max |g| < inf is false for NaN and Inf (two ops where isfinite takes four)
    bad = {device: (torch.stack(torch._foreach_norm(gs, math.inf)) < math.inf).all().logical_not() if gs
           else torch.zeros((), dtype=torch.bool, device=device) for device, gs in by_device.items()}
    if found_inf is not None:
        bad = {device: b | (found_inf.to(device, non_blocking=True).reshape(()) > 0) for device, b in bad.items()}
    if len(bad) > 1:  # one step on several devices: skipped everywhere or nowhere
        anywhere = [torch.stack([b.to(device) for b in bad.values()]).any() for device in bad]
        bad = dict(zip(bad, anywhere))
    return {device: b.reshape(1) for device, b in bad.items()}

def unscale_(grads: list[torch.Tensor], grad_scale: torch.Tensor | None, unscaled: bool = False,
              ) -> dict[torch.device, torch.Tensor] | None:
    """Divide the gradients by GradScaler's scale in place, on the device; per device, the inverse scale
    (a 0-dim fp32 tensor) that the captured output gradients are multiplied by too (None: no scaler).
    ``unscaled``: ``scaler.unscale_(opt)`` already divided the gradients; only the inverse is returned."""
    if grad_scale is None:
        return None
    inv = grad_scale.double().reciprocal().float().reshape(())
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    invs = {device: inv.to(device, non_blocking=True) for device in by_device}
    if not unscaled:
        for device, gs in by_device.items():
            torch._foreach_mul_(gs, invs[device])
    return invs


def loss_scale(opt: Any) -> tuple[torch.Tensor | None, bool]:
    """``(scale, unscaled)``: the loss scale of the backward passes ``opt.step()`` consumes, and whether
    the gradients are already divided by it. ``scaler.step(opt)`` hands an optimizer with
    ``_step_supports_amp_scaling`` its ``grad_scale`` (and ``found_inf``) as attributes; after
    ``scaler.unscale_(opt)`` (to clip) it hands no scale, but the captured output gradients still carry
    it. torch has no API for it then, so the calling ``GradScaler.step`` is found on the stack (its
    per-optimizer stage says ``unscale_`` ran) and its scale read as a device tensor (no sync); the scale
    changes only in ``scaler.update()``, after the step. Raises if no such caller is found."""
    grad_scale, found_inf = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
    if grad_scale is not None or found_inf is None:
        return grad_scale, False
    frame = sys._getframe(1)
    for _ in range(16):
        frame = frame.f_back
        if frame is None:
            break
        scaler = frame.f_locals.get("self")
        if isinstance(scaler, torch.amp.GradScaler) and frame.f_code.co_name == "step":
            stage = scaler._per_optimizer_states.get(id(opt), {}).get("stage")
            if getattr(stage, "name", None) == "UNSCALED" and getattr(scaler, "_scale", None) is not None:
                return scaler._scale, True
    raise RuntimeError(
        "the optimizer was given found_inf but no grad_scale, as GradScaler does after scaler.unscale_(opt), "
        "but the calling GradScaler.step was not found: MBF's statistics (captured output gradients) "
        "still carry the loss scale; call opt.step() through scaler.step(opt)")


def unsettled_step(skip: dict[torch.device, torch.Tensor], counted: list, first: bool,
                    counts_step: bool = True) -> Unsettled:
    flag = next(iter(skip.values()))  # the same value on every device
    if flag.device.type != "cuda":
        return Unsettled(flag, None, counted, first, counts_step)
    host = torch.empty(1, dtype=torch.bool, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(flag.device))
    return Unsettled(host, event, counted, first, counts_step)
