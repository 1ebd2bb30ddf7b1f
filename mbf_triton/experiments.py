"""Training experiments on data that installs offline (scikit-learn's bundled 8x8 digits).

Two tasks of the paper's families: a deep autoencoder (mirrored MLP with a narrow code layer, binary
cross-entropy on pixel intensities) and a small CNN classifier with batch norm. Used by the demo
(``python -m mbf_triton demo``) and by the full study (``perf/train_quality.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .optimizer import MBF
from .summary import format_summary, summarize

OPTIMIZERS = ("mbf", "adam", "sgd")
TASKS = ("autoencoder", "cnn")

# Hyperparameters of the demo: the points selected by the study in perf/train_quality.py (lowest final
# validation loss of each optimizer's grid, seed 0; see perf/quality/summary.md).
TUNED: dict[str, dict] = {
    "autoencoder": {
        "demo_epochs": 40,
        "mbf": {"lr": 3e-5, "damping": 1e-5, "block_size": 64, "stat_decay": 0.99, "stat_every": 1},
        "adam": {"lr": 1e-2},
        "sgd": {"lr": 1.0},
    },
    "cnn": {
        "demo_epochs": 10,
        "mbf": {"lr": 3e-4, "damping": 1e-3, "stat_decay": 0.99, "stat_every": 1},
        "adam": {"lr": 3e-3},
        "sgd": {"lr": 0.03},
    },
}


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(device: torch.device | str = "cpu", seed: int = 0) -> Split:
    """The 1797 8x8 digits of scikit-learn, pixels scaled to [0, 1], split 60/20/20 (fixed by ``seed``)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the experiments need scikit-learn: pip install 'mbf-triton[demo]'") from e
    d = sk_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm].to(device), y[perm].to(device)
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    a, b = n_train, n_train + n_val
    return Split(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:])


def autoencoder(widths: tuple[int, ...] = (64, 256, 128, 64, 8)) -> nn.Module:
    """Mirrored tanh MLP ``64-256-128-64-8-64-128-256-64`` with a linear code layer; outputs logits."""
    dims = list(widths) + list(reversed(widths[:-1]))
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i != len(widths) - 2 and i != len(dims) - 2:  # no nonlinearity at the code or the output
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def cnn() -> nn.Module:
    """Conv-BN-ReLU x3 with one pooling, then a linear classifier (10 classes)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


@dataclass(frozen=True)
class Task:
    name: str
    build: Callable[[], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (output, x, y) -> loss
    metric: str  # name of the test metric
    higher_is_better: bool


def _ae_loss(out, x, y):
    return nn.functional.binary_cross_entropy_with_logits(out, x)


def _ce_loss(out, x, y):
    return nn.functional.cross_entropy(out, y)


TASK_SPECS = {
    "autoencoder": Task("autoencoder", autoencoder, _ae_loss, "test BCE", False),
    "cnn": Task("cnn", cnn, _ce_loss, "test accuracy", True),
}


def make_optimizer(name: str, model: nn.Module, lr: float, **kw) -> torch.optim.Optimizer:
    """MBF, Adam or SGD (momentum 0.9 unless ``momentum`` is given) over ``model``; ``kw`` go to MBF."""
    if name == "mbf":
        return MBF(model, lr=lr, **kw)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=kw.get("momentum", 0.9))
    raise ValueError(f"optimizer={name!r} must be one of {OPTIMIZERS}")


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)  # full-train-set loss after each epoch
    wall_time: list[float] = field(default_factory=list)  # seconds of training (no evaluation) so far
    val_loss: float = math.nan
    test_metric: float = math.nan
    diverged: bool = False
    backend: str = "torch"  # what ran the optimizer: "torch", "triton", or MBF's mix ("triton+torch")
    summary: str = ""  # MBF's opt.summary() after training (empty for the others)

    def epochs_to(self, target: float) -> float:
        """First epoch (1-based) whose training loss is <= target, or inf."""
        return next((i + 1 for i, v in enumerate(self.train_loss) if v <= target), math.inf)


@torch.no_grad()
def _evaluate(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = model(x)
    loss = task.loss(out, x, y).item()
    if task.name == "cnn":
        metric = (out.argmax(1) == y).float().mean().item()
    else:
        metric = loss
    model.train()
    return loss, metric


def train(
    task_name: str,
    opt_name: str,
    lr: float,
    *,
    epochs: int,
    batch_size: int = 100,
    seed: int = 0,
    data: Split | None = None,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
    **opt_kw,
) -> History:
    """Train one model from a seeded initialisation; shuffles with the same seed for every optimizer."""
    task = TASK_SPECS[task_name]
    data = data if data is not None else load_digits(device)
    torch.manual_seed(seed)
    model = task.build().to(device)
    opt = make_optimizer(opt_name, model, lr, **opt_kw)
    gen = torch.Generator().manual_seed(seed)
    hist = History()
    elapsed = 0.0
    n = len(data.x_train)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        if device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = data.x_train[idx], data.y_train[idx]
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model(xb), xb, yb)
            loss.backward()
            opt.step()
        if device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        train_loss, _ = _evaluate(task, model, data.x_train, data.y_train)
        hist.train_loss.append(train_loss)
        hist.wall_time.append(elapsed)
        if on_epoch is not None:
            on_epoch(epoch, train_loss)
        if not math.isfinite(train_loss) or train_loss > 1e3:
            hist.diverged = True
            break
    if isinstance(opt, MBF):
        rows = summarize(opt)
        hist.backend = "+".join(sorted({r.backend for r in rows}, reverse=True))
        hist.summary = format_summary(opt)
        opt.remove_hooks()
    hist.val_loss, _ = _evaluate(task, model, data.x_val, data.y_val)
    _, hist.test_metric = _evaluate(task, model, data.x_test, data.y_test)
    if hist.diverged:
        hist.val_loss = math.inf
    return hist
