"""The fused damped mini-block solve + update kernel against the float64 reference.

Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``; ``@pytest.mark.gpu`` tests need a GPU.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK, kernel_device, tol

pytest.importorskip("triton")

_ROOT = Path(__file__).resolve().parents[1]
try:
    reference = importlib.import_module("mbf_triton.reference")
except ImportError:  # repo root not on sys.path
    sys.path.insert(0, str(_ROOT))
    reference = importlib.import_module("mbf_triton.reference")
try:
    block_update = importlib.import_module("mbf_triton.kernels.block_update")
except ImportError:  # package mapping of kernels/ not installed yet
    sys.path.insert(0, str(_ROOT / "kernels"))
    block_update = importlib.import_module("block_update")

BLOCK_SIZES = [1, 2, 3, 4, 9, 16, 25, 27, 32, 49, 64]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_fisher(rows: int, cols: int, b: int, device: str, gen: torch.Generator) -> torch.Tensor:
    """Packed SPD mini-blocks of random scale; the padded rows/columns of short tail chunks are 0."""
    real = reference.to_blocks(torch.ones(rows, cols, device=device), b)  # (n_blocks, b) 1 = real entry
    n_blocks, n = real.shape[0], b + 8
    x = torch.randn(n_blocks, n, b, device=device, generator=gen) * real[:, None, :]
    a = x.transpose(1, 2) @ x / n + 0.25 * torch.diag_embed(real)
    scale = torch.exp(torch.empty(n_blocks, 1, 1, device=device).uniform_(-1.0, 1.0, generator=gen))
    return reference.pack_tril(a * scale).float().contiguous()


def make_state(rows: int, cols: int, dtype: torch.dtype, device: str, gen: torch.Generator):
    grad = (0.1 * torch.randn(rows, cols, device=device, generator=gen)).to(dtype)
    param = torch.randn(rows, cols, device=device, generator=gen).to(dtype)
    mom = 0.1 * torch.randn(rows, cols, device=device, generator=gen)
    return grad, param, mom


def oracle_step(f, grad, param64, mom64, *, b, damping, lr, momentum, weight_decay) -> int:
    """The reference in float64 on ``param64``/``mom64`` in place; returns the number of fallbacks."""
    rows, cols = grad.shape
    g = reference.to_blocks(grad.double(), b)
    if b == 1:
        # Solve each scalar block as the 2x2 block diag(F_i, 1) with gradient (g_i, 0): same direction and
        # fallback, through the general Cholesky branch of the reference.
        f2 = torch.stack([f[:, 0], torch.zeros_like(f[:, 0]), torch.ones_like(f[:, 0])], dim=1)
        g2 = torch.cat([g, torch.zeros_like(g)], dim=1)
        d2, fallback = reference.damped_block_solve(f2.double(), g2, damping)
        d = d2[:, :1]
    else:
        d, fallback = reference.damped_block_solve(f.double(), g, damping)
    reference.apply_update_(param64, reference.from_blocks(d, rows, cols), mom64, lr, momentum, weight_decay)
    return int(fallback.sum())


def run_and_compare(f, grad, param, mom, *, b, damping=1e-2, lr=0.05, momentum=0.9, weight_decay=0.01,
                    steps=1, **launch):
    """Run ``steps`` kernel calls and the reference side by side, comparing after each call. For b > 16 the
    tile variant runs unless a variant is given: the default there ("rows") is fully unrolled, minutes per
    configuration to compile and seconds per program under the interpreter, and has its own tests
    (``test_rows_*``)."""
    if b > block_update.LANE_MAX_B:
        launch.setdefault("variant", "tile")
    param64, mom64 = param.double(), mom.double()
    count = torch.zeros(1, dtype=torch.int32, device=param.device)
    expected_count = 0
    for step in range(steps):
        hp = {"damping": damping * (1 + step), "lr": lr / (1 + step), "momentum": momentum,
              "weight_decay": weight_decay}
        block_update.damped_block_update_(f, grad, param, mom, count, b=b, **hp, **launch)
        expected_count += oracle_step(f, grad, param64, mom64, b=b, **hp)
        torch.testing.assert_close(param.double(), param64, **tol(param.dtype))
        torch.testing.assert_close(mom.double(), mom64, **tol(torch.float32))
        assert int(count.item()) == expected_count
    return count


def _shape(b: int, n_rows: int, tail: bool) -> tuple[int, int]:
    """``(rows, cols)`` with two chunks per row; the second one short by one entry when ``tail``."""
    cols = 2 * b - 1 if tail and b > 1 else 2 * b
    return n_rows, cols


@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_matches_reference(b, dtype):
    device = kernel_device()
    gen = _generator(device, 100 + b)
    n_rows = (3 if b >= 32 else 5) if QUICK else 10_000 // 2 + 3
    rows, cols = _shape(b, n_rows, tail=True)
    f = make_fisher(rows, cols, b, device, gen)
    grad, param, mom = make_state(rows, cols, dtype, device, gen)
    count = run_and_compare(f, grad, param, mom, b=b)
    assert int(count.item()) == 0


@pytest.mark.parametrize("b", BLOCK_SIZES)
def test_several_programs_partial_last_tile(b):
    device = kernel_device()
    gen = _generator(device, 200 + b)
    blocks_per_program = 2 if QUICK else 16
    n_rows = 3 if QUICK else 777  # 2 * n_rows blocks: not a multiple of blocks_per_program * 2
    rows, cols = _shape(b, n_rows, tail=False)
    f = make_fisher(rows, cols, b, device, gen)
    grad, param, mom = make_state(rows, cols, torch.float32, device, gen)
    run_and_compare(f, grad, param, mom, b=b, blocks_per_program=blocks_per_program, num_warps=2)


@pytest.mark.parametrize(
    ("rows", "cols", "b"),
    [(3, 30, 16), (4, 7, 3), (2, 5, 9), (5, 1, 4), (3, 50, 27), (2, 70, 64), (3, 11, 2), (2, 13, 25)],
)
def test_short_tail_chunks(rows, cols, b):
    device = kernel_device()
    gen = _generator(device, rows * 1000 + cols * 10 + b)
    f = make_fisher(rows, cols, b, device, gen)
    grad, param, mom = make_state(rows, cols, torch.float32, device, gen)
    run_and_compare(f, grad, param, mom, b=b, blocks_per_program=2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: rsqrt of a negative
@pytest.mark.parametrize("b", [2, 3, 9, 16])
def test_fallback_blocks(b):
    device = kernel_device()
    gen = _generator(device, 300 + b)
    rows, cols = 5, 2 * b - 1
    f = make_fisher(rows, cols, b, device, gen)
    eye = reference.pack_tril(torch.eye(b, device=device))
    f[1, 1] = float("nan")  # off-diagonal (1, 0): the diagonal stays finite
    f[4] = -10.0 * eye  # indefinite
    f[6, reference.diag_indices(b)[b - 1]] = float("inf")  # infinite last pivot
    grad, param, mom = make_state(rows, cols, torch.float32, device, gen)
    count = run_and_compare(f, grad, param, mom, b=b, damping=1e-3, steps=2)
    assert int(count.item()) == 2 * 3
    assert torch.isfinite(param).all() and torch.isfinite(mom).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fallback_scalar_blocks():
    device = kernel_device()
    gen = _generator(device, 301)
    rows, cols = 3, 4
    f = make_fisher(rows, cols, 1, device, gen)
    f[2, 0] = -10.0
    f[5, 0] = float("inf")
    f[7, 0] = -1.0
    grad, param, mom = make_state(rows, cols, torch.float32, device, gen)
    count = run_and_compare(f, grad, param, mom, b=1, damping=1e-3, steps=2)
    assert int(count.item()) == 2 * 3
    assert torch.isfinite(param).all() and torch.isfinite(mom).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b", [1, 4, 9, 27])
def test_momentum_and_weight_decay_accumulate(b, dtype):
    device = kernel_device()
    gen = _generator(device, 400 + b)
    rows, cols = (4, 3 * b - 1) if b > 1 else (4, 5)
    f = make_fisher(rows, cols, b, device, gen)
    grad, param, mom = make_state(rows, cols, dtype, device, gen)
    mom.zero_()
    run_and_compare(f, grad, param, mom, b=b, momentum=0.9, weight_decay=0.1, lr=0.1, steps=4,
                    blocks_per_program=4)


def test_zero_blocks_is_a_no_op():
    device = kernel_device()
    f = torch.zeros(0, 45, device=device)
    grad = torch.zeros(0, 18, device=device)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    block_update.damped_block_update_(f, grad, grad.clone(), grad.clone(), count, b=9, damping=1e-2,
                                      lr=0.1, momentum=0.9, weight_decay=0.0)
    assert int(count.item()) == 0


def test_input_validation():
    f = torch.zeros(4, 6)
    grad = torch.zeros(2, 5)
    param, mom = grad.clone(), grad.clone()
    count = torch.zeros(1, dtype=torch.int32)
    hp = {"damping": 1e-2, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
    call = block_update.damped_block_update_
    with pytest.raises(ValueError, match="f has shape"):
        call(torch.zeros(3, 6), grad, param, mom, count, b=3, **hp)
    with pytest.raises(TypeError, match="f must be float32"):
        call(f.double(), grad, param, mom, count, b=3, **hp)
    with pytest.raises(TypeError, match="grad dtype"):
        call(f, grad.double(), param.double(), mom, count, b=3, **hp)
    with pytest.raises(TypeError, match="param dtype"):
        call(f, grad, param.half(), mom, count, b=3, **hp)
    with pytest.raises(ValueError, match="param shape"):
        call(f, grad, torch.zeros(5, 2), mom, count, b=3, **hp)
    with pytest.raises(TypeError, match="momentum_buffer"):
        call(f, grad, param, mom.half(), count, b=3, **hp)
    with pytest.raises(TypeError, match="fallback_count"):
        call(f, grad, param, mom, torch.zeros(1, dtype=torch.int64), b=3, **hp)
    with pytest.raises(ValueError, match="param must be contiguous"):
        call(f, grad, torch.zeros(5, 2).t(), mom, count, b=3, **hp)
    with pytest.raises(ValueError, match="grad must be 2-D"):
        call(f, grad.reshape(-1), param, mom, count, b=3, **hp)
    with pytest.raises(ValueError, match="b="):
        call(f, grad, param, mom, count, b=0, **hp)
    with pytest.raises(ValueError, match="blocks_per_program"):
        call(f, grad, param, mom, count, b=3, blocks_per_program=3, **hp)


def test_default_launch_config():
    for b in BLOCK_SIZES:
        blocks, warps = block_update.default_launch_config(b)
        assert blocks >= 1 and blocks & (blocks - 1) == 0
        assert warps in (1, 2, 4, 8, 16, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 3, 9, 16])
def test_grouped_launch_equals_reference_for_every_member(b, dtype):
    """One launch over parameters of different shapes (tails, fewer blocks than a program) and a fallback."""
    device = kernel_device()
    gen = _generator(device, 100 + b)
    shapes = [(3, 2 * b + 1), (1, b), (5, 3 * b), (2, max(1, b - 1))] if b > 1 else [(7, 1), (1, 1), (40, 1)]
    fs, grads, params, moms, expected = [], [], [], [], []
    hp = {"damping": 1e-2, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    for i, (rows, cols) in enumerate(shapes):
        f = make_fisher(rows, cols, b, device, gen)
        if i == 0:
            f[0] = -10.0  # an indefinite block: counted, diagonal fallback
        grad, param, mom = make_state(rows, cols, dtype, device, gen)
        p64, m64 = param.double(), mom.clone().double()
        n_fb = oracle_step(f, grad, p64, m64, b=b, **hp)
        fs.append(f), grads.append(grad), params.append(param), moms.append(mom), expected.append((p64, m64, n_fb))
    count = torch.zeros(1, dtype=torch.int32, device=device)
    block_update.grouped_block_update_(fs, grads, params, moms, count, b=b, blocks_per_program=2, **hp)
    for param, mom, (p64, m64, _) in zip(params, moms, expected):
        torch.testing.assert_close(param.double(), p64.to(param.dtype).double(), **tol(dtype))
        torch.testing.assert_close(mom.double(), m64, **tol(torch.float32))
    assert int(count.item()) == sum(e[2] for e in expected) >= 1


def test_grouped_launch_follows_new_tensors_between_launches():
    """The address table is cached by content: a second launch with a fresh gradient tensor (new memory, as
    after ``zero_grad(set_to_none=True)``) and the same launch again must both read the right tensors."""
    device = kernel_device()
    gen = _generator(device, 11)
    b, shapes = 4, [(3, 9), (2, 4)]
    hp = {"b": b, "damping": 1e-2, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}
    fs = [make_fisher(r, c, b, device, gen) for r, c in shapes]
    states = [make_state(r, c, torch.float32, device, gen) for r, c in shapes]
    params = [s[1] for s in states]
    moms = [s[2] for s in states]
    p64s, m64s = [p.double() for p in params], [m.double() for m in moms]
    count = torch.zeros(1, dtype=torch.int32, device=device)
    grads: list[torch.Tensor] = []
    for launch in range(3):
        if launch < 2:
            grads = [torch.randn(r, c, generator=gen, device=device) for r, c in shapes]
        else:
            grads = [g.clone() for g in grads]  # the same values again, in other memory
        for f, g, p64, m64 in zip(fs, grads, p64s, m64s):
            oracle_step(f, g, p64, m64, **hp)
        block_update.grouped_block_update_(fs, grads, params, moms, count, **hp)
        for param, mom, p64, m64 in zip(params, moms, p64s, m64s):
            torch.testing.assert_close(param.double(), p64, **tol(torch.float32))
            torch.testing.assert_close(mom.double(), m64, **tol(torch.float32))


def test_grouped_launch_validates_its_members():
    device = kernel_device()
    gen = _generator(device, 7)
    f = make_fisher(2, 4, 4, device, gen)
    grad, param, mom = make_state(2, 4, torch.float32, device, gen)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="same length"):
        block_update.grouped_block_update_([f], [grad], [param, param], [mom], count, b=4, damping=1e-2, lr=0.1,
                                           momentum=0.0, weight_decay=0.0)
    g16, p16, _ = make_state(2, 4, torch.bfloat16, device, gen)
    with pytest.raises(ValueError, match="dtype"):
        block_update.grouped_block_update_([f, f], [grad, g16], [param, p16], [mom, mom.clone()], count, b=4,
                                           damping=1e-2, lr=0.1, momentum=0.0, weight_decay=0.0)


# --------------------------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("b", "rows", "cols"), [(9, 1000, 9000), (32, 1000, 3200), (27, 999, 2690)])
def test_large_shapes_on_gpu(b, rows, cols, dtype):
    device = kernel_device()
    gen = _generator(device, 500 + b)
    f = make_fisher(rows, cols, b, device, gen)
    grad, param, mom = make_state(rows, cols, dtype, device, gen)
    run_and_compare(f, grad, param, mom, b=b, steps=2)


def _compiled_variants(kernel) -> int:
    """Number of compiled specialisations of a ``triton.jit`` function (triton 3.x on a GPU)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(c) for c in kernel.cache.values())  # older triton: {device: {key: kernel}}


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 9])
def test_no_recompilation_when_hyperparameters_change(b):
    device = kernel_device()
    gen = _generator(device, 600 + b)
    rows, cols = 64, 5 * b + 1
    f = make_fisher(rows, cols, b, device, gen)
    grad, param, mom = make_state(rows, cols, torch.float32, device, gen)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    kernel = block_update._scalar_block_update_kernel if b == 1 else block_update._damped_block_update_kernel
    settings = [(1e-2, 0.1, 0.9, 0.0), (3e-3, 1, 0, 1e-4), (1.0, 0.017, 0.5, 0.1), (16.0, 1e-5, 0.99, 1)]
    block_update.damped_block_update_(f, grad, param, mom, count, b=b, damping=1e-1, lr=0.3, momentum=0.1,
                                      weight_decay=0.2)
    torch.cuda.synchronize()
    before = _compiled_variants(kernel)
    assert before >= 1
    for damping, lr, momentum, weight_decay in settings:
        block_update.damped_block_update_(f, grad, param, mom, count, b=b, damping=damping, lr=lr,
                                          momentum=momentum, weight_decay=weight_decay)
    torch.cuda.synchronize()
    assert _compiled_variants(kernel) == before


# --------------------------------------------------------------------------------------------------------
# Variants: "lane" (the default for 2 <= b <= 16) and "tile" compute the same function
# --------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("variant", ["tile", "lane"])
@pytest.mark.parametrize(("b", "dtype"), [(2, torch.float32), (5, torch.float16), (9, torch.bfloat16),
                                          (16, torch.float32)])
def test_variants_match_reference_with_tails_and_fallbacks(b, dtype, variant):
    device = kernel_device()
    gen = _generator(device, 700 + b)
    rows, cols = 5, 2 * b - 1  # a short tail chunk on every row
    f = make_fisher(rows, cols, b, device, gen)
    f[3] = -10.0 * reference.pack_tril(torch.eye(b, device=device))  # indefinite: counted, diagonal fallback
    f[6, 1] = float("nan")  # off-diagonal (1, 0)
    grad, param, mom = make_state(rows, cols, dtype, device, gen)
    count = run_and_compare(f, grad, param, mom, b=b, variant=variant, steps=2, blocks_per_program=4,
                            num_warps=1)
    assert int(count.item()) == 2 * 2


@pytest.mark.parametrize("variant", ["tile", "lane"])
def test_variants_skip_flag_and_grouped_launch(variant):
    """A set skip flag writes nothing and counts nothing; a clear one equals the reference, in one grouped
    launch over members of different shapes."""
    device = kernel_device()
    gen = _generator(device, 801)
    b, shapes = 4, [(3, 9), (1, 4), (2, 3)]
    hp = {"b": b, "damping": 1e-2, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    fs = [make_fisher(r, c, b, device, gen) for r, c in shapes]
    fs[0][1] = -1.0
    states = [make_state(r, c, torch.float32, device, gen) for r, c in shapes]
    grads, params, moms = ([s[i] for s in states] for i in range(3))
    before = [(p.clone(), m.clone()) for p, m in zip(params, moms)]
    count = torch.zeros(1, dtype=torch.int32, device=device)
    flag = torch.ones(1, dtype=torch.bool, device=device)
    block_update.grouped_block_update_(fs, grads, params, moms, count, skip=flag, variant=variant, **hp)
    assert int(count.item()) == 0
    for (p0, m0), p, m in zip(before, params, moms):
        assert torch.equal(p0, p) and torch.equal(m0, m)
    flag.zero_()
    expected = 0
    p64s, m64s = [p.double() for p in params], [m.double() for m in moms]
    for f, g, p64, m64 in zip(fs, grads, p64s, m64s):
        expected += oracle_step(f, g, p64, m64, **hp)
    block_update.grouped_block_update_(fs, grads, params, moms, count, skip=flag, variant=variant,
                                       blocks_per_program=2, **hp)
    assert int(count.item()) == expected == 1
    for p, m, p64, m64 in zip(params, moms, p64s, m64s):
        torch.testing.assert_close(p.double(), p64, **tol(torch.float32))
        torch.testing.assert_close(m.double(), m64, **tol(torch.float32))


def test_variant_validation_and_defaults():
    assert block_update.default_variant(1) == "tile"
    assert block_update.default_variant(9) == "lane"
    assert block_update.default_variant(block_update.ROWS_MAX_B + 1) == block_update.default_variant(64) == "tile"
    for b in (block_update.LANE_MAX_B + 1, 25, 27, 32):
        assert block_update.default_variant(b) == "tile"  # rows: minutes to compile, opt-in only
        blocks, warps = block_update.default_launch_config(b, "rows")
        assert blocks * block_update.rows_lanes(b) == 32 * warps
    assert block_update.default_launch_config(9, "lane") == (128, 4)
    f = torch.zeros(2, 17 * 18 // 2)
    grad = torch.zeros(1, 34)
    count = torch.zeros(1, dtype=torch.int32)
    hp = {"damping": 1e-2, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="variant='lane' supports b <= 16"):
        block_update.damped_block_update_(f, grad, grad.clone(), grad.clone(), count, b=17, variant="lane", **hp)
    with pytest.raises(ValueError, match="variant="):
        block_update.damped_block_update_(f, grad, grad.clone(), grad.clone(), count, b=17, variant="x", **hp)
    with pytest.raises(ValueError, match="variant='rows' supports b >= 2"):
        block_update.damped_block_update_(torch.zeros(2, 1), grad[:, :2], grad[:, :2].clone(), grad[:, :2].clone(),
                                          count, b=1, variant="rows", **hp)


# --------------------------------------------------------------------------------------------------------
# The "rows" variant (a few lanes per block; the default for 17 <= b <= 64). Fully unrolled, so slow under
# the interpreter (about 3 s per program at b = 17, 8 s at b = 32, 25 s at b = 64): one program per launch,
# every feature in few launches.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: division by a bad pivot
@pytest.mark.parametrize(("b", "dtype"), [(5, torch.float32), (17, torch.float16), (25, torch.bfloat16),
                                          (27, torch.float32), (32, torch.float32), (64, torch.bfloat16)], ids=str)
def test_rows_variant_matches_reference_with_tails_and_fallbacks(b, dtype):
    """Tails (every row's second chunk is short), three rows of the gradient matrix (row stride ``2b - 1``),
    an indefinite block, a NaN off-diagonal entry and an infinite last pivot (diagonal fallbacks, counted),
    momentum and weight decay, in one program."""
    device = kernel_device()
    gen = _generator(device, 900 + b)
    rows, cols = 4, 2 * b - 1
    f = make_fisher(rows, cols, b, device, gen)
    f[3] = -10.0 * reference.pack_tril(torch.eye(b, device=device))
    f[4, 1] = float("nan")  # off-diagonal (1, 0)
    f[7, reference.diag_indices(b)[b - 1]] = float("inf")  # the last pivot, in the last (short) chunk
    grad, param, mom = make_state(rows, cols, dtype, device, gen)
    count = run_and_compare(f, grad, param, mom, b=b, variant="rows", blocks_per_program=8,
                            num_warps=8 * block_update.rows_lanes(b) // 32 or 1)
    assert int(count.item()) == 3
    assert torch.isfinite(param.float()).all() and torch.isfinite(mom).all()


def test_rows_variant_skip_flag_and_grouped_launch():
    """b = 17 (4 lanes: four slots of 4 rows and a last slot of one row): a set skip flag writes and counts nothing;
    a clear one equals the reference for every member of a grouped launch (a short tail, a member with
    fewer blocks than a program, a fallback), bf16 parameters."""
    device = kernel_device()
    gen = _generator(device, 917)
    b = 17
    shapes = [(3, 2 * b - 3), (1, b)]
    hp = {"b": b, "damping": 1e-2, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    fs = [make_fisher(r, c, b, device, gen) for r, c in shapes]
    fs[0][2] = -1.0
    states = [make_state(r, c, torch.bfloat16, device, gen) for r, c in shapes]
    grads, params, moms = ([s[i] for s in states] for i in range(3))
    before = [(p.clone(), m.clone()) for p, m in zip(params, moms)]
    count = torch.zeros(1, dtype=torch.int32, device=device)
    flag = torch.ones(1, dtype=torch.bool, device=device)
    launch = {"variant": "rows", "blocks_per_program": 8, "num_warps": 1}
    block_update.grouped_block_update_(fs, grads, params, moms, count, skip=flag, **launch, **hp)
    assert int(count.item()) == 0
    for (p0, m0), p, m in zip(before, params, moms):
        assert torch.equal(p0, p) and torch.equal(m0, m)
    flag.zero_()
    p64s, m64s = [p.double() for p in params], [m.double() for m in moms]
    expected = sum(oracle_step(f, g, p64, m64, **hp) for f, g, p64, m64 in zip(fs, grads, p64s, m64s))
    block_update.grouped_block_update_(fs, grads, params, moms, count, skip=flag, **launch, **hp)
    assert int(count.item()) == expected == 1
    for p, m, p64, m64 in zip(params, moms, p64s, m64s):
        torch.testing.assert_close(p.double(), p64.to(p.dtype).double(), **tol(torch.bfloat16))
        torch.testing.assert_close(m.double(), m64, **tol(torch.float32))
