"""The temporal benchmark's task x fusion matrix on hand-written run folders with known test results."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from scipy.stats import ttest_ind
from test_report import FINISHED, write_eval, write_run

from squarefuse.report.app import make_report
from squarefuse.report.matrix import Matrix, matrix_markdown, task_fusion_matrix
from squarefuse.report.runs import load_run
from squarefuse.report.significance import holm


def benchmark_run(root: Path, task: str, fusion: str, seed: int, right: int, *, twin_confusion: float | None = None):
    """A finished run of `task` whose test evaluation gets the first `right` of 10 videos right."""
    run = write_run(root, f"{task}_{fusion}_{seed}", fusion=fusion, seed=seed, val=[50.0, 60.0], end=FINISHED)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["dataset"]["task"] = task
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    write_eval(run, "1_test", [i < right for i in range(10)])
    results = json.loads((run / "eval" / "1_test" / "results.json").read_text())
    results["split"] = "test"
    if twin_confusion is not None:
        results["twin_confusion"] = {"confusion": twin_confusion, "num_videos": 10, "pairs": []}
    (run / "eval" / "1_test" / "results.json").write_text(json.dumps(results))
    return run


@pytest.fixture
def benchmark(tmp_path) -> Path:
    root = tmp_path / "bench"
    for seed in (0, 1):
        benchmark_run(root, "direction", "square", seed, 10, twin_confusion=0.0)
        benchmark_run(root, "direction", "none", seed, 5, twin_confusion=40.0 + 20 * seed)
    benchmark_run(root, "path_shape", "square", 0, 7)
    benchmark_run(root, "path_shape", "square", 1, 8)
    benchmark_run(root, "path_shape", "none", 0, 6)
    benchmark_run(root, "path_shape", "none", 1, 8)
    val_only = write_run(root, "grid_point", fusion="none", seed=0, val=[50.0, 60.0], end=FINISHED)
    write_eval(val_only, "1_val", [True] * 10)  # evaluated, but not on the test split
    return root


def test_matrix_against_hand_computed_values(benchmark):
    runs = [load_run(p) for p in sorted(benchmark.iterdir())]
    matrix = task_fusion_matrix(runs, split="test")
    assert matrix.tasks == ["direction", "path_shape"] and matrix.fusions == ["none", "square"]
    cell = matrix.cells
    assert cell[("direction", "square")].top1.mean == 100.0 and cell[("direction", "square")].is_reference
    # direction: none 50 % on both seeds, square 100 %: no spread on either side, a sure difference.
    none = cell[("direction", "none")].versus_reference
    assert none.difference == -50.0 and none.p_value == 0.0 and none.seeds == (2, 2)
    assert -80.01 <= none.ci[0] < -50 < none.ci[1] <= -19.99  # only the videos vary: 5 of 10 right, resampled
    assert cell[("direction", "none")].verdict(0.05) == "worse"
    assert cell[("direction", "none")].twin_confusion.mean == 50.0
    # path_shape: square 70 / 80, none 60 / 80: Welch over the seeds, Holm over the two comparisons
    # (the other p is 0, so this one, the larger, is multiplied by 1).
    other = cell[("path_shape", "none")].versus_reference
    p = ttest_ind([60.0, 80.0], [70.0, 80.0], equal_var=False).pvalue
    assert other.difference == -5.0 and other.p_value == pytest.approx(p) and other.p_holm == pytest.approx(p)
    assert cell[("path_shape", "none")].verdict(0.05) == "inconclusive"  # a large p is not a tie
    assert any("grid_point" in line and "no evaluation of split test" in line for line in matrix.skipped)

    text = matrix_markdown(matrix)
    assert "| direction | 50.0 ± 0.0 (n=2) Δ-50.0 [" in text and "p_Holm=0 worse | **100.0 ± 0.0 (n=2)** ref |" in text
    assert "| path_shape | 70.0 ± 14.1 (n=2) Δ-5.0 [" in text and "inconclusive | **75.0 ± 7.1 (n=2)** ref |" in text
    assert "| direction | 50.0 ± 14.1 | 0.0 ± 0.0 |" in text  # the twin confusion table
    assert "best" not in text  # nothing is chosen on the test split


def test_a_tie_needs_the_interval_inside_the_margin_and_seeds_must_match(tmp_path):
    for seed in (0, 1, 2):
        benchmark_run(tmp_path, "speed", "square", seed, 8)
        benchmark_run(tmp_path, "speed", "none", seed, 8)  # the same videos right: a difference of exactly 0
        benchmark_run(tmp_path, "speed", "temporal_conv", seed, 8 if seed else 6)
    benchmark_run(tmp_path, "speed", "temporal_shift", 0, 8)  # seed 0 only
    matrix = task_fusion_matrix([load_run(p) for p in sorted(tmp_path.iterdir())], split="test")
    none = matrix.cells[("speed", "none")]
    assert none.versus_reference.ci == (0.0, 0.0) and none.verdict(0.05) == "tie"
    conv = matrix.cells[("speed", "temporal_conv")]
    assert conv.versus_reference.ci[0] < -2 and conv.verdict(0.05) == "inconclusive"
    shift = matrix.cells[("speed", "temporal_shift")]
    assert shift.versus_reference is None and "seeds [0] here, [0, 1, 2] in the reference" in shift.refused


def test_holm_adjusts_in_order_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.5]) == [1.0, 1.0] and holm([]) == []


def test_twin_confusion_that_is_100_minus_top1_is_not_shown(tmp_path):
    for seed in (0, 1):
        benchmark_run(tmp_path, "event_order", "square", seed, 9, twin_confusion=10.0)
        benchmark_run(tmp_path, "event_order", "none", seed, 5, twin_confusion=50.0)
    matrix = task_fusion_matrix([load_run(p) for p in sorted(tmp_path.iterdir())], split="test")
    assert not matrix.shows_twin_confusion("event_order") and "Twin confusion" not in matrix_markdown(matrix)


def test_report_py_matrix_files(benchmark, tmp_path):
    report = make_report([benchmark], tmp_path / "out", matrix=True)
    assert {"matrix.md", "matrix.csv", "temporal_matrix.png"} <= {p.name for p in report.out_dir.iterdir()}
    with open(report.out_dir / "matrix.csv", newline="") as f:
        rows = {(r["task"], r["option"]): r for r in csv.DictReader(f)}
    assert float(rows[("path_shape", "none")]["top1_mean"]) == 70.0
    assert rows[("path_shape", "none")]["verdict"] == "inconclusive"
    assert rows[("direction", "none")]["verdict"] == "worse" and float(rows[("direction", "none")]["p_holm"]) == 0
    assert rows[("direction", "square")]["verdict"] == "reference"
    assert (report.out_dir / "temporal_matrix.png").stat().st_size > 1000


def grid_run(root: Path, fusion: str, lr: float, seed: int, final_val: float, *, finished: bool = True) -> Path:
    # An unfinished run: one of its two epochs validated, no end record.
    val, end = ([10.0, final_val], FINISHED) if finished else ([final_val], None)
    run = write_run(root, f"{fusion}_{lr}_{seed}", fusion=fusion, seed=seed, val=val, end=end)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["optim"] = {"lr": lr}
    config["dataset"]["task"] = "speed"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_the_lr_is_chosen_by_mean_val_top1_and_every_grid_point_is_listed(tmp_path):
    from squarefuse.report.lr_grid import choose_lrs, grid_markdown  # noqa: PLC0415

    # square: 1e-3 -> 60, 70 (mean 65); 2e-3 -> 90, 20 (mean 55, the best single run); 4e-3 -> 65 (a tie
    # with 1e-3 on the mean: the smaller lr wins) and one run that never finished (not a zero).
    for lr, seed, val in ((1e-3, 0, 60), (1e-3, 1, 70), (2e-3, 0, 90), (2e-3, 1, 20), (4e-3, 0, 65)):
        grid_run(tmp_path, "square", lr, seed, val)
    grid_run(tmp_path, "square", 4e-3, 1, 0.0, finished=False)
    grid_run(tmp_path, "none", 1e-3, 0, 50)
    grid_run(tmp_path, "none", 4e-3, 0, 55)
    chosen, points = choose_lrs([load_run(p) for p in sorted(tmp_path.iterdir())])
    assert chosen == {("speed", "none"): 4e-3, ("speed", "square"): 1e-3}
    square = {p.lr: p for p in points if p.fusion == "square"}
    assert square[2e-3].mean == 55.0 and square[4e-3].val_top1 == [65.0] and square[4e-3].unfinished == 1
    text = grid_markdown(chosen, points)
    assert "| speed | square | 0.001 | 65.0 | 2 | yes |" in text
    assert "| speed | square | 0.004 | 65.0 | 1 (+1 unfinished) |  |" in text


def test_matrix_names_and_skipped_runs_are_shown_not_rendered():
    matrix = Matrix(
        tasks=["<b>direction</b>"],
        fusions=["a|b"],
        cells={},
        split="test",
        alpha=0.05,
        skipped=["runs/<img src=x>: no eval"],
    )
    text = matrix_markdown(matrix)
    assert "| \\<b\\>direction\\</b\\> |" in text and "| task | a\\|b |" in text
    assert "- runs/\\<img src=x\\>: no eval" in text
    assert re.search(r"(?<!\\)<", text) is None  # no `<` a renderer would read as the start of a tag
