"""The experiment code paths on tiny settings, the demo CLI, and a seeded regression: MBF beats plain
SGD at a fixed small budget on the digits CNN."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from mbf_triton.experiments import TASK_SPECS, autoencoder, load_digits, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_digits_split_and_autoencoder_shape():
    data = load_digits()
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == 1797
    assert data.x_train.min() >= 0 and data.x_train.max() <= 1
    model = autoencoder()
    assert model(data.x_test[:5]).shape == (5, 64)


@pytest.mark.parametrize("task", ["autoencoder", "cnn"])
@pytest.mark.parametrize("opt", ["mbf", "adam", "sgd"])
def test_train_runs_and_records(task, opt):
    kw = {"backend": "torch"} if opt == "mbf" else {}
    lr = {"mbf": 1e-3, "adam": 1e-3, "sgd": 0.01}[opt]
    hist = train(task, opt, lr, epochs=1, batch_size=200, **kw)
    assert len(hist.train_loss) == len(hist.wall_time) == 1
    assert all(torch.isfinite(torch.tensor(hist.train_loss)))
    assert hist.test_metric == hist.test_metric  # not NaN


def test_sub_epoch_evaluations_leave_training_unchanged():
    """``evals_per_epoch=5``: five whole-training-set losses per epoch at evenly spaced steps (the last is
    the epoch's ``train_loss``); evaluating (eval mode, no gradient) changes nothing MBF captures or steps."""
    data = load_digits()
    kw = dict(epochs=2, batch_size=200, data=data, backend="torch", stat_every=2, graft="adam")
    coarse = train("cnn", "mbf", 1e-3, **kw)
    fine = train("cnn", "mbf", 1e-3, evals_per_epoch=5, **kw)  # 5 steps per epoch (1078 // 200)
    assert fine.fine_epoch == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0])
    assert fine.fine_loss[4::5] == fine.train_loss == coarse.train_loss
    assert fine.val_loss == coarse.val_loss and len(set(fine.fine_loss)) == 10
    assert coarse.fine_epoch == [1.0, 2.0] and coarse.fine_loss == coarse.train_loss
    with pytest.raises(ValueError, match="evals_per_epoch"):
        train("cnn", "adam", 1e-3, evals_per_epoch=0, **{**kw, "epochs": 1})


@pytest.mark.parametrize("task, n, out_shape", [
    ("resnet", 1797, (4, 10)), ("charlm", 60_000 // 32, (4, 32, 96)), ("tabular", 569, (4, 2)),
])
def test_new_tasks_load_shipped_data_and_train(task, n, out_shape):
    spec = TASK_SPECS[task]
    data = spec.data()
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == n
    torch.manual_seed(0)
    assert spec.build()(data.x_test[:4]).shape == out_shape
    if task == "charlm":  # targets are the inputs shifted by one character
        assert torch.equal(data.y_train[0, :-1], data.x_train[0, 1:])
    if task == "tabular":  # standardised with the training part's statistics
        torch.testing.assert_close(data.x_train.mean(0), torch.zeros(30), atol=1e-5, rtol=0)
    hist = train(task, "mbf", 1e-3, epochs=1, data=data, graft="adam", backend="torch")
    assert len(hist.train_loss) == 1 and hist.train_loss[0] < 10 and hist.test_metric == hist.test_metric


def test_mbf_beats_plain_sgd_on_cnn_at_fixed_budget():
    """Two epochs of the digits CNN, seed 0: MBF's training loss is far below plain SGD's at the best
    learning rate of a small grid (measured on CPU: MBF 0.077; SGD 1.15 at lr 0.3)."""
    torch.set_num_threads(1)
    data = load_digits()
    mbf = train("cnn", "mbf", 1e-3, epochs=2, data=data, damping=1e-3, stat_every=1, backend="torch", graft=None)
    sgd = min(train("cnn", "sgd", lr, epochs=2, data=data, momentum=0.0).train_loss[-1] for lr in (0.03, 0.1, 0.3))
    assert mbf.train_loss[-1] < 0.3 * sgd, f"MBF {mbf.train_loss[-1]:.4f} vs best plain SGD {sgd:.4f}"


def test_demo_cli_writes_table_csv_and_plot(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "mbf_triton", "demo", "--epochs", "2", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "final loss" in proc.stdout and "mbf-default" in proc.stdout and "adam" in proc.stdout
    assert "device: CPU" in proc.stdout and "MBF backend: torch" in proc.stdout
    assert "opt.summary()" in proc.stdout and "bytes of curvature state" in proc.stdout
    rows = list(csv.DictReader(open(out / "demo.csv")))
    assert [r["run"] for r in rows] == ["mbf", "mbf-default", "adam", "sgd"]
    assert {r["backend"] for r in rows} == {"torch"} and all(r["device"].startswith("CPU") for r in rows)
    assert (out / "demo.png").stat().st_size > 1000


def test_quality_study_smoke_resumes_and_reports(tmp_path):
    cmd = [sys.executable, str(ROOT / "perf" / "train_quality.py"), "--smoke", "--seeds", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd + ["--stage", "sweep"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    swept = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert {r["seed"] for r in swept} == {"0"} and "1 of 2 seeds" in (tmp_path / "summary.md").read_text()
    proc = subprocess.run(cmd + ["--stage", "all"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert rows[: len(swept)] == swept  # the sweep was not run again
    assert {r["optimizer"] for r in rows} == {"mbf", "mbf-graft", "adam", "sgd"}
    assert {r["seed"] for r in rows} == {"0", "1"} and all(r["status"] == "ok" for r in rows)
    assert all(len(r["fine_loss"].split(";")) == 5 for r in rows)  # 5 sub-epoch points in the 1 epoch
    proc = subprocess.run(cmd + ["--stage", "defaults", "--optimizers", "mbf-graft"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    for opt in ("adam", "mbf-graft"):  # Adam's default lr (1e-3 is on the smoke grid) with both seeds
        assert {r["seed"] for r in rows if r["optimizer"] == opt and float(r["lr"]) == 1e-3} == {"0", "1"}
    summary = (tmp_path / "summary.md").read_text()
    assert "SMOKE RUN" in summary and "## Done when" in summary and "MBF at Adam's lr" in summary
    for task in ("autoencoder", "tabular"):
        assert (tmp_path / f"{task}.png").stat().st_size > 1000
