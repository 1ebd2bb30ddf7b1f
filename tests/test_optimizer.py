"""The optimizer as a torch.optim citizen: training, param groups, schedulers, closures, checkpoints,
argument validation, non-finite gradients, the statistics schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from mbf_triton import MBF
from mbf_triton import statistics as stats


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10),
    )


def data(seed: int = 0, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def train(model, opt, steps: int, seed: int = 0, sched=None) -> list[float]:
    losses = []
    for i in range(steps):
        x, y = data(seed + i)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def test_loss_decreases_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data[:512], dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target[:512])

    def train(make):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        opt = make(model)
        first = None
        for epoch in range(8):
            for i in range(0, 512, 64):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
                loss.backward()
                opt.step()
                first = loss.item() if first is None else first
        return first, nn.functional.cross_entropy(model(x), y).item(), opt

    first, final, opt = train(lambda m: MBF(m, backend="torch"))  # the defaults: lr is Adam's 1e-3
    _, adam_final, _ = train(lambda m: torch.optim.Adam(m.parameters()))  # Adam's defaults
    assert final < 0.8 * first and final <= adam_final, (first, final, adam_final)  # measured: 2.33 -> 1.73 (Adam 1.76)
    assert opt.steps == 64 and opt.skipped_steps == 0
    _, plain_final, _ = train(lambda m: MBF(m, backend="torch", graft=None, lr=1e-3, damping=1e-3))
    assert plain_final < 0.1 * first, (first, plain_final)  # the paper's step: SGD at lr 1 on flat layers


def test_param_groups_have_their_own_hyperparameters():
    model = small_cnn()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    frozen = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    opt = MBF(model, [{"params": decay, "weight_decay": 0.1}, {"params": frozen, "lr": 0.0}], lr=0.05,
              backend="torch")
    before = [p.detach().clone() for p in frozen]
    train(model, opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen))
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def test_scheduler_changes_the_step():
    model = small_cnn()
    opt = MBF(model, lr=0.05, momentum=0.0, backend="torch")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    train(model, opt, 1, sched=sched)
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 2, seed=5)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_closure_is_called_and_its_loss_returned():
    model = small_cnn()
    opt = MBF(model, lr=0.05, backend="torch")
    x, y = data()
    calls = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        calls.append(loss.item())
        return loss

    loss = opt.step(closure)
    assert calls and loss.item() == calls[0] and opt.steps == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_roundtrip_resumes_bit_exactly(dtype):
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, stat_every=2, backend="torch")
    model = small_cnn().to(dtype)
    opt = MBF(model, **kw)
    train(model, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 4, seed=100)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = small_cnn(seed=1).to(dtype)
    model2.load_state_dict(ckpt["model"])
    opt2 = MBF(model2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    for p in model2.parameters():
        assert opt2.state[p]["F"].dtype == torch.float32
        assert opt2.state[p]["momentum_buffer"].dtype == torch.float32
    assert opt2.steps == 3
    train(model2, opt2, 4, seed=100)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[a]["F"], opt2.state[b]["F"])


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": -1.0}, "lr"), ({"lr": math.nan}, "lr"), ({"momentum": 1.0}, "momentum"),
        ({"damping": 0.0}, "damping"), ({"damping": -1e-3}, "damping"), ({"stat_decay": 1.0}, "stat_decay"),
        ({"weight_decay": -0.1}, "weight_decay"), ({"block_size": 0}, "block_size"),
        ({"block_size": 2.5}, "block_size"), ({"stat_every": 0}, "stat_every"),
        ({"loss_reduction": "max"}, "loss_reduction"), ({"backend": "cuda"}, "backend"),
    ],
)
def test_invalid_arguments_raise_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        MBF(small_cnn(), **kw)


def test_invalid_group_argument_and_model_type():
    model = small_cnn()
    with pytest.raises(ValueError, match="damping"):
        MBF(model, [{"params": list(model.parameters()), "damping": -1.0}])
    with pytest.raises(TypeError, match="nn.Module"):
        MBF(list(model.parameters()))


def test_triton_backend_on_cpu_explains_itself(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pytest.importorskip("triton")
    model = small_cnn()
    opt = MBF(model, backend="triton")
    with pytest.raises(RuntimeError, match="CUDA"):
        train(model, opt, 1)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gradient_skips_the_step(bad):
    model = small_cnn()
    opt = MBF(model, lr=0.05, backend="torch")
    train(model, opt, 2)
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for p in model.parameters() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    x, y = data(7)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0, 0, 0] = bad
    opt.step()
    assert opt.skipped_steps == 1 and opt.steps == 2
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    after = {k: v for p in model.parameters() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    assert all(torch.equal(state[k], after[k]) for k in state)
    train(model, opt, 1)  # and training goes on
    assert opt.steps == 3 and all(torch.isfinite(p).all() for p in model.parameters())


def test_stat_every_updates_statistics_on_schedule_and_captures_only_then():
    model = small_cnn()
    opt = MBF(model, lr=0.05, stat_every=3, backend="torch")
    w = model[0].weight
    history = []
    for i in range(7):
        x, y = data(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        history.append(bool(opt._capture.records))
        before = opt.state[w]["F"].clone() if opt.state[w] else None
        opt.step()
        changed = before is None or not torch.equal(before, opt.state[w]["F"])
        assert changed == (i % 3 == 0), i
    assert history == [i % 3 == 0 for i in range(7)]
    assert not opt._capture.records


def test_no_capture_in_eval_or_no_grad():
    # an eval pass (grad enabled) with no backward keeps nothing that a step would read: no output gradient,
    # and its graph is gone (the layer's next forward drops it); no_grad passes record nothing
    model = small_cnn()
    opt = MBF(model, backend="torch")
    x, _ = data()
    model.eval()
    model(x)
    model.train()
    records = [r for rs in opt._capture.records.values() for r in rs]
    assert all(not r.parts and r.graph() is None for r in records)
    opt._capture.records.clear()
    with torch.no_grad():
        model(x)
    assert not opt._capture.records
    opt.remove_hooks()
    model(x)
    assert not opt._capture.records


def test_layouts():
    model = nn.Sequential(nn.Conv2d(3, 8, (3, 5), groups=1), nn.Flatten(), nn.Linear(40, 7), nn.LayerNorm(7))
    opt = MBF(model, block_size=16, backend="torch")
    conv, lin, norm = model[0], model[2], model[3]
    assert (opt.layout(conv.weight).rows, opt.layout(conv.weight).b) == (24, 15)
    lay = opt.layout(lin.weight)
    assert (lay.rows, lay.cols, lay.b, lay.n_chunks, lay.n_blocks) == (7, 40, 16, 3, 21)
    assert opt.layout(lin.bias).b == 1 and opt.layout(norm.weight).b == 1
    assert MBF(model, block_size=100, backend="torch").layout(lin.weight).b == 40


def test_fallback_blocks_are_counted_and_finite():
    model = nn.Sequential(nn.Linear(4, 3))
    opt = MBF(model, lr=0.1, damping=1e-3, backend="torch")
    train_x, train_y = torch.randn(8, 4), torch.randn(8, 3)
    opt.zero_grad()
    nn.functional.mse_loss(model(train_x), train_y).backward()
    opt.step()
    opt.state[model[0].weight]["F"][0] = -1.0  # an indefinite block (e.g. corrupted state)
    opt.zero_grad()
    nn.functional.mse_loss(model(train_x), train_y).backward()
    opt.param_groups[0]["stat_decay"] = 0.5
    opt._counters["calls"] = 1  # next step is a statistics step anyway; make the block stay indefinite
    opt.stat_every = 1000
    opt._sync_capture()
    opt.step()
    assert opt.fallback_blocks == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_dropped_optimizer_takes_its_hooks_along():
    import gc

    model = small_cnn()
    opt = MBF(model, backend="torch")
    capture = opt._capture
    del opt
    gc.collect()
    model(data()[0])
    assert not capture.records and not capture._hook_keys
    assert not any(m._forward_hooks for m in model.modules())


def test_float64_parameters_keep_their_precision():
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.fill_(1 + 1e-12)
    opt = MBF(model, lr=0.0, backend="torch")
    nn.functional.mse_loss(model(torch.randn(4, 3, dtype=torch.float64)), torch.zeros(4, 2,
                           dtype=torch.float64)).backward()
    opt.step()
    assert (model.weight == 1 + 1e-12).all()


def test_capture_edge_cases_keyword_input_empty_batch_frozen_layer_and_retain_graph():
    torch.manual_seed(0)
    lin, frozen = nn.Linear(3, 2), nn.Linear(3, 3)
    frozen.requires_grad_(False)
    model = nn.ModuleList([lin, frozen])
    opt = MBF(model, [lin.weight, lin.bias], backend="torch")
    lin(input=torch.randn(2, 3)).sum().backward()  # keyword call: captured like a positional one
    assert opt._capture.passes(lin.weight) == 1 and len(opt._capture.records_for(lin, lin.weight)) == 1
    opt.zero_grad()
    lin(torch.randn(0, 3)).sum().backward()  # empty batch: not captured
    frozen(torch.randn(2, 3))  # frozen layer: no record keeps its input alive
    assert not opt._capture.records
    opt.zero_grad()
    x = torch.randn(5, 3)
    out = lin(frozen(x))
    out[:, 0].sum().backward(retain_graph=True)
    out[:, 1].sum().backward()  # two backward passes through one graph add up, like p.grad
    assert opt._capture.passes(lin.weight) == 2
    ((_, gout),) = opt._capture.records_for(lin, lin.weight)
    assert torch.equal(gout, torch.ones(5, 2))


def test_first_gradient_off_schedule_gets_captured_statistics_at_once():
    """A layer's statistics schedule is its own: a layer unfrozen off the global schedule was captured (it
    had no statistics yet), so its first step has per-sample statistics; then every stat_every of its steps."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    model = nn.Sequential(a, nn.Tanh(), b)
    b.requires_grad_(False)
    opt = MBF(model, list(model.parameters()), lr=0.01, stat_every=5, backend="torch")
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def one_step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    one_step()
    assert opt._capture.wanted == {id(b)}  # a's next statistics are 5 of its steps away; b has none yet
    b.requires_grad_(True)  # unfrozen at step 2, off a's schedule
    one_step()  # b had no gradient yet and was captured: statistics from per-sample gradients at once
    assert opt.state[b.weight]["stat_steps"] == 1 and opt.state[b.weight]["F"].abs().sum() > 0
    assert opt.state[a.weight]["stat_steps"] == 1
    for _ in range(3):
        assert not opt._capture.capturing
        one_step()
    assert opt._capture.wanted == {id(a)}  # a's 6th step: its statistics are due; b's come one step later
    one_step()
    assert opt.state[a.weight]["stat_steps"] == 2 and opt.state[b.weight]["stat_steps"] == 1
    assert opt._capture.wanted == {id(b)}
    one_step()
    assert opt.state[b.weight]["stat_steps"] == 2


def test_weight_norm_style_extra_parameters_are_diagonal():
    lin = nn.Linear(3, 2)
    lin.scale = nn.Parameter(torch.ones(2))
    opt = MBF(lin, backend="torch")
    assert opt.layout(lin.scale).kind == "diag" and opt.layout(lin.weight).kind == "linear"
    (lin(torch.randn(4, 3)) * lin.scale).sum().backward()
    opt.step()


@pytest.mark.parametrize("kw", [{"lr": "0.1"}, {"lr": None}, {"damping": "1e-3"}, {"momentum": [0.9]}])
def test_wrong_types_raise_value_error(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        MBF(small_cnn(), **kw)


def test_zero_size_parameter_and_zero_grad_clearing():
    model = nn.Sequential(nn.Linear(3, 2))
    model.empty = nn.Parameter(torch.zeros(0))
    opt = MBF(model, backend="torch")
    out = model(torch.randn(4, 3)).sum() + model.empty.sum()
    out.backward()
    assert opt._capture.records
    opt.step()
    model(torch.randn(4, 3)).sum().backward()
    opt.zero_grad()  # drops records that no step consumed
    assert not opt._capture.records


def test_dispatch_rules():
    from mbf_triton.backends import get_backend, triton_available

    cuda = torch.device("cuda")
    assert get_backend("auto", cuda, torch.float64).name == "torch"  # kernels are fp32/bf16/fp16 only
    assert get_backend("auto", torch.device("cpu"), torch.float32).name == "torch"
    assert get_backend("torch", cuda, torch.float32).name == "torch"
    if triton_available():
        assert get_backend("auto", cuda, torch.bfloat16).name == "triton"
        with pytest.raises(ValueError, match="float64"):
            get_backend("triton", cuda, torch.float64)


def test_zero_grad_between_forward_and_backward_keeps_the_statistics():
    """The common loop order forward -> zero_grad -> backward -> step gives the same F as the usual one."""
    def run(zero_grad_after_forward: bool):
        model = small_cnn()
        opt = MBF(model, lr=0.05, backend="torch")
        x, y = data()
        if not zero_grad_after_forward:
            opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if zero_grad_after_forward:
            opt.zero_grad()
        loss.backward()
        opt.step()
        return [opt.state[p]["F"] for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_param_group_added_later_gets_mini_blocks_and_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = MBF(model, list(model[0].parameters()), block_size=2, backend="torch")
    opt.add_param_group({"params": list(model[2].parameters())})
    assert opt.layout(model[2].weight).kind == "linear"
    nn.functional.mse_loss(model(torch.randn(6, 4)), torch.randn(6, 2)).backward()
    opt.step()
    assert opt.state[model[2].weight]["F"].shape == (4, 3) and opt.state[model[2].weight]["stat_steps"] == 1


class _SelfCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ``copy_`` calls whose source and destination are the same memory."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default and args[0].data_ptr() == args[1].data_ptr():
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_step_makes_no_self_copies_of_the_parameters():
    """The update writes the parameters in place: no copy of a tensor onto its own memory (one extra
    kernel launch and a full read+write of the parameter per tensor on a GPU)."""
    model = small_cnn()
    opt = MBF(model, backend="torch", stat_every=1)
    for i in range(2):
        x, y = data(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with _SelfCopies() as spy:
            opt.step()
        assert spy.count == 0


def run_steps(model, opt, steps, mutate=None, start=0):
    for i in range(start, start + steps):
        if mutate is not None and i == 1:
            mutate(model)
        x, y = data(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("mutate", ["new_storage", "non_contiguous", "state_reset"])
def test_cached_step_plan_follows_changes_between_steps(mutate):
    """The optimizer caches its per-parameter plan between steps; a parameter moved to new storage (same
    values), made non-contiguous (same values), or a state reset by the caller must be followed."""
    def new_storage(model):
        model[-1].weight.data = model[-1].weight.data.clone()

    def non_contiguous(model):
        w = model[3].weight.data  # (6, 2, 3, 3)
        model[3].weight.data = w.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)

    ref_model, model = small_cnn(), small_cnn()
    if mutate == "state_reset":  # the same as a new optimizer from step 1 on
        ref_opt, opt = (MBF(m, lr=0.05, backend="torch", stat_every=1) for m in (ref_model, model))
        run_steps(ref_model, ref_opt, 1)
        ref_opt.remove_hooks()
        run_steps(ref_model, MBF(ref_model, lr=0.05, backend="torch", stat_every=1), 2, start=1)
        run_steps(model, opt, 3, lambda _: opt.state.clear())
        assert all(s["stat_steps"] == 2 for s in opt.state.values())
        for p, q in zip(ref_model.parameters(), model.parameters()):
            assert torch.equal(p, q)
        return
    ref_opt = MBF(ref_model, lr=0.05, backend="torch", stat_every=2)
    opt = MBF(model, lr=0.05, backend="torch", stat_every=2)
    run_steps(ref_model, ref_opt, 3)
    run_steps(model, opt, 3, {"new_storage": new_storage, "non_contiguous": non_contiguous}[mutate])
    if mutate == "non_contiguous":
        assert not model[3].weight.is_contiguous()
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_statistics_of_all_1x1_block_parameters_are_one_batched_update(monkeypatch):
    """Norm scales and shifts (here: 2 BatchNorm layers, 4 parameters) and layer biases (the Linear's), all
    from per-sample data, take one ``diag_fisher_ema_`` per statistics step, not several launches per
    parameter."""
    from mbf_triton import reference

    calls = []
    real = reference.diag_fisher_ema_

    def spy(fs, grads, decay, skip=None, fhats=()):
        calls.append((len(grads), len(fhats), decay))
        real(fs, grads, decay, skip, fhats=fhats)

    monkeypatch.setattr(reference, "diag_fisher_ema_", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(2, 1, 8, 8))
    opt = MBF(model, backend="torch", stat_every=2, stat_decay=0.5)
    run_steps(model, opt, 3)
    assert calls == [(0, 5, 0.0), (0, 5, 0.5)]  # steps 0 and 2
    bn = model[1].weight
    assert opt.state[bn]["stat_steps"] == 2


def test_batched_1x1_statistics_use_each_groups_decay():
    """Biases and LayerNorm parameters in a group with their own ``stat_decay``: the batched 1x1 update
    folds their second statistic with that decay (and the weights' with theirs)."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))

    def batch(i):
        gen = torch.Generator().manual_seed(i)
        return torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)

    model = build()
    diag = [model[0].bias, model[1].weight, model[1].bias, model[2].bias]
    opt = MBF(model, [{"params": [model[0].weight, model[2].weight], "stat_decay": 0.9},
                      {"params": diag, "stat_decay": 0.25}], lr=0.0, momentum=0.0, stat_every=1, backend="torch")
    first = []
    for i in range(2):
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if i == 0:
            first = [opt.state[p]["F"].clone() for p in diag]
    fresh = build()  # the second batch's statistic alone (lr 0: same parameters)
    fresh_opt = MBF(fresh, lr=0.0, momentum=0.0, stat_every=1, backend="torch")
    x, y = batch(1)
    nn.functional.mse_loss(fresh(x), y).backward()
    fresh_opt.step()
    fresh_diag = [fresh[0].bias, fresh[1].weight, fresh[1].bias, fresh[2].bias]
    for p, q, f1 in zip(diag, fresh_diag, first):
        assert torch.equal(opt.state[p]["F"], torch.lerp(fresh_opt.state[q]["F"], f1, 0.25))


def test_cached_step_plan_follows_param_group_changes():
    """The plan is keyed by the param groups too: a rebuilt group dict, or a parameter moved to another
    group (same order of parameters), takes the new group's hyperparameters."""
    def ones(model):
        for p in model.parameters():
            p.grad = torch.ones_like(p)

    model = nn.Linear(4, 3)
    opt = MBF(model, backend="torch", lr=0.1)
    ones(model)
    opt.step()
    opt.param_groups[0] = dict(opt.param_groups[0])
    ones(model)
    opt.step()  # used to raise KeyError
    model = nn.Linear(4, 3)
    opt = MBF(model, [{"params": [model.weight, model.bias], "lr": 0.1}, {"params": [], "lr": 0.0}],
              backend="torch")
    ones(model)
    opt.step()
    opt.param_groups[0]["params"] = [model.weight]
    opt.param_groups[1]["params"].append(model.bias)
    bias, weight = model.bias.detach().clone(), model.weight.detach().clone()
    ones(model)
    opt.step()
    assert torch.equal(model.bias, bias) and not torch.equal(model.weight, weight)


def test_parameter_memory_freed_in_place_and_reallocated():
    """FSDP/ZeRO-style code frees a parameter's storage in place (resize_(0)) and sets ``.data`` to a new
    tensor, which may land at the old address: the update must go to the new tensor."""
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(1 << 24))  # 64 MiB: glibc mmaps it, and a new one often reuses the address
    opt = MBF(model, backend="torch", lr=0.1, stat_every=1)
    w = model.w
    for step in range(3):
        w.grad = torch.ones_like(w)
        if step == 2:
            w.untyped_storage().resize_(0)
            w.data = torch.zeros(1 << 24)
        opt.step()
    assert (w != 0).all()


def test_failed_statistics_step_leaves_first_estimates_pending(monkeypatch):
    """If a later layer's statistics raise (e.g. out of memory, caught by the loop), parameters whose
    batched 1x1 statistics did not run are not counted as having a first estimate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3))
    opt = MBF(model, backend="torch", stat_every=1)
    real = stats.batch_statistics

    def flaky(backend, p, *args, **kw):
        if p is model[1].weight:
            raise RuntimeError("out of memory (simulated)")
        return real(backend, p, *args, **kw)

    monkeypatch.setattr(stats, "batch_statistics", flaky)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    state = opt.state[model[0].weight]
    assert state["stat_steps"] == 0 and (state["F"] == 0).all()


def test_checkpoint_of_another_model_is_refused_clearly_at_the_step():
    def net(width):
        return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 2))

    x, y = torch.randn(6, 4), torch.randn(6, 2)
    small = net(5)
    opt = MBF(small, backend="torch")
    nn.functional.mse_loss(small(x), y).backward()
    opt.step()
    big = net(7)
    opt2 = MBF(big, backend="torch")
    opt2.load_state_dict(opt.state_dict())
    nn.functional.mse_loss(big(x), y).backward()
    before = [p.detach().clone() for p in big.parameters()]
    with pytest.raises(ValueError, match="checkpoint of another model"):
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(before, big.parameters()))  # no partial step
