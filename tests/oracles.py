"""Independent oracles for the statistics of whole training loops: per-sample gradients from ``torch.func``
(vmap over grad) and the mini-block Fisher they imply, and the live tensor memory of the process."""

from __future__ import annotations

import gc
import warnings

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from mbf_triton import MBF
from mbf_triton import reference as ref


def per_sample_grads(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor | None = None,
                     ) -> dict[str, torch.Tensor]:
    """Gradients of each sample's own loss ``loss_fn(model(x_n), y_n)``, stacked over samples."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xn, yn):
        return loss_fn(functional_call(model, p, (xn.unsqueeze(0),)), None if yn is None else yn.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0 if y is not None else None))(params, x, y)


def fisher(opt: MBF, model: nn.Module, batches: list[tuple], names: list[str] | None = None,
           layouts_of: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The packed batch Fisher MBF's statistics should give when each of ``batches`` (``(loss_fn, x, y)``,
    one mean loss each) is one captured forward/backward: the mean of ``g_n g_n^T`` over all their samples.
    ``layouts_of``: the model ``opt`` holds, where ``model`` is a copy of it (e.g. in float64)."""
    psgs = [per_sample_grads(model, fn, x, y) for fn, x, y in batches]
    held = dict((layouts_of or model).named_parameters())
    out = {}
    for name in dict(model.named_parameters()):
        if names is not None and name not in names:
            continue
        g = torch.cat([ps[name] for ps in psgs])
        lay = opt.layout(held[name])
        out[name] = ref.outer_fisher(torch.stack([ref.to_blocks(gn.reshape(lay.rows, lay.cols), lay.b) for gn in g]))
    return out


def assert_fisher(opt: MBF, model: nn.Module, expected: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    """``F`` of every named parameter equals ``expected`` to ``rtol`` (relative to its largest entry)."""
    params = dict(model.named_parameters())
    assert expected
    for name, e in expected.items():
        f = opt.state[params[name]]["F"].to(e.dtype)
        scale = e.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(f, e, rtol=rtol, atol=rtol * scale, msg=name)


def live_tensor_bytes() -> int:
    """Bytes of all distinct storages of the tensors the interpreter can reach."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on some deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        try:
            if obj.is_meta:
                continue
            storage = obj.untyped_storage()
            key = storage.data_ptr()
        except Exception:  # noqa: BLE001 - tensors without real storage (sparse, functional, fake: torch.compile's)
            continue
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
