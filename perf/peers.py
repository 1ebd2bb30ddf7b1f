"""The optimizers the study compares MBF with: factories ``make(model, lr) -> optimizer``.

Peers from the package index are optional (``pip install 'mbf-triton[study]'``): SOAP, Shampoo and
PSGD-Kron from ``pytorch-optimizer`` (Kron needs ``opt_einsum``), K-FAC from ASDL (``asdfghjkl``, imported
as ``asdl``). Settings follow /work/shared/PEERS.md: SOAP without weight decay, Shampoo's preconditioner
every 10 steps (MBF's default statistics schedule), K-FAC's curvature and inverse every 10 steps over an
SGD-with-momentum outer optimizer, on the empirical Fisher (the statistic MBF uses; ASDL's sampled Fisher
knows only cross-entropy and MSE).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mbf_triton import MBF

MBF_VARIANTS = {
    "mbf": {"graft": None},  # the paper's method (other arguments at the package defaults)
    "mbf-graft": {"graft": "adam"},  # lr is Adam's (the recommended setting; not the default yet)
    "mbf-graft-kl": {"graft": "adam", "kl_clip": 1e-3},
    "mbf-graft-w": {"graft": "adam", "stat_warmup": 10},
    "mbf-graft-block": {"graft": "adam", "graft_scope": "block"},  # per-mini-block grafting
    "mbf-graft-block-w": {"graft": "adam", "graft_scope": "block", "stat_warmup": 10},
}


class _SumOverSamples(nn.Module):
    """The study's mean loss with the ``reduction`` switch ASDL's Fisher makers set (``"sum"``: the sum
    of per-sample losses, each the mean over its own positions/outputs)."""

    def __init__(self, loss_fn: Callable, n: int) -> None:
        super().__init__()
        self.loss_fn, self.n, self.reduction = loss_fn, n, "mean"

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(out)
        return loss * self.n if self.reduction == "sum" else loss


class AsdlKfac:
    """ASDL's K-FAC gradient maker over SGD with momentum 0.9, in the study's loop (``forward_backward``
    then ``step``)."""

    def __init__(self, model: nn.Module, lr: float, damping: float = 1e-3, interval: int = 10) -> None:
        self.model, self.damping, self.interval = model, damping, interval
        self.maker = None  # made at the first batch, whose size ASDL needs
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def forward_backward(self, model: nn.Module, loss_fn: Callable, x: torch.Tensor) -> None:
        if self.maker is None:
            from asdl import KfacGradientMaker, PreconditioningConfig

            # attention's out_proj is called functionally (ASDL asserts on it), embeddings have no emp. Kronecker
            # factors in ASDL: both left unpreconditioned (plain SGD-momentum)
            config = PreconditioningConfig(
                data_size=x.shape[0], damping=self.damping, curvature_upd_interval=self.interval,
                preconditioner_upd_interval=self.interval,
                ignore_modules=[nn.modules.linear.NonDynamicallyQuantizableLinear, nn.Embedding])
            self.maker = KfacGradientMaker(self.model, config, fisher_type="fisher_emp")
        dummy = self.maker.setup_model_call(model, x)
        self.maker.setup_loss_call(_SumOverSamples(loss_fn, x.shape[0]), dummy)
        self.maker.forward_and_backward()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.opt.step()


def make_peer(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The factory of optimizer ``name`` (one of :data:`NAMES`)."""
    if name in MBF_VARIANTS:
        return lambda model, lr, **kw: MBF(model, lr=lr, **{**MBF_VARIANTS[name], **kw})
    if name == "adam":
        return lambda model, lr, **kw: torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return lambda model, lr, **kw: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "kfac":
        return lambda model, lr, **kw: AsdlKfac(model, lr)
    import pytorch_optimizer as po

    if name == "soap":
        return lambda model, lr, **kw: po.SOAP(model.parameters(), lr=lr, weight_decay=0.0)
    if name == "shampoo":
        return lambda model, lr, **kw: po.Shampoo(model.parameters(), lr=lr, preconditioning_compute_steps=10)
    if name == "kron":
        return lambda model, lr, **kw: po.Kron(model.parameters(), lr=lr)
    raise ValueError(f"optimizer={name!r} must be one of {NAMES}")


NAMES = (*MBF_VARIANTS, "adam", "sgd", "soap", "shampoo", "kron", "kfac")
