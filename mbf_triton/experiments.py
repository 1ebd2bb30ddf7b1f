"""Training experiments on data that installs offline (nothing is downloaded).

Tasks: on scikit-learn's bundled 8x8 digits, a deep autoencoder (mirrored MLP with a narrow code layer,
binary cross-entropy on pixel intensities; the paper's family), a small CNN with batch norm and a
ResNet-style CNN (batch norm, residual blocks, a strided block with a 1x1 projection); a character-level
Transformer language model on Python's own ``argparse.py`` (the source that ships with every Python:
the text differs slightly between Python versions); a tabular MLP on scikit-learn's bundled breast-cancer
table (30 standardised features, 2 classes). Used by the demo (``python -m mbf_triton demo``) and the
study (``perf/train_quality.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .optimizer import MBF
from .summary import format_summary, summarize

OPTIMIZERS = ("mbf", "adam", "sgd")
TASKS = ("autoencoder", "cnn", "resnet", "charlm", "tabular")

# Hyperparameters of the demo: the paper's method (graft=None) at the points the first digits study selected
# (lowest final validation loss of each optimizer's grid, seed 0; commit 4962760's perf/quality/summary.md).
TUNED: dict[str, dict] = {
    "autoencoder": {
        "demo_epochs": 40,
        "mbf": {"lr": 3e-5, "damping": 1e-5, "block_size": 64, "stat_decay": 0.99, "stat_every": 1, "graft": None},
        "adam": {"lr": 1e-2},
        "sgd": {"lr": 1.0},
    },
    "cnn": {
        "demo_epochs": 10,
        "mbf": {"lr": 3e-4, "damping": 1e-3, "stat_decay": 0.99, "stat_every": 1, "graft": None},
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


def _split(x: torch.Tensor, y: torch.Tensor, device, seed: int | None) -> Split:
    """60/20/20 split; shuffled by ``seed`` (None: in order, e.g. consecutive stretches of a text)."""
    if seed is not None:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        x, y = x[perm], y[perm]
    x, y = x.to(device), y.to(device)
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    return Split(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:])


CHARLM_VOCAB = 96  # newline, the 94 printable ASCII characters and space; everything else is character 95
CHARLM_CONTEXT = 32
CHARLM_CHARS = 60_000


def load_charlm_text(device: torch.device | str = "cpu", seed: int = 0) -> Split:
    """The first 60,000 characters of the standard library's ``argparse.py`` as non-overlapping windows of
    32 characters (inputs) and the same shifted by one (targets); train/val/test are consecutive stretches
    of the file (60/20/20). ``seed`` is unused (the split is by position)."""
    import argparse

    text = Path(argparse.__file__).read_text(encoding="utf-8")[: CHARLM_CHARS + 1]
    codes = [10 if c == "\n" else (ord(c) - 31 if 32 <= ord(c) < 127 else CHARLM_VOCAB - 1) for c in text]
    ids = torch.tensor(codes, dtype=torch.int64)
    n = (len(ids) - 1) // CHARLM_CONTEXT
    x = ids[: n * CHARLM_CONTEXT].reshape(n, CHARLM_CONTEXT)
    y = ids[1 : n * CHARLM_CONTEXT + 1].reshape(n, CHARLM_CONTEXT)
    return _split(x, y, device, None)


def load_breast_cancer(device: torch.device | str = "cpu", seed: int = 0) -> Split:
    """scikit-learn's bundled breast-cancer table (569 x 30, 2 classes), standardised with the training
    part's mean and deviation, split 60/20/20 (fixed by ``seed``)."""
    try:
        from sklearn.datasets import load_breast_cancer as sk_load
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the experiments need scikit-learn: pip install 'mbf-triton[demo]'") from e
    d = sk_load()
    data = _split(torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64), "cpu", seed)
    mean, std = data.x_train.mean(0), data.x_train.std(0).clamp_min(1e-6)
    parts = [((x - mean) / std).to(device) if i % 2 == 0 else x.to(device) for i, x in enumerate(vars(data).values())]
    return Split(*parts)


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


class _Residual(nn.Module):
    """``relu(body(x) + shortcut(x))``: a basic residual block (two 3x3 conv-BN), 1x1 conv-BN projection
    where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet() -> nn.Module:
    """ResNet-style digits classifier: conv-BN-ReLU stem, two residual blocks of 16 channels, a strided
    block to 32 channels (8x8 -> 4x4), global average pooling, a linear classifier."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        _Residual(16, 16), _Residual(16, 16), _Residual(16, 32, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


class CharTransformer(nn.Module):
    """Causal character-level Transformer: token and learned position embeddings, pre-norm encoder
    layers (``nn.TransformerEncoderLayer``, no dropout), a final norm and a linear read-out."""

    def __init__(self, vocab: int = CHARLM_VOCAB, context: int = CHARLM_CONTEXT, width: int = 48,
                 heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        h = self.encoder(self.embed(ids) + self.position[:t], mask=mask, is_causal=True)
        return self.head(self.norm(h))


def tabular_mlp() -> nn.Module:
    """30-64-64-2 ReLU MLP for the breast-cancer table."""
    return nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))


@dataclass(frozen=True)
class Task:
    name: str
    build: Callable[[], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (output, x, y) -> loss
    metric: str  # name of the test metric
    higher_is_better: bool
    data: Callable[..., Split] = load_digits  # (device, seed) -> the split
    batch_size: int = 100


def _ae_loss(out, x, y):
    return nn.functional.binary_cross_entropy_with_logits(out, x)


def _ce_loss(out, x, y):
    return nn.functional.cross_entropy(out.flatten(0, -2), y.flatten())  # (N, C) or (N, T, C) logits


TASK_SPECS = {
    "autoencoder": Task("autoencoder", autoencoder, _ae_loss, "test BCE", False),
    "cnn": Task("cnn", cnn, _ce_loss, "test accuracy", True),
    "resnet": Task("resnet", resnet, _ce_loss, "test accuracy", True),
    "charlm": Task("charlm", CharTransformer, _ce_loss, "test loss (nats/char)", False, load_charlm_text, 50),
    "tabular": Task("tabular", tabular_mlp, _ce_loss, "test accuracy", True, load_breast_cancer, 32),
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
    # full-train-set loss at ``evals_per_epoch`` evenly spaced steps of each epoch (the last at the epoch's end,
    # the same number as ``train_loss``), and when, in epochs (steps done / steps per epoch)
    fine_loss: list[float] = field(default_factory=list)
    fine_epoch: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)  # seconds of training (no evaluation) so far
    val_loss: float = math.nan
    test_metric: float = math.nan
    diverged: bool = False
    backend: str = "torch"  # what ran the optimizer: "torch", "triton", or MBF's mix ("triton+torch")
    summary: str = ""  # MBF's opt.summary() after training (empty for the others)

    def epochs_to(self, target: float) -> float:
        """First epoch (1-based) whose training loss is <= target, or inf."""
        return next((i + 1 for i, v in enumerate(self.train_loss) if v <= target), math.inf)


def _sync(device: torch.device | str) -> None:
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def _evaluate(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    out = model(x)
    loss = task.loss(out, x, y).item()
    if task.higher_is_better:  # accuracy
        metric = (out.argmax(-1) == y).float().mean().item()
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
    batch_size: int | None = None,
    seed: int = 0,
    data: Split | None = None,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
    make: Callable[..., torch.optim.Optimizer] | None = None,
    evals_per_epoch: int = 1,
    **opt_kw,
) -> History:
    """Train one model from a seeded initialisation; shuffles with the same seed for every optimizer.

    The training loss is evaluated on the whole training set (eval mode, no gradient: the optimizer sees
    nothing of it) ``evals_per_epoch`` times per epoch, at evenly spaced steps, the last at the epoch's end;
    evaluation is not counted in the wall time.

    ``make(model, lr, **opt_kw)`` builds an optimizer other than :func:`make_optimizer`'s (``opt_name`` is
    then only a label); one with a ``forward_backward(model, loss_fn, x)`` method (a gradient maker
    that runs its own passes, as ASDL's K-FAC) is given each batch's forward and backward."""
    task = TASK_SPECS[task_name]
    data = data if data is not None else task.data(device)
    batch_size = batch_size or task.batch_size
    torch.manual_seed(seed)
    model = task.build().to(device)
    opt = make(model, lr, **opt_kw) if make is not None else make_optimizer(opt_name, model, lr, **opt_kw)
    gen = torch.Generator().manual_seed(seed)
    hist = History()
    elapsed = 0.0
    n = len(data.x_train)
    starts = range(0, n - batch_size + 1, batch_size)
    if isinstance(evals_per_epoch, bool) or not isinstance(evals_per_epoch, int) or evals_per_epoch < 1:
        raise ValueError(f"evals_per_epoch={evals_per_epoch!r} must be an integer >= 1")
    marks = {round(len(starts) * k / evals_per_epoch) for k in range(1, evals_per_epoch + 1)} - {0}
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        _sync(device)
        t0 = time.perf_counter()
        for step, i in enumerate(starts, 1):
            idx = perm[i : i + batch_size]
            xb, yb = data.x_train[idx], data.y_train[idx]
            opt.zero_grad(set_to_none=True)
            if hasattr(opt, "forward_backward"):
                opt.forward_backward(model, lambda out, xb=xb, yb=yb: task.loss(out, xb, yb), xb)
            else:
                task.loss(model(xb), xb, yb).backward()
            opt.step()
            if step in marks:
                _sync(device)
                elapsed += time.perf_counter() - t0
                train_loss, _ = _evaluate(task, model, data.x_train, data.y_train)
                hist.fine_loss.append(train_loss)
                hist.fine_epoch.append(epoch + step / len(starts))
                t0 = time.perf_counter()
        hist.train_loss.append(train_loss)  # the last mark is the epoch's last step
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
