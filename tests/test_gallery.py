"""A gallery of everyday training loops, each checked against an independent oracle: per-sample gradients
from ``torch.func`` (float64 copies of the models) or the equivalent plain loop. Every loop also runs on the
Triton backend (under the interpreter on a CPU) and must agree with the torch backend.

Models are float32 and tiny (the interpreter runs every kernel program in Python). Oracle checks use
``lr=0`` and ``stat_decay=0`` where the oracle needs the parameters the statistics were taken at: ``F`` is
then exactly the last statistics step's ``Fhat``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.utils.checkpoint as ckpt
from conftest import kernel_device
from oracles import assert_fisher, fisher
from torch import nn

from mbf_triton import MBF

LOOPS = {}


def loop(fn):
    LOOPS[fn.__name__] = fn
    return fn


def mse(out, y):
    return nn.functional.mse_loss(out, y)


def mlp(*sizes: int) -> nn.Sequential:
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def frozen_stats(model, backend, **kw) -> MBF:
    """Parameters stay put (lr=0) and F is the last statistics step's Fhat (stat_decay=0)."""
    kw = {"stat_every": 1, **kw}
    return MBF(model, lr=0.0, momentum=0.0, stat_decay=0.0, backend=backend, **kw)


def oracle(opt, model, batches, names=None):
    """:func:`oracles.fisher` on a float64 copy of ``model`` and the batches."""
    model64 = copy.deepcopy(model).double()

    def cast(t):
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return fisher(opt, model64, [(fn, cast(x), cast(y)) for fn, x, y in batches], names, layouts_of=model)


def data(gen, *shape):
    return torch.randn(*shape, generator=gen)


# ---------------------------------------------------------------- loops with a per-sample oracle
@loop
def gan_with_module_zero_grad(backend):
    """PyTorch's DCGAN example: netD.zero_grad(), real and fake passes, then G's pass through D."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net_d, net_g = mlp(3, 4, 1), mlp(2, 3)
    opt_d = frozen_stats(net_d, backend)
    opt_g = MBF(net_g, lr=0.05, backend=backend)
    bce = nn.functional.binary_cross_entropy_with_logits
    ones, zeros = torch.ones(5, 1), torch.zeros(5, 1)
    for _ in range(2):
        real, fake = data(gen, 5, 3), net_g(data(gen, 5, 2))
        net_d.zero_grad()
        bce(net_d(real), ones).backward()
        bce(net_d(fake.detach()), zeros).backward()
        opt_d.step()
        net_g.zero_grad()
        bce(net_d(fake), ones).backward()
        opt_g.step()
    return net_d, opt_d, oracle(opt_d, net_d, [(bce, real, ones), (bce, fake.detach(), zeros)])


@loop
def wgan_gradient_penalty(backend):
    """The critic's penalty gradient comes from autograd.grad(create_graph=True): not a pass of the step."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    critic = mlp(3, 4, 1)
    opt = frozen_stats(critic, backend)
    for _ in range(2):
        real, fake = data(gen, 6, 3), data(gen, 6, 3)
        opt.zero_grad()
        xh = (0.5 * real + 0.5 * fake).requires_grad_(True)
        (gx,) = torch.autograd.grad(critic(xh).sum(), xh, create_graph=True)
        penalty = ((gx.norm(dim=1) - 1) ** 2).mean()
        (critic(fake).mean() - critic(real).mean() + 10 * penalty).backward()
        opt.step()

    def pos(out, _):
        return out.mean()

    def neg(out, _):
        return -out.mean()

    # the last layer's output is not on the penalty's path: its statistics are the critic loss' alone
    return critic, opt, oracle(opt, critic, [(neg, real, None), (pos, fake, None)], names=["2.weight", "2.bias"])


@loop
def pgd_adversarial_training(backend):
    """Three PGD steps by autograd.grad after zero_grad, then the step on the adversarial batch."""
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = mlp(4, 5, 3)
    opt = frozen_stats(model, backend)
    xent = nn.functional.cross_entropy
    for _ in range(2):
        x, y = data(gen, 6, 4), torch.randint(0, 3, (6,), generator=gen)
        opt.zero_grad()
        x_adv = x.clone()
        for _ in range(3):
            x_adv.requires_grad_(True)
            (g,) = torch.autograd.grad(xent(model(x_adv), y), x_adv)
            x_adv = (x_adv + 0.05 * g.sign()).detach()
        xent(model(x_adv), y).backward()
        opt.step()
    return model, opt, oracle(opt, model, [(xent, x_adv, y)])


@loop
def round_robin_multitask(backend):
    """Two heads on a shared trunk, alternating; stat_every=2 counts each layer's own steps."""
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.ModuleDict({"trunk": mlp(4, 5), "a": mlp(5, 2), "b": mlp(5, 3)})
    opt = frozen_stats(model, backend, stat_every=2)
    last = {}
    for step in range(6):
        name = "ab"[step % 2]
        x, y = data(gen, 6, 4), data(gen, 6, model[name][0].out_features)
        opt.zero_grad()
        h = model["trunk"](x)
        mse(model[name](h), y).backward()
        opt.step()
        if step in (4, 5):  # the heads' third own steps: their second statistics
            last[name] = (h.detach(), y)
        if step == 4:
            trunk_batch = (x, model["a"], y)

    expected = {}
    for name in "ab":
        expected.update({f"{name}.{k}": v for k, v in oracle(opt, model[name], [(mse, *last[name])]).items()})
    x, head_a, y = trunk_batch
    head64 = copy.deepcopy(head_a).double()

    def through_a(out, target):
        return mse(head64(out), target)

    trunk_f = oracle(opt, model["trunk"], [(through_a, x, y)])
    expected.update({f"trunk.{k}": v for k, v in trunk_f.items()})
    return model, opt, expected


@loop
def gradient_accumulation_k4(backend):
    """K=4 micro-batches with their mean losses summed by backward(): the full batch's statistics, for the
    hooked layers, LayerNorm and the batch-gradient parameters (an embedding) alike."""
    def run(k):
        torch.manual_seed(4)
        model = nn.Sequential(nn.Embedding(9, 6), nn.LayerNorm(6), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
        opt = frozen_stats(model, backend)
        gen = torch.Generator().manual_seed(4)
        tokens, y = torch.randint(0, 9, (8,), generator=gen), data(gen, 8, 2)
        opt.zero_grad()
        for i in range(k):
            sl = slice(2 * i * 4 // k, 2 * (i + 1) * 4 // k)
            mse(model(tokens[sl]), y[sl]).backward()
        opt.step()
        return model, opt, tokens, y

    model, opt, tokens, y = run(4)
    full_model, full_opt, _, _ = run(1)
    expected = oracle(opt, model, [(mse, tokens, y)], names=["1.weight", "1.bias", "2.weight", "4.weight", "4.bias"])
    expected["0.weight"] = full_opt.state[full_model[0].weight]["F"].double()
    return model, opt, expected


@loop
def frozen_then_unfrozen(backend):
    """A layer frozen for two steps, then trained: its first statistics are those of its first step."""
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = mlp(4, 5, 3)
    model[0].requires_grad_(False)
    opt = frozen_stats(model, backend, params=list(model.parameters()), stat_every=3)
    for step in range(3):
        if step == 2:
            model[0].requires_grad_(True)
        x, y = data(gen, 6, 4), data(gen, 6, 3)
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    return model, opt, oracle(opt, model, [(mse, x, y)], names=["0.weight", "0.bias"])


@loop
def add_param_group_head(backend):
    """A head added to the optimizer later (add_param_group) gets statistics at its first step."""
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    model = nn.ModuleDict({"body": mlp(4, 5), "head": mlp(5, 3)})
    opt = frozen_stats(model, backend, params=list(model["body"].parameters()), stat_every=4)
    for step in range(3):
        if step == 2:
            opt.add_param_group({"params": list(model["head"].parameters())})
        x, y = data(gen, 6, 4), data(gen, 6, 3)
        opt.zero_grad()
        h = model["body"](x)
        mse(model["head"](h), y).backward()
        opt.step()
    head_f = oracle(opt, model["head"], [(mse, h.detach(), y)])
    return model, opt, {f"head.{k}": v for k, v in head_f.items()}


# ---------------------------------------------------------------- loops against the plain loop
def _plain(backend, variant: str, steps: int = 3):
    """A small conv/MLP trained with lr > 0, in one of several equivalent ways."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 6), nn.LayerNorm(6),
                          nn.Tanh(), nn.Linear(6, 2))
    opt = MBF(model, lr=0.02, damping=0.1, stat_every=2, backend=backend)
    gen = torch.Generator().manual_seed(7)
    forward = model
    if variant == "compile":
        forward = torch.compile(model, backend="aot_eager")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=variant.endswith("grad_scaler"))
    for _ in range(steps):
        x, y = data(gen, 5, 2, 6), data(gen, 5, 2)

        def closure():
            opt.zero_grad()
            if variant == "checkpoint":
                h = ckpt.checkpoint(model[:4], x, use_reentrant=False)
                out = model[4:](h)
            elif variant == "checkpoint_reentrant":
                h = ckpt.checkpoint(model[:4], x.requires_grad_(), use_reentrant=True)
                out = model[4:](h)
            elif variant.endswith("autocast") or variant.startswith("fp16"):
                dtype = torch.bfloat16 if variant.startswith("bf16") else torch.float16
                with torch.autocast("cpu", dtype=dtype):
                    out = forward(x)
                out = out.float()
            else:
                out = forward(x)
            loss = mse(out, y)
            scaler.scale(loss).backward()
            return loss

        if variant == "closure":
            opt.step(closure)
        else:
            closure()
            scaler.step(opt)
            scaler.update()
    return model, opt


def _against_plain(variant):
    def run(backend):
        model, opt = _plain(backend, variant)
        ref_model, ref_opt = _plain(backend, "plain")
        for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
            rtol = LOW_PRECISION.get(variant, 1e-5)
            torch.testing.assert_close(q, p, rtol=rtol, atol=rtol * p.abs().max().item(), msg=name)
        return model, opt, {n: ref_opt.state[p]["F"].double() for n, p in ref_model.named_parameters()}

    run.__name__ = variant
    return run


LOW_PRECISION = {"bf16_autocast": 2e-2, "fp16_autocast_grad_scaler": 2e-3}  # relative to the largest entry
for _variant in ("closure", "checkpoint", "checkpoint_reentrant", "grad_scaler", "bf16_autocast",
                 "fp16_autocast_grad_scaler", "compile"):
    loop(_against_plain(_variant))


# ---------------------------------------------------------------- the tests
def _run(name, backend):
    if name == "compile":
        try:
            torch.compile(nn.Linear(1, 1), backend="aot_eager")(torch.ones(1, 1)).sum().backward()
        except Exception as exc:  # noqa: BLE001 - no working compiler here
            pytest.skip(f"torch.compile unavailable: {exc}")
    return LOOPS[name](backend)


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_loop_statistics_match_the_oracle(name):
    model, opt, expected = _run(name, "torch")
    assert_fisher(opt, model, expected, rtol=LOW_PRECISION.get(name, 1e-5))


TRITON_LOOPS = sorted(LOOPS)


@pytest.mark.parametrize("name", TRITON_LOOPS)
def test_triton_backend_agrees_with_torch_backend(name):
    kernel_device()
    t_model, t_opt, _ = _run(name, "triton")
    r_model, r_opt, _ = _run(name, "torch")
    for (pname, p), q in zip(r_model.named_parameters(), t_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=pname)
        f, g = r_opt.state[p]["F"], t_opt.state[q]["F"]
        torch.testing.assert_close(g, f, rtol=1e-4, atol=1e-4 * f.abs().max().item(), msg=pname)
