"""Host-side cost of ``MBF.step()`` with the Triton kernels stubbed out: no GPU needed.

On a launch-bound model (ResNet-32 at batch 128 on an H100) the CPU time that ``opt.step()`` spends in
Python, argument checks, torch glue ops and kernel launches adds to the iteration time. This script
measures that part alone, on the CPU: ``backend="triton"`` with every ``*_kernel`` of
``mbf_triton.kernels`` replaced by a stub that only counts its launches (``TRITON_INTERPRET=1`` lets the
Triton backend accept CPU tensors; nothing is interpreted because nothing runs). The torch ops that the
step still issues are counted with a dispatch mode (views excluded), as a proxy for the CUDA launches a
GPU step would make besides the Triton ones. A tiny batch keeps the real torch ops cheap, so the times
are dominated by host overhead; they are this machine's numbers, not a GPU's. One difference from a GPU:
the CPU allocator gives the fresh gradients of every backward new addresses, so the grouped update's
address table is rebuilt each step here, where CUDA's caching allocator usually hands back the same
blocks and the cached table is reused. Usage::

    python perf/host_overhead.py                 # ResNet-32, VGG-16 and the autoencoder
    python perf/host_overhead.py --models resnet32 --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors are accepted, no GPU needed

import models  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as tnf  # noqa: E402
from mbf_triton.kernels import block_update, fisher_stats  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from mbf_triton import MBF  # noqa: E402

VIEW_OPS = {"view", "_unsafe_view", "as_strided", "unfold", "reshape", "expand", "select", "slice", "detach",
            "t", "permute", "unsqueeze", "squeeze", "alias", "split", "split_with_sizes", "transpose",
            "lift_fresh", "_reshape_alias"}


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in VIEW_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _StubKernel:
    """Stands in for a ``triton.jit`` kernel: ``kernel[grid](...)`` counts and returns None."""

    launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _StubKernel.launches += 1
        return launch


def stub_kernels() -> list[str]:
    names = []
    for mod in (block_update, fisher_stats):
        for name in dir(mod):
            if name.endswith("_kernel") and hasattr(getattr(mod, name), "run"):
                setattr(mod, name, _StubKernel())
                names.append(f"{mod.__name__.rsplit('.', 1)[-1]}.{name}")
    return names


MODELS = {
    "resnet32": (models.resnet32, lambda g: (torch.randn(2, 3, 32, 32, generator=g),
                                             torch.randint(0, 10, (2,), generator=g)), "ce"),
    "vgg16": (models.vgg16, lambda g: (torch.randn(2, 3, 32, 32, generator=g),
                                       torch.randint(0, 10, (2,), generator=g)), "ce"),
    "autoencoder": (models.deep_autoencoder, lambda g: (torch.rand(2, 784, generator=g),) * 2, "bce"),
}


def measure(name: str, stat_every: int, steps: int) -> dict[str, object]:
    build, batch, loss_kind = MODELS[name]
    torch.manual_seed(0)
    model = build()
    gen = torch.Generator().manual_seed(0)
    x, y = batch(gen)
    opt = MBF(model, backend="triton", stat_every=stat_every)

    def loss() -> torch.Tensor:
        out = model(x)
        return tnf.cross_entropy(out, y) if loss_kind == "ce" else tnf.binary_cross_entropy_with_logits(out, y)

    host, launches, ops = [], [], []
    for i in range(steps + 4):
        opt.zero_grad()
        loss().backward()
        _StubKernel.launches = 0
        if i == 3:  # one counted step: the dispatch mode's own overhead stays out of the timed ones
            with _CountOps() as counter:
                opt.step()
            launches.append(_StubKernel.launches)
            ops.append(counter.count)
            continue
        t0 = time.perf_counter()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= 3:  # the first steps create state and choose configurations
            host.append(dt * 1e3)
    opt.remove_hooks()
    n_tensors = sum(1 for p in model.parameters() if p.requires_grad)
    return {"model": name, "tensors": n_tensors, "stat_every": stat_every,
            "host_ms": statistics.median(host), "triton_launches": statistics.median(launches),
            "torch_ops": statistics.median(ops)}


def _finite_check_ops(nonfinite_flags) -> int:
    grads = [torch.ones(3), torch.ones(2, 2)]
    with _CountOps() as counter:
        nonfinite_flags(grads)
    return counter.count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per case (after 3 untimed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    stubbed = stub_kernels()
    # The finite check's arithmetic (max |g| over every gradient) is real work on the CPU, a few launches
    # on a GPU: it is counted with the torch ops but kept out of the timed host work.
    real_flags = MBF._nonfinite_flags
    no_skip = torch.zeros(1, dtype=torch.bool)
    MBF._nonfinite_flags = staticmethod(lambda grads, found_inf=None: {grads[0].device: no_skip})
    print(f"torch {torch.__version__}; {len(stubbed)} Triton kernels stubbed; host time on this CPU, batch 2, "
          "finite check not timed (its ops are counted)")
    print("| model | tensors | statistics | host ms / step | Triton launches | other torch ops |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for stat_every, label in ((10**9, "no"), (1, "yes")):
            r = measure(name, stat_every, args.steps)
            r["torch_ops"] += _finite_check_ops(real_flags)
            print(f"| {name} | {r['tensors']} | {label} | {r['host_ms']:.2f} | {r['triton_launches']:.0f} | "
                  f"{r['torch_ops']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
