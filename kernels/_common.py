"""What the kernel launchers share: the step's skip flag."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def skip_args(skip: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The kernels' ``(skip_ptr, HAS_SKIP)`` for ``skip``: a one-element ``uint8`` view of it and True, or,
    without a flag, ``like`` (any tensor of the launch, never read) and False.

    A set flag (non-zero) masks off every store of optimizer state in the kernels (see :func:`keep_step`):
    the optimizer's check for non-finite gradients stays on the device and the step needs no host sync
    (as the ``found_inf`` argument of torch's fused optimizers). ``skip``: ``bool`` or ``uint8``, one element.
    """
    if skip is None:
        return like, False
    if not isinstance(skip, torch.Tensor) or skip.numel() != 1 or skip.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"skip must be a one-element bool or uint8 tensor, got "
                        f"{getattr(skip, 'dtype', type(skip).__name__)} {tuple(getattr(skip, 'shape', ()))}")
    if skip.device != like.device:
        raise ValueError(f"skip is on {skip.device}, the kernel's tensors on {like.device}")
    return skip.reshape(1).view(torch.uint8), True


@triton.jit
def keep_step(skip_ptr, HAS_SKIP: tl.constexpr):
    """True unless the step's skip flag is set. The kernels fold it into the masks of the stores (and, in
    the statistics kernels, of the loads) of the state they write, so a skipped step writes and counts
    nothing. Folded as ``tl.where(keep, mask, False)``: triton 3.9's interpreter rejects ``mask & keep``
    for a scalar ``keep`` loaded from memory. A mask rather than an early return: the branch cost
    registers, up to spills (b = 25: 8 bytes), in the sm_90 compiler report; the masks cost a few."""
    if HAS_SKIP:
        return tl.load(skip_ptr) == 0
    else:
        return tl.full([], 1, tl.int1)
