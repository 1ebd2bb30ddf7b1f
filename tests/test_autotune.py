"""Autotuning: candidate pruning, selection, no state mutation, the on-disk cache, the off switch, the CLI.

Kernel launches run under ``TRITON_INTERPRET=1`` on CPU (or on a GPU); timers are fakes, so the results
do not depend on the machine's speed."""

from __future__ import annotations

import csv
import json
import multiprocessing
import warnings

import pytest
import torch
from conftest import kernel_device
from torch import nn

from mbf_triton import MBF
from mbf_triton.cli import tune as tune_cli
from mbf_triton.reference import ConvGeometry
from mbf_triton.tuning import AutotuneCacheWarning, BlockUpdateConfig, DiskCache, Tuner, cache, configs, environment
from mbf_triton.tuning import tuner as tuner_module

# the deliberately indefinite test block makes the interpreter's rsqrt warn; the kernel handles it
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Every test gets its own cache directory and the environment's default switch."""
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(environment.ENV_ENABLE, raising=False)
    environment.set_enabled(None)
    yield
    environment.set_enabled(None)


class FakeTimer:
    """Milliseconds by config: ``fastest`` gets 1 ms, everything else 10 ms + its position; counts calls.
    ``run=True`` also calls the timed function (so trials really launch several times)."""

    def __init__(self, fastest: object = None, run: bool = False) -> None:
        self.fastest, self.run, self.calls = fastest, run, []

    def __call__(self, fn, config) -> float:
        if self.run:
            fn()
            fn()
        self.calls.append(config)
        return 1.0 if config == self.fastest else 10.0 + len(self.calls)


def no_timer(fn, config) -> float:
    raise AssertionError("the timer must not be called")


def block_update_inputs(device: str, rows: int = 5, cols: int = 7, b: int = 3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    n_blocks = rows * -(-cols // b)
    t = b * (b + 1) // 2
    f = torch.rand(n_blocks, t, generator=gen) * 0.1
    idx = torch.arange(b)
    f[:, idx * (idx + 3) // 2] += 1.0
    f[0] = -1.0  # one block takes the diagonal fallback: the counter moves
    grad = torch.randn(rows, cols, generator=gen).to(dtype)
    param = torch.randn(rows, cols, generator=gen).to(dtype)
    mom = torch.randn(rows, cols, generator=gen)
    count = torch.zeros(1, dtype=torch.int32)
    tensors = [x.to(device) for x in (f, grad, param, mom, count)]
    return tensors, dict(b=b, damping=1e-2, lr=0.1, momentum=0.9, weight_decay=1e-2)


def launch_block_update(tensors, kw, config: BlockUpdateConfig) -> None:
    from mbf_triton.kernels.block_update import damped_block_update_

    damped_block_update_(*tensors, **kw, **config.launch_kwargs())


# ------------------------------------------------------------------------------------- candidates
@pytest.mark.parametrize("b", [1, 2, 3, 9, 16, 25, 32, 64])
@pytest.mark.parametrize("n_blocks", [3, 1000, 10**6])
def test_block_update_candidates_are_pruned(b, n_blocks):
    cands = configs.block_update_candidates(b, n_blocks)
    assert cands[0] == configs.block_update_heuristic(b)
    assert len(cands) == len(set(cands))
    per_block = 1 if b == 1 else configs._next_pow2(b) ** 2
    lane = [c for c in cands[1:] if c.variant == "lane"]
    assert bool(lane) == (2 <= b <= 16)  # the lane variant is a candidate wherever it exists
    for c in lane:
        assert c.blocks_per_program == 32 * c.num_warps <= max(32, configs._next_pow2(n_blocks))
    assert not [c for c in cands if c.variant == "rows"]  # opt-in only: minutes to compile
    for c in cands[1:]:
        if c.variant == "lane":
            continue
        tile = per_block * c.blocks_per_program
        assert tile <= configs.MAX_BLOCK_TILE
        assert configs.MIN_VALUES_PER_THREAD <= tile / (32 * c.num_warps) <= configs.MAX_VALUES_PER_THREAD
        assert c.blocks_per_program <= max(1, configs._next_pow2(n_blocks))
    if n_blocks >= 10**6 and b in (9, 16, 25, 32, 64):  # the H100 probe's winners are candidates
        best = {9: 8, 16: 32, 25: 4, 32: 8, 64: 4}[b]
        assert any(c.blocks_per_program == best for c in cands)


def test_stats_candidates_are_valid():
    from mbf_triton.kernels.fisher_stats import FisherStatsConfig

    linear, conv = configs.linear_stats_candidates(300, 1000, 16), configs.conv_stats_candidates(64, 196, 9)
    for phase0 in (linear, conv):
        assert len(phase0) == len(set(phase0)) > 1
        assert all(isinstance(c, FisherStatsConfig) for c in phase0)
        phase1 = configs.linear_stats_candidates(300, 1000, 16, phase=1, best=phase0[-1])
        assert {(c.block_o, c.block_k, c.block_t) for c in phase1} == {
            (phase0[-1].block_o, phase0[-1].block_k, phase0[-1].block_t)
        }
        # phase 1 also tries the 3xTF32 tensor-core dot; phase 0 (the tiles) stays on the fp32 FMA dot
        assert {c.precision for c in phase1} == {"ieee", "tf32x3"}
        assert {c.precision for c in phase0} == {"ieee"}
    # tiny layers: no tile larger than the problem (beyond the minimum of 16), the heuristic aside
    for c in configs.linear_stats_candidates(3, 5, 2)[1:]:
        assert c.block_o == 16 and c.block_k == 16 and c.block_t == 16


def test_config_from_dict_rejects_garbage():
    good = {"blocks_per_program": 8, "num_warps": 4, "num_stages": None}
    assert configs.config_from_dict("block_update", good) == BlockUpdateConfig(8, 4)
    for bad in ({**good, "blocks_per_program": 3}, {**good, "num_warps": True}, {"blocks_per_program": 8},
                {**good, "extra": 1}, [8, 4], {**good, "num_warps": "4"}):
        with pytest.raises(ValueError):
            configs.config_from_dict("block_update", bad)
    with pytest.raises(ValueError):
        configs.config_from_dict("linear_stats", {"block_o": 8, "block_k": 16, "block_t": 16,
                                                   "num_warps": 4, "num_stages": 2})
    stats = {"block_o": 16, "block_k": 16, "block_t": 32, "num_warps": 4, "num_stages": 2}
    # an entry written before the precision field existed means the fp32 FMA dot
    assert configs.config_from_dict("conv_stats", stats).precision == "ieee"
    assert configs.config_from_dict("conv_stats", {**stats, "precision": "tf32x3"}).precision == "tf32x3"
    for bad in ("tf32", 3):
        with pytest.raises(ValueError):
            configs.config_from_dict("conv_stats", {**stats, "precision": bad})


# --------------------------------------------------------------------------------------- selection
def test_fake_timer_selects_the_fastest():
    device = kernel_device()
    tensors, kw = block_update_inputs(device, rows=9, cols=12, b=3)
    cands = configs.block_update_candidates(3, tensors[0].shape[0])
    assert len(cands) >= 3
    target = cands[2]
    timer = FakeTimer(fastest=target)
    tuner = Tuner(mode="force", timer=timer, disk_cache=False)
    assert tuner.block_update_config(*tensors, **kw) == target
    assert set(timer.calls) == set(cands)  # every candidate was timed once
    choice = tuner.chosen[tuner.last_key]
    assert choice.source == "tuned" and choice.ms == 1.0 and choice.heuristic_ms is not None
    # later calls reuse the choice without timing
    tuner.timer = no_timer
    assert tuner.block_update_config(*tensors, **kw) == target


def test_failing_candidates_are_pruned_and_heuristic_kept(monkeypatch):
    device = kernel_device()
    tensors, kw = block_update_inputs(device)
    bad = BlockUpdateConfig(4, 32)  # a config the timer never sees because its launch fails
    heuristic = configs.block_update_heuristic(3)
    monkeypatch.setattr(configs, "block_update_candidates", lambda b, n: [heuristic, bad])
    from mbf_triton.kernels import block_update

    real = block_update.damped_block_update_

    def failing(*a, **k):
        if k.get("num_warps") == bad.num_warps:
            raise RuntimeError("out of resources")
        return real(*a, **k)

    monkeypatch.setattr(block_update, "damped_block_update_", failing)
    timer = FakeTimer(fastest=bad)
    tuner = Tuner(mode="force", timer=timer, disk_cache=False)
    assert tuner.block_update_config(*tensors, **kw) == heuristic
    trials = tuner.chosen[tuner.last_key].trials
    assert [t.status.split(":")[0] for t in trials] == ["ok", "failed"]
    assert timer.calls == [heuristic]


# ---------------------------------------------------------------------------- tuning changes nothing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_update_tuning_does_not_mutate_state(dtype):
    device = kernel_device()
    tensors, kw = block_update_inputs(device, rows=6, cols=8, b=3, dtype=dtype)
    before = [t.clone() for t in tensors]
    cands = configs.block_update_candidates(3, tensors[0].shape[0])
    tuner = Tuner(mode="force", timer=FakeTimer(fastest=cands[-1], run=True), disk_cache=False)
    cfg = tuner.block_update_config(*tensors, **kw)
    assert cfg == cands[-1] and cfg != configs.block_update_heuristic(3)
    for a, b in zip(tensors, before):
        assert torch.equal(a, b)
    # the tuned launch gives exactly what the untuned launch gives
    untuned = [t.clone() for t in before]
    launch_block_update(tensors, kw, cfg)
    launch_block_update(untuned, kw, configs.block_update_heuristic(3))
    for a, b in zip(tensors, untuned):
        assert torch.equal(a, b)
    assert int(tensors[4]) == 1  # the fallback block was counted once, not once per trial


def test_stats_tuning_does_not_mutate_state():
    device = kernel_device()
    from mbf_triton.kernels.fisher_stats import conv_fisher_ema_, linear_fisher_ema_

    gen = torch.Generator().manual_seed(3)
    b = 3
    x = torch.randn(5, 7, generator=gen).to(device)
    gout = torch.randn(5, 4, generator=gen).to(device)
    f = torch.rand(4 * 3, 6, generator=gen).to(device)
    f0 = f.clone()
    tuner = Tuner(mode="force", timer=FakeTimer(run=True), disk_cache=False)
    cfg = tuner.linear_stats_config(f, x, gout, b=b, scale=2.0, decay=0.5)
    assert torch.equal(f, f0)
    tuned, plain = f.clone(), f.clone()
    linear_fisher_ema_(tuned, x, gout, b=b, scale=2.0, decay=0.5, config=cfg)
    linear_fisher_ema_(plain, x, gout, b=b, scale=2.0, decay=0.5)
    torch.testing.assert_close(tuned, plain, atol=1e-6, rtol=1e-6)

    xc = torch.randn(2, 4, 4, 4, generator=gen).to(device)  # 2x2 kernels, no padding: 3x3 outputs
    geometry = ConvGeometry((2, 2), (1, 1), ((0, 0), (0, 0)), (1, 1))
    g = torch.randn(2, 6, 3, 3, generator=gen).to(device)
    fc = torch.rand(6 * 2, 10, generator=gen).to(device)  # groups=2: C_in/groups = 2
    fc0 = fc.clone()
    cfg = tuner.conv_stats_config(fc, xc, g, geometry=geometry, groups=2, scale=1.0, decay=0.9)
    assert torch.equal(fc, fc0)
    tuned, plain = fc.clone(), fc.clone()
    conv_fisher_ema_(tuned, xc, g, **geometry.kwargs(), groups=2, scale=1.0, decay=0.9, config=cfg)
    conv_fisher_ema_(plain, xc, g, **geometry.kwargs(), groups=2, scale=1.0, decay=0.9)
    torch.testing.assert_close(tuned, plain, atol=1e-6, rtol=1e-6)
    assert {r["kernel"] for r in tuner.report()} == {"linear_stats", "conv_stats"}


def test_trial_launches_run_the_variant_the_optimizer_runs(monkeypatch):
    """The optimizer always passes its step's skip flag, which changes the compiled kernel (registers):
    trials compile, time and prune that variant, with a clear flag."""
    device = kernel_device()
    from mbf_triton.kernels import block_update, fisher_stats

    seen = []

    def spy(real):
        def launch(*args, **kwargs):
            seen.append((real.__name__, kwargs.get("skip")))
            return real(*args, **kwargs)
        return launch

    for mod, name in ((block_update, "damped_block_update_"), (fisher_stats, "linear_fisher_ema_"),
                      (fisher_stats, "conv_fisher_ema_")):
        monkeypatch.setattr(mod, name, spy(getattr(mod, name)))
    tensors, kw = block_update_inputs(device, rows=6, cols=8, b=3, dtype=torch.float32)
    tuner = Tuner(mode="force", timer=FakeTimer(run=True), disk_cache=False)
    tuner.block_update_config(*tensors, **kw)
    gen = torch.Generator().manual_seed(3)
    x, gout = torch.randn(5, 7, generator=gen).to(device), torch.randn(5, 4, generator=gen).to(device)
    tuner.linear_stats_config(torch.zeros(4 * 3, 6, device=device), x, gout, b=3, scale=1.0, decay=0.5)
    xc, g = torch.randn(2, 2, 4, 4, generator=gen).to(device), torch.randn(2, 3, 3, 3, generator=gen).to(device)
    tuner.conv_stats_config(torch.zeros(6, 10, device=device), xc, g,
                            geometry=ConvGeometry((2, 2), (1, 1), ((0, 0), (0, 0)), (1, 1)), groups=1, scale=1.0,
                            decay=0.5)
    assert {name for name, _ in seen} == {"damped_block_update_", "linear_fisher_ema_", "conv_fisher_ema_"}
    assert all(flag is not None and flag.numel() == 1 and not flag.any() for _, flag in seen)


def test_optimizer_with_tuning_matches_heuristic_and_reports_layers(monkeypatch):
    device = kernel_device()

    def train(tuner: Tuner):
        monkeypatch.setattr(tuner_module, "_DEFAULT_TUNER", tuner)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(device)
        opt = MBF(model, backend="triton", lr=0.1, damping=0.1, block_size=4)
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            x = torch.randn(6, 7, generator=gen).to(device)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return model

    tuned = Tuner(mode="force", timer=FakeTimer(run=True), disk_cache=False)
    m_tuned = train(tuned)
    m_plain = train(Tuner(mode="off"))
    for a, b in zip(m_tuned.parameters(), m_plain.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    rows = tuned.report()
    assert {r["kernel"] for r in rows} == {"block_update", "linear_stats"}
    assert all(r["source"] == "tuned" for r in rows)
    assert "block_update" in tuned.format_report()
    from mbf_triton.backends import TritonBackend

    monkeypatch.setattr(tuner_module, "_DEFAULT_TUNER", tuned)
    assert TritonBackend().configs() == rows


# ----------------------------------------------------------------------------------- off / default
def test_disabled_and_default_modes_use_the_heuristic(monkeypatch, tmp_path):
    device = kernel_device()
    tensors, kw = block_update_inputs(device)
    heuristic = configs.block_update_heuristic(3)
    environment.set_enabled(False)
    tuner = Tuner(timer=no_timer)
    assert tuner.resolved_mode() == "off"
    assert tuner.block_update_config(*tensors, **kw) == heuristic
    assert tuner.chosen[tuner.last_key].source == "heuristic"
    environment.set_enabled(None)
    monkeypatch.setenv(environment.ENV_ENABLE, "0")
    assert Tuner().resolved_mode() == "off"
    monkeypatch.setenv(environment.ENV_ENABLE, "1")
    assert Tuner().resolved_mode() == "off"  # under pytest: one fixed config
    environment.set_enabled(True)
    assert Tuner().resolved_mode() == "auto"
    if device == "cpu":  # auto on CPU / interpreter: deterministic default, no timing, no cache file
        tuner = Tuner(mode="auto", timer=no_timer)
        assert tuner.block_update_config(*tensors, **kw) == heuristic
        assert tuner.chosen[tuner.last_key].source == "default"
        assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------ cache
def test_cache_round_trip_across_tuners():
    device = kernel_device()
    tensors, kw = block_update_inputs(device, rows=9, cols=12)
    cands = configs.block_update_candidates(3, tensors[0].shape[0])
    first = Tuner(mode="force", timer=FakeTimer(fastest=cands[-1]))
    cfg = first.block_update_config(*tensors, **kw)
    path = cache.cache_path(environment.device_name(tensors[0].device))
    assert path.exists() and path.parent == cache.cache_dir()
    data = json.loads(path.read_text())
    assert data["header"]["triton"] and data["header"]["mbf_triton"] and data["header"]["gpu"]
    assert first.last_key in data["entries"]

    second = Tuner(mode="force", timer=no_timer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutotuneCacheWarning)
        assert second.block_update_config(*tensors, **kw) == cfg
    assert second.chosen[second.last_key].source == "cache"
    # a Tuner that does not read the cache re-tunes (the CLI)
    third = Tuner(mode="force", timer=FakeTimer(fastest=cands[0]), read_cache=False)
    assert third.block_update_config(*tensors, **kw) == cands[0]


def _write(path, payload: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload)


@pytest.mark.parametrize("damage", ["corrupt", "stale", "malformed", "bad_entry"])
def test_damaged_cache_is_ignored_with_a_warning(damage):
    device = kernel_device()
    tensors, kw = block_update_inputs(device)
    path = cache.cache_path(environment.device_name(tensors[0].device))
    header = cache.cache_header(environment.device_name(tensors[0].device))
    key = configs.block_update_key(3, tensors[0].shape[0], torch.float32)
    trap = {"config": {"blocks_per_program": 2, "num_warps": 1, "num_stages": None}, "ms": 0.0}
    if damage == "corrupt":
        _write(path, '{"header": {"format": 1, "gpu"')
    elif damage == "stale":
        _write(path, json.dumps({"header": {**header, "triton": "0.0.1"}, "entries": {key: trap}}))
    elif damage == "malformed":
        _write(path, json.dumps([1, 2, 3]))
    else:
        bad = {"config": {"blocks_per_program": 3, "num_warps": 1, "num_stages": None}, "ms": 0.0}
        _write(path, json.dumps({"header": header, "entries": {key: bad}}))
    heuristic = configs.block_update_heuristic(3)
    timer = FakeTimer(fastest=heuristic)
    tuner = Tuner(mode="force", timer=timer)
    match = {"corrupt": "corrupt", "stale": "stale", "malformed": "malformed", "bad_entry": "invalid"}[damage]
    with pytest.warns(AutotuneCacheWarning, match=match):
        assert tuner.block_update_config(*tensors, **kw) == heuristic
    assert timer.calls  # it tuned instead of trusting the file
    data = json.loads(path.read_text())  # and the file is valid again, with the new entry
    assert data["header"] == header
    assert data["entries"][key]["config"]["blocks_per_program"] == heuristic.blocks_per_program


def _store_keys(path: str, header: dict, worker: int, n: int) -> None:
    cache = DiskCache(path, header)
    for i in range(n):
        config = {"blocks_per_program": 2 ** (i % 4), "num_warps": 4, "num_stages": None}
        cache.store({f"block_update|b={worker}|blocks=2^{i}|float32": {"config": config, "ms": float(i)}})


def test_concurrent_writers_keep_every_entry(tmp_path):
    path = tmp_path / "cache" / "autotune-test.json"
    header = {"format": 1, "gpu": "test", "triton": "x", "mbf_triton": "y"}
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    procs = [ctx.Process(target=_store_keys, args=(str(path), header, w, 8)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads(path.read_text())
    assert data["header"] == header
    assert len(data["entries"]) == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(DiskCache(path, header).load()) == 32
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


# -------------------------------------------------------------------------------------------- CLI
def test_cli_smoke_writes_csv_plot_and_cache(tmp_path, capsys):
    kernel_device()
    out = tmp_path / "out"
    argv = ["--smoke", "--out", str(out), "--kernel", "block_update", "linear_stats", "conv_stats",
            "--b", "3", "4", "--blocks", "5"]
    assert tune_cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "MEANINGLESS" in text or "do_bench" in text
    assert "summary" in text and "best" in text
    with open(out / "autotune.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["kernel"] for r in rows} == {"block_update", "linear_stats", "conv_stats"}
    assert {"config", "ms", "gbps", "pct_copy", "best", "heuristic", "device", "triton"} <= set(rows[0])
    assert sum(r["best"] == "True" for r in rows) == 6  # one winner per (kernel, b)
    assert (out / "autotune.png").stat().st_size > 0
    with open(out / "autotune_summary.csv") as fh:
        summary = list(csv.DictReader(fh))
    assert len(summary) == 6 and all(float(r["confirm_tuned_ms"]) > 0 for r in summary)
    caches = list(cache.cache_dir().glob("autotune-*.json"))
    assert len(caches) == 1 and len(json.loads(caches[0].read_text())["entries"]) == 6


def test_confirm_times_both_configs_again_alternating_and_takes_medians():
    order, launched = [], []
    times = {"heur": iter([5.0, 1.0, 3.0]), "tuned": iter([2.0, 9.0, 4.0])}

    def timer(fn, config):
        fn()
        order.append(config)
        return next(times[config])

    heur_ms, tuned_ms = tune_cli.confirm(timer, launched.append, "tuned", "heur")
    assert order == ["heur", "tuned"] * 3 and launched == order
    assert (heur_ms, tuned_ms) == (3.0, 4.0)  # medians: here the tuned config is slower, and it says so


def test_cli_time_budget_skips_the_shapes_left_and_says_so(tmp_path, capsys):
    kernel_device()
    argv = ["--smoke", "--no-cache", "--out", str(tmp_path), "--b", "3", "--blocks", "5", "6",
            "--time-budget-s", "0"]
    assert tune_cli.main(argv) == 0
    assert "2 shape(s) not tuned: block_update b=3" in capsys.readouterr().out
    assert (tmp_path / "autotune_summary.csv").read_text().count("\n") == 1  # the header only


def test_cli_without_gpu_explains_and_runs_nothing(tmp_path, capsys):
    if torch.cuda.is_available() and not environment.interpreted():
        pytest.skip("a GPU is present: the real sweep would run")
    assert tune_cli.main(["--out", str(tmp_path / "none")]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()


def test_cli_model_layers():
    jobs = tune_cli._model_jobs("cnn", 16)
    assert {(j.b, j.n_blocks) for j in jobs} >= {(9, 16), (9, 16 * 32), (9, 32 * 32), (16, 10 * 32)}
    assert any("weight" in j.label for j in jobs)
