"""Which backward passes the statistics hold, per-layer schedules, memory, copies, AMP and bad input:
the regressions of issue 12, each checked against a ``torch.func`` per-sample oracle or the plain loop."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from oracles import assert_fisher, fisher, live_tensor_bytes
from torch import nn

from mbf_triton import MBF

DT = torch.float64


def mse(out, y):
    return nn.functional.mse_loss(out, y)


def mlp(*sizes: int, act=nn.Tanh) -> nn.Sequential:
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1]).to(DT)


def first_stats(model, **kw) -> MBF:
    """F of a statistics step is exactly that step's Fhat (stat_decay=0), the parameters do not move."""
    return MBF(model, lr=0.0, momentum=0.0, stat_decay=0.0, stat_every=1, backend="torch", **kw)


# ---------------------------------------------------------------- passes that the step does not consume
def test_autograd_grad_towards_the_input_contributes_nothing():
    """FGSM: the attack's gradient (torch.autograd.grad after zero_grad) is not pooled into F."""
    torch.manual_seed(0)
    model = mlp(4, 6, 3)
    opt = first_stats(model)
    x, y = torch.randn(8, 4, dtype=DT), torch.randn(8, 3, dtype=DT)
    opt.zero_grad()
    xa = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(mse(model(xa), y), xa)
    x_adv = (x + 0.1 * gx.sign()).detach()
    mse(model(x_adv), y).backward()
    opt.step()
    assert_fisher(opt, model, fisher(opt, model, [(mse, x_adv, y)]))


def test_gradient_penalty_pass_is_not_pooled_into_the_last_layer():
    """WGAN-GP / R1: ``autograd.grad(out.sum(), x, create_graph=True)`` seeds the last layer with 1; only the
    critic loss' own output gradients (1/N per sample) may enter F."""
    torch.manual_seed(1)
    critic = mlp(3, 5, 1)
    opt = first_stats(critic)
    real, fake = torch.randn(6, 3, dtype=DT), torch.randn(6, 3, dtype=DT)
    xh = (0.3 * real + 0.7 * fake).requires_grad_(True)
    (gx,) = torch.autograd.grad(critic(xh).sum(), xh, create_graph=True)
    penalty = ((gx.norm(dim=1) - 1) ** 2).mean()
    loss = critic(fake).mean() - critic(real).mean() + 10 * penalty
    loss.backward()
    opt.step()

    def pos(out, _):
        return out.mean()

    def neg(out, _):
        return -out.mean()

    expected = fisher(opt, critic, [(neg, real, None), (pos, fake, None)], names=["2.weight", "2.bias"])
    assert_fisher(opt, critic, expected)


def test_model_zero_grad_discards_the_generator_pass_through_the_discriminator():
    """DCGAN's loop zeroes with netD.zero_grad(): the generator's backward through D (previous iteration)
    must not be pooled into D's statistics."""
    torch.manual_seed(2)
    net_d, net_g = mlp(3, 4, 1), mlp(2, 3)
    opt_d = first_stats(net_d)
    bce = nn.functional.binary_cross_entropy_with_logits
    for _ in range(2):
        real, noise = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
        fake = net_g(noise)
        net_d.zero_grad()
        ones, zeros = torch.ones(5, 1, dtype=DT), torch.zeros(5, 1, dtype=DT)
        bce(net_d(real), ones).backward()
        bce(net_d(fake.detach()), zeros).backward()
        opt_d.step()
        net_g.zero_grad()
        bce(net_d(fake), ones).backward()  # through D: accumulates into D's .grad, zeroed next iteration
    assert_fisher(opt_d, net_d, fisher(opt_d, net_d, [(bce, real, ones), (bce, fake.detach(), zeros)]))


@pytest.mark.parametrize("discard", ["grad_none", "new_grad", "zero_in_place", "opt_zero_grad"])
def test_every_way_of_discarding_a_gradient_discards_its_records(discard):
    torch.manual_seed(3)
    model = mlp(4, 3)
    opt = first_stats(model)
    x1, x2, y = torch.randn(5, 4, dtype=DT), torch.randn(7, 4, dtype=DT), torch.randn(7, 3, dtype=DT)
    mse(model(x1), y[:5]).backward()
    if discard == "grad_none":
        for p in model.parameters():
            p.grad = None
    elif discard == "new_grad":
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    elif discard == "zero_in_place":
        model.zero_grad(set_to_none=False)
    else:
        opt.zero_grad()
    mse(model(x2), y).backward()
    opt.step()
    assert_fisher(opt, model, fisher(opt, model, [(mse, x2, y)]))


def test_gradient_replaced_after_backward_drops_the_statistics_of_that_step():
    torch.manual_seed(4)
    model = mlp(4, 3)
    opt = MBF(model, lr=0.1, stat_every=1, backend="torch")
    mse(model(torch.randn(5, 4, dtype=DT)), torch.randn(5, 3, dtype=DT)).backward()
    model[0].weight.grad = torch.ones_like(model[0].weight)  # not the gradient the records belong to
    opt.step()
    assert opt.state[model[0].weight]["stat_steps"] == 0  # due again, captured for the next step
    assert opt.state[model[0].bias]["stat_steps"] == 1
    assert id(model[0]) in opt._capture.wanted


def test_clipping_between_backward_and_step_keeps_the_statistics():
    torch.manual_seed(5)
    model = mlp(4, 3)
    opt = first_stats(model)
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    mse(model(x), y).backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # rescales .grad in place
    opt.step()
    assert_fisher(opt, model, fisher(opt, model, [(mse, x, y)]))


def test_backward_with_inputs_counts_only_for_those_parameters():
    torch.manual_seed(6)
    model = mlp(4, 3)
    opt = first_stats(model)
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    mse(model(x), y).backward(inputs=[model[0].bias])
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    opt.step()
    assert opt.state[model[0].weight]["stat_steps"] == 0
    assert_fisher(opt, model, {"0.bias": fisher(opt, model, [(mse, x, y)])["0.bias"]})


# ---------------------------------------------------------------- per-layer schedules
def test_round_robin_heads_each_get_statistics_on_their_own_schedule():
    torch.manual_seed(7)
    trunk, head_a, head_b = mlp(4, 5), mlp(5, 2), mlp(5, 3)
    model = nn.ModuleDict({"trunk": trunk, "a": head_a, "b": head_b})
    opt = MBF(model, lr=0.01, damping=1e-2, stat_every=10, backend="torch")

    for step in range(40):
        name = "ab"[step % 2]
        head = model[name]
        x = torch.randn(6, 4, dtype=DT)
        y = torch.randn(6, head[0].out_features, dtype=DT)
        opt.zero_grad()
        h = trunk(x)
        mse(head(h), y).backward()
        if step == 1:  # head b's first statistics: exactly its first batch's Fhat
            expected = fisher(opt, head_b, [(mse, h.detach(), y)])
        opt.step()
        if step == 1:
            assert_fisher(opt, head_b, expected)
    for head in (head_a, head_b):
        assert opt.state[head[0].weight]["stat_steps"] == 2  # 20 own steps: at its 1st and 11th
    assert opt.state[trunk[0].weight]["stat_steps"] == 4


def test_branch_used_every_third_step_gets_statistics():
    torch.manual_seed(8)
    trunk, branch = mlp(3, 3), mlp(3, 3)
    model = nn.ModuleList([trunk, branch])
    opt = MBF(model, lr=0.01, stat_every=3, backend="torch")
    for step in range(12):
        opt.zero_grad()
        h = trunk(torch.randn(4, 3, dtype=DT))
        if step % 3 == 1:
            h = branch(h)
        h.pow(2).mean().backward()
        opt.step()
    assert opt.state[branch[0].weight]["stat_steps"] == 2  # 4 own steps: at its 1st and 4th
    assert opt.state[trunk[0].weight]["stat_steps"] == 4


# ---------------------------------------------------------------- gradient accumulation
class Tagger(nn.Module):
    """Embedding (batch-gradient path), LayerNorm and RMSNorm (exact per-sample), Linear, GroupNorm; with
    ``(N, T)`` tokens the norms' positions are summed per sample and the Linear's mean-pooled away."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.norm = nn.LayerNorm(6)
        self.rms = nn.RMSNorm(6, eps=1e-5)
        self.lin = nn.Linear(6, 4)
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, tokens):
        h = self.rms(self.norm(self.emb(tokens)).tanh())
        if h.dim() == 3:
            h = h.mean(dim=1)
        return self.gn(self.lin(h))


def test_gradient_accumulation_equals_the_full_batch_for_every_parameter():
    def run(k: int):
        torch.manual_seed(9)
        model = Tagger().to(DT)
        opt = first_stats(model)
        gen = torch.Generator().manual_seed(0)
        tokens, y = torch.randint(0, 7, (8,), generator=gen), torch.randn(8, 4, generator=gen, dtype=DT)
        for i in range(k):
            sl = slice(i * 8 // k, (i + 1) * 8 // k)
            mse(model(tokens[sl]), y[sl]).backward()
        opt.step()
        return opt, model, tokens, y

    full_opt, full_model, tokens, y = run(1)
    acc_opt, acc_model, _, _ = run(4)
    for (name, p), q in zip(full_model.named_parameters(), acc_model.parameters()):
        torch.testing.assert_close(acc_opt.state[q]["F"], full_opt.state[p]["F"], rtol=1e-5, atol=1e-12, msg=name)
    # the norm layers' scales and shifts are exact per-sample statistics
    names = ["norm.weight", "norm.bias", "rms.weight", "lin.weight", "lin.bias", "gn.weight", "gn.bias"]
    assert_fisher(full_opt, full_model, fisher(full_opt, full_model, [(mse, tokens, y)], names=names))


def test_norm_layers_on_sequences_sum_the_positions_of_each_sample():
    torch.manual_seed(15)
    model = Tagger().to(DT)
    opt = first_stats(model)
    tokens, y = torch.randint(0, 7, (5, 3)), torch.randn(5, 4, dtype=DT)
    mse(model(tokens), y).backward()
    opt.step()
    names = ["norm.weight", "norm.bias", "rms.weight", "lin.weight", "lin.bias", "gn.weight", "gn.bias"]
    assert_fisher(opt, model, fisher(opt, model, [(mse, tokens, y)], names=names))


def test_batchnorm_statistics_are_per_sample_with_the_batch_normalisation():
    torch.manual_seed(10)
    bn = nn.BatchNorm1d(3).to(DT)
    model = nn.Sequential(nn.Linear(2, 3), bn).to(DT)
    opt = first_stats(model)
    x, y = torch.randn(9, 2, dtype=DT), torch.randn(9, 3, dtype=DT)
    h = model[0](x).detach()
    out = model(x)
    mse(out, y).backward()
    opt.step()
    delta = 2 * (out.detach() - y) / out.numel() * 9  # per-sample output gradient (s = N)
    xhat = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(opt.state[bn.weight]["F"].double()[:, 0], (delta * xhat).square().mean(0),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(opt.state[bn.bias]["F"].double()[:, 0], delta.square().mean(0), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- memory
def _memory_model() -> nn.Module:
    # each captured forward keeps 256 x 64 inputs (64 KiB) and output gradients alive: a leak of one record
    # per step grows by > 10 MiB in 180 steps
    return nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 2))


def _batch(gen) -> torch.Tensor:
    return torch.randn(256, 64, generator=gen)


def _train_sgd(model: nn.Module, steps: int) -> None:
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        sgd.zero_grad()
        model(_batch(gen)).pow(2).mean().backward()
        sgd.step()


def test_deep_copy_of_a_hooked_model_trained_elsewhere_keeps_no_records():
    model = _memory_model()
    opt = MBF(model, backend="torch")
    clone = copy.deepcopy(model)
    _train_sgd(clone, 20)
    before = live_tensor_bytes()
    _train_sgd(clone, 180)
    assert live_tensor_bytes() - before < 1 << 20
    assert not opt._capture.records


def test_replaced_optimizer_that_is_still_referenced_does_not_grow():
    model = _memory_model()
    old = MBF(model, backend="torch", stat_every=1)
    sched = torch.optim.lr_scheduler.StepLR(old, 10)  # keeps the old optimizer alive
    new = MBF(model, backend="torch", stat_every=100)  # its own statistics rarely: a fast test
    gen = torch.Generator().manual_seed(0)

    def train(steps):
        for _ in range(steps):
            new.zero_grad()
            model(_batch(gen)).pow(2).mean().backward()
            new.step()

    train(20)
    before = live_tensor_bytes()
    train(180)
    assert live_tensor_bytes() - before < 1 << 20
    assert sum(len(r) for r in old._capture.records.values()) <= 4
    assert sched.optimizer is old


# ---------------------------------------------------------------- copies and pickles
def _loop(model, opt, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(6, 4, generator=gen, dtype=DT), torch.randn(6, 3, generator=gen, dtype=DT)
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()


def test_deepcopy_of_model_and_optimizer_trains_the_copy():
    torch.manual_seed(11)
    model = mlp(4, 5, 3)
    opt = MBF(model, lr=0.05, stat_every=2, backend="torch")
    _loop(model, opt)
    model2, opt2 = copy.deepcopy((model, opt))
    w1 = model[0].weight.detach().clone()
    _loop(model2, opt2, seed=1)
    assert torch.equal(model[0].weight, w1) and not torch.equal(model2[0].weight, w1)
    _loop(model, opt, seed=1)  # the original, on the same data: the same result
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["F"], opt2.state[q]["F"])
    assert opt2.steps == opt.steps == 6


def test_deepcopy_and_pickle_of_the_optimizer_and_the_hooked_model():
    torch.manual_seed(12)
    model = mlp(4, 5, 3)
    opt = MBF(model, lr=0.05, backend="torch")
    _loop(model, opt)
    opt2 = copy.deepcopy(opt)
    assert opt2.steps == 3 and opt2.state_dict()["mbf"] == opt.state_dict()["mbf"]
    p2 = opt2.param_groups[0]["params"][0]
    p2.grad = torch.ones_like(p2)
    opt2.step()  # works on its own (copied) parameters
    model3 = pickle.loads(pickle.dumps(model))  # hooks attached: the copy records nothing
    mse(model3(torch.randn(2, 4, dtype=DT)), torch.randn(2, 3, dtype=DT)).backward()
    opt4 = pickle.loads(pickle.dumps(opt))
    assert opt4.steps == 3
    import io
    buf = io.BytesIO()
    torch.save(model, buf)
    torch.save(opt.state_dict(), buf)


# ---------------------------------------------------------------- AMP
def _amp_run(use_scaler: bool, inf_at: int | None = None, clip: float | None = None, steps: int = 4):
    """``steps`` steps under a GradScaler (or without one: the reference); ``clip``: unscale_ then clip the gradient
    norm, the recipe of torch's AMP docs (the reference clips its own gradients the same way)."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3))
    opt = MBF(model, lr=0.05, damping=1e-2, stat_every=2, backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=use_scaler)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)
        opt.zero_grad()
        loss = mse(model(x), y)
        if step == inf_at:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
    return model, opt


@pytest.mark.parametrize("clip", [None, 0.05], ids=["step", "unscale_clip_step"])
def test_grad_scaler_gives_the_unscaled_run(clip):
    ref_model, ref_opt = _amp_run(False, clip=clip)
    model, opt = _amp_run(True, clip=clip)
    for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(opt.state[q]["F"], ref_opt.state[p]["F"], rtol=1e-5, atol=1e-12, msg=name)


def test_grad_scaler_unscale_then_clip_clips_the_step_not_the_statistics():
    """The clip acts on the step; F comes from the unclipped, unscaled per-sample gradients."""
    clipped, clipped_opt = _amp_run(True, clip=1e-4, steps=1)
    free, free_opt = _amp_run(False, steps=1)
    for (name, p), q in zip(free.named_parameters(), clipped.parameters()):
        torch.testing.assert_close(clipped_opt.state[q]["F"], free_opt.state[p]["F"], rtol=1e-5, atol=1e-12,
                                   msg=name)
    moved = [(q - p).norm() / (p - mlp_init).norm() for p, q, mlp_init in
             zip(free.parameters(), clipped.parameters(), _amp_run(False, steps=0)[0].parameters())]
    assert all(m > 0.5 for m in moved)  # the clipped step is much shorter than the free one


def test_grad_scaler_found_inf_skips_the_step_on_the_device():
    model, opt = _amp_run(True, inf_at=1)
    assert opt.skipped_steps == 1 and opt.steps == 3
    model, opt = _amp_run(True, inf_at=1, clip=0.05)
    assert opt.skipped_steps == 1 and opt.steps == 3


def test_found_inf_without_a_scale_outside_grad_scaler_is_refused_clearly():
    model = mlp(4, 3).float()
    opt = MBF(model, backend="torch")
    model(torch.randn(2, 4)).sum().backward()
    opt.found_inf = torch.zeros(())
    with pytest.raises(RuntimeError, match="unscale_"):
        opt.step()


# ---------------------------------------------------------------- bad input
def test_unknown_group_keys_and_foreign_parameters_are_named():
    model = mlp(3, 2)
    with pytest.raises(ValueError, match="betas"):
        MBF(model, [{"params": list(model.parameters()), "betas": (0.9, 0.99)}])
    with pytest.raises(ValueError, match=r"#2 \(shape \(4,\)\)"):
        MBF(model, list(model.parameters()) + [nn.Parameter(torch.zeros(4))])
    opt = MBF(model, lr=0.1)
    with pytest.raises(ValueError, match="not parameters of model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_group_hyperparameters_are_validated_when_they_change():
    model = mlp(3, 2)
    opt = MBF(model, backend="torch")
    model(torch.randn(2, 3, dtype=DT)).sum().backward()
    opt.step()
    opt.param_groups[0]["damping"] = 0.0
    with pytest.raises(ValueError, match="damping"):
        opt.step()
    opt.param_groups[0]["damping"] = 1e-3
    opt.step()


def test_sparse_embeddings_are_refused_at_construction():
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="sparse"):
        MBF(model)


@pytest.mark.parametrize("bucket_view", [False, True])
def test_ddp_all_reduce_and_bucket_views_keep_the_records(tmp_path, bucket_view):
    """DDP writes the averaged gradient into .grad in place (or makes .grad a view of its bucket) after
    accumulation: the passes stay valid, with and without no_sync() accumulation (one process, gloo)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already in use")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for no_sync in (False, True):
            torch.manual_seed(14)
            model = mlp(4, 5, 3)
            ddp = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
            opt = first_stats(model)
            gen = torch.Generator().manual_seed(0)
            for _ in range(2):
                opt.zero_grad()
                batches = [(torch.randn(4, 4, generator=gen, dtype=DT), torch.randn(4, 3, generator=gen, dtype=DT))
                           for _ in range(3)]
                for k, (x, y) in enumerate(batches):
                    if no_sync and k < 2:
                        with ddp.no_sync():
                            mse(ddp(x), y).backward()
                    else:
                        mse(ddp(x), y).backward()
                opt.step()
            assert_fisher(opt, model, fisher(opt, model, [(mse, x, y) for x, y in batches]))
    finally:
        dist.destroy_process_group()
