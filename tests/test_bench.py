"""Every bench script runs end to end in its --tiny mode and writes its JSON result (the figures
themselves are measured by running the scripts, never asserted: these machines are shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(path.stem for path in (ROOT / "bench").glob("*.py"))
# What each writes, and a key its JSON must hold.
WRITES = {
    "augmentation_subsets": ("augmentation_subsets.json", "rows"),
    "chaos": ("chaos.json", "kinds"),
    "clip_selection": ("clip_selection.json", "rows"),
    "distillation": ("distillation.json", "rows"),
    "encoded_layout": ("encoded_layout.json", "rows"),
    "gpu": ("gpu.json", "kernels"),
    "io_savings": ("io_savings.json", "results"),
    "kernels": ("kernels.json", "methods"),
    "label_errors": ("label_errors.json", "mnist1d/sym20"),
    "loader": ("loader.json", "results"),
    "range_clients": ("range_clients.json", "results"),
    "ragged_selection": ("ragged_selection.json", "rows"),
    "round_cost": ("round_cost.json", "rows"),
    "scale": ("scale.json", "methods"),
    "selection_quality": ("selection_quality.json", "rows"),
    "server_trainers": ("server_trainers.json", "rows"),
    "ssl_selection": ("ssl_selection.json", "rows"),
}
# Rows a tiny run must write, by method: the server on a core of its own needs a second core.
ON_OWN_CORE = ["server on its own core: reselect", "server on its own core: reselect ahead, the wait"]
METHODS = {
    "round_cost": [
        "reselect",
        "reselect ahead: the wait",
        "shapes: reselect",
        "shapes: graft-round-0",
        "photos: graft-round-0",
        "photos: graft-round-0, whole decodes",
        *ON_OWN_CORE * (len(os.sched_getaffinity(0)) > 1),
    ]
}
EXTRA = {"gpu": ["--device", "cpu"]}  # the GPU bench on the CPU: its code paths, not its figures


def test_every_bench_has_a_smoke_run():
    assert set(BENCHES) == set(WRITES)


@pytest.mark.slow
@pytest.mark.parametrize("bench", BENCHES)
def test_bench_runs_tiny(bench, tmp_path):
    command = [
        sys.executable,
        str(ROOT / "bench" / f"{bench}.py"),
        "--tiny",
        "--out",
        str(tmp_path),
        *EXTRA.get(bench, []),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    name, key = WRITES[bench]
    result = json.loads((tmp_path / name).read_text())
    assert result[key], f"{bench} wrote no {key}"
    if bench in METHODS:
        missing = set(METHODS[bench]) - {row["method"] for row in result[key]}
        assert not missing, f"{bench} wrote no rows of {sorted(missing)}"
    if bench == "selection_quality":  # every class's accuracy beside the mean (issue 22: long tails)
        for row in result[key]:
            per_class = row["per_class_accuracy_mean"]
            assert len(per_class) == 10 and min(per_class) <= row["rare_half_accuracy_mean"] <= max(per_class)


def test_selection_quality_plots_a_run_of_all_data_alone(tmp_path, monkeypatch):
    # `--methods full` alone has no subset rows to take the epochs from; it once failed after its runs
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from selection_quality import plot

    row = {"dataset": "classes100/sym20", "method": "full", "keep": 1.0, "epochs": 15}
    plot([{**row, "accuracy_mean": 0.87, "accuracy_std": 0.003}], tmp_path / "full.png")
    assert (tmp_path / "full.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("bench", "arguments", "message"),
    [
        ("clip_selection", ["--mismatched", "1.5"], "--mismatched is the share of pairs mismatched, in [0, 1)"),
        ("ssl_selection", ["--keeps", "0.5", "1.5"], "--keeps are fractions of the data in (0, 1], got [0.5, 1.5]"),
        ("distillation", ["--per-class", "0"], "--per-class must be >= 1, got 0"),
        ("augmentation_subsets", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
        ("selection_quality", ["--shuffle-blocks", "64", "0"], "--shuffle-blocks must be >= 1, got [64, 0]"),
        ("selection_quality", ["--seeds", "0", "0", "1"], "--seeds names a seed twice: [0, 0, 1]"),
    ],
)
def test_bench_arguments_out_of_range_are_refused_before_any_run(bench, arguments, message, tmp_path):
    command = [sys.executable, str(ROOT / "bench" / f"{bench}.py"), *arguments, "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and not any(tmp_path.iterdir())
