"""A metric added to `metrics.METRICS` in one place reaches every record of it: the trainer's
`val_clip` records, eval's results.json and summary line, report.md and report.csv; old runs' keys
are still read."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from helpers.checkpoints import eval_cfg
from helpers.configs import tiny_train_config
from test_report import FINISHED, write_eval, write_run
from test_result_files import make_result

from squarefuse.apps.evaluate import run_eval
from squarefuse.evaluation.metrics import METRICS, Metric, Scores
from squarefuse.evaluation.results import write_results
from squarefuse.report.app import make_report
from squarefuse.training.trainer import Trainer

# The test's one definition of a new metric: the share of videos whose top-1 class is wrong.
ERROR_RATE = Metric(
    "error_rate",
    "error rate",
    lambda s: 100.0 * (s.preds != s.labels).double().mean().item(),
    digits=3,
    higher_is_better=False,
)


def report_csv_row(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        (row,) = csv.DictReader(f)
    return row


@pytest.mark.slow
def test_a_metric_registered_once_appears_in_val_records_results_summary_and_report(
    data_root, tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(METRICS, ERROR_RATE.name, ERROR_RATE)  # the one place; undone after the test
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="squarefuse"):
        summary = Trainer(tiny_train_config(data_root, "trainer.epochs=1"), run).fit()
        assert summary["status"] == "finished"

        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        (val,) = [r for r in records if r["split"] == "val_clip"]
        assert val["error_rate"] == pytest.approx(100.0 - val["top1"])
        assert f"error rate: {val['error_rate']:.3f}%" in caplog.text  # the trainer's validation line

        caplog.clear()
        result = run_eval(eval_cfg(run / "checkpoints" / "best.pt"), run / "eval" / "e")
    results = json.loads((run / "eval" / "e" / "results.json").read_text())
    assert results["error_rate"] == pytest.approx(100.0 - results["top1"]) == result.metrics["error_rate"]
    assert f"error rate: {results['error_rate']:.3f}%" in caplog.text  # eval's summary line

    report = make_report([run], tmp_path / "report")
    assert report.summaries[0].evals["error_rate"].values == [pytest.approx(results["error_rate"])]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "eval error rate" in md and f"{results['error_rate']:.3f}" in md
    assert "lower is better for eval loss, eval error rate" in md
    row = report_csv_row(tmp_path / "report" / "report.csv")
    assert float(row["eval_error_rate_mean"]) == pytest.approx(results["error_rate"])
    assert row["eval_error_rate_n"] == "1"


def test_write_results_takes_the_numbers_metrics_computed(tmp_path, monkeypatch):
    """results.json holds what metrics.py computed (one computation), not a second one of its own."""
    calls = []

    def counted(s: Scores) -> float:
        calls.append(s)
        return 42.0

    monkeypatch.setitem(METRICS, "answer", Metric("answer", "answer", counted))
    result = make_result()
    write_results(result, tmp_path, ["a", "b", "c"])
    assert len(calls) == 1 and json.loads((tmp_path / "results.json").read_text())["answer"] == 42.0


def test_report_reads_the_top5_key_of_runs_written_before_the_rename(tmp_path):
    run = write_run(tmp_path / "runs", "old", fusion="none", seed=0, val=[50.0], epochs=1, end=FINISHED)
    write_eval(run, "e", [True, False, True, True])  # results.json with "top5", as before topk_acc
    assert "top5" in json.loads((run / "eval" / "e" / "results.json").read_text())
    report = make_report([tmp_path / "runs"], tmp_path / "report")
    assert report.summaries[0].evals["topk_acc"].values == [100.0]
    assert float(report_csv_row(tmp_path / "report" / "report.csv")["eval_topk_acc_mean"]) == 100.0
