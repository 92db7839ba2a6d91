"""Result files that never look complete when they are not, and whose user text is inert where it lands:
spreadsheets (formula cells), terminals and logs (newlines), plots (`$` math)."""

from __future__ import annotations

import csv
import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from matplotlib.figure import Figure

from squarefuse.apps.predict import format_table
from squarefuse.evaluation import results as results_module
from squarefuse.evaluation.eval_files import RESULT_FILES, RESULTS_FILE, is_complete
from squarefuse.evaluation.metrics import EvalResult
from squarefuse.evaluation.results import write_results
from squarefuse.report.runs import read_predictions
from squarefuse.runtime.safe_text import csv_value, csv_writer, plot_text, printable, spreadsheet_cell

FORMULAS = ['=HYPERLINK("http://evil","x")', "@SUM(A1:A9)", "+1-2", "-2+3", "\t=1", "\r=1"]


def make_result(num_classes: int = 3, num_videos: int = 6) -> EvalResult:
    labels = torch.arange(num_videos) % num_classes
    probs = torch.full((num_videos, num_classes), 0.1)
    probs[torch.arange(num_videos), labels] = 0.8
    return EvalResult(
        num_videos=num_videos,
        num_failed=0,
        views=(1, 1),
        indices=torch.arange(num_videos),
        labels=labels,
        probs=probs,
    )


def records(names: list[str]) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=Path(n).stem, path=n) for n in names]


def csv_cells(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# ------------------------------------------------------------------ item 3: complete or not at all


def test_an_eval_that_fails_mid_predictions_leaves_no_results_json(tmp_path):
    class BrokenRecord:
        id = "v3"

        @property
        def path(self):  # the write fails on video 3's row, as a full disk would
            raise OSError(errno.ENOSPC, "No space left on device")

    recs = [*records([f"/data/v{i}.mp4" for i in range(3)]), BrokenRecord(), *records(["/data/v4.mp4", "/data/v5.mp4"])]
    with pytest.raises(OSError, match="No space"):
        write_results(make_result(), tmp_path, ["a", "b", "c"], recs)
    assert not (tmp_path / RESULTS_FILE).exists()  # the complete-looking numbers of a broken eval
    assert not (tmp_path / "predictions.csv").exists()  # never a file cut mid-row
    assert [p.name for p in tmp_path.iterdir()] == ["per_class.csv"]  # and no temporary files
    assert not is_complete(tmp_path)


def test_a_failed_rewrite_does_not_keep_the_earlier_results_json(tmp_path, monkeypatch):
    write_results(make_result(), tmp_path, ["a", "b", "c"], records([f"/v{i}.mp4" for i in range(6)]))
    assert is_complete(tmp_path) and set(RESULT_FILES) | {RESULTS_FILE} == {p.name for p in tmp_path.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results_module.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_results(make_result(), tmp_path, ["a", "b", "c"], records([f"/w{i}.mp4" for i in range(6)]))
    assert not (tmp_path / RESULTS_FILE).exists() and not is_complete(tmp_path)


def test_class_names_with_dollar_signs_are_drawn_as_text(tmp_path):
    # An unknown math command between two `$` made the confusion-matrix plot, and the eval, fail.
    names = [r"$\notacommand$", "costs $5 - $10", "a$b$c"]
    write_results(make_result(), tmp_path, names, records([f"/v{i}.mp4" for i in range(6)]))
    assert is_complete(tmp_path) and (tmp_path / "confusion_matrix.png").stat().st_size > 1000
    with open(tmp_path / "per_class.csv", newline="") as f:
        assert [r["class"] for r in csv.DictReader(f)] == names  # the files keep the names as they are

    text = Figure().text(0, 0, plot_text("a$b$c"))
    assert text._preprocess_math(text.get_text()) == ("a$b$c", False)  # shown as written, not as math


def _eval_folder(run: Path, name: str, top1: float, *, complete: bool) -> Path:
    """An eval folder as write_results leaves it; `complete=False`: as an older version left a failed
    eval (results.json first, predictions.csv cut mid-row, no probs.pt or plot)."""
    out = run / "eval" / name
    out.mkdir(parents=True)
    (out / RESULTS_FILE).write_text(json.dumps({"top1": top1, "top5": 100.0, "num_videos": 2, "frame_order": "normal"}))
    lines = ["index,id,path,label,label_name,pred,pred_name", "0,v0,/v0.mp4,0,a,0,a", "1,v1,/v1.mp4,1,b,1,b"]
    if complete:
        (out / "predictions.csv").write_text("\n".join(lines) + "\n")
        for name in RESULT_FILES:
            if not (out / name).exists():
                (out / name).write_bytes(b"x")
    else:
        (out / "predictions.csv").write_text("\n".join(lines)[:-7])
    return out


def test_report_leaves_out_and_lists_incomplete_evals(tmp_path):
    from squarefuse.report.app import make_report  # noqa: PLC0415

    run = tmp_path / "runs" / "r0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("trainer: {seed: 0, epochs: 1}\nfusion: {_target_: none}\n")
    (run / "metrics.jsonl").write_text(
        json.dumps({"split": "val_clip", "epoch": 1, "step": 1, "top1": 50.0})
        + "\n"
        + json.dumps({"split": "end", "status": "finished", "step": 1})
        + "\n"
    )
    _eval_folder(run, "2026-12-02_09-00-00", 60.0, complete=True)
    broken = _eval_folder(run, "2026-12-02_10-00-00", 100.0, complete=False)  # later, so it would win
    (run / "eval" / "2026-12-02_11-00-00").mkdir()  # failed before writing anything (or still running)

    report = make_report([tmp_path / "runs"], tmp_path / "out")
    (summary,) = report.summaries
    assert summary.eval_top1.values == [60.0]  # the complete eval, not the later broken one
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Incomplete evaluations (not used)" in md
    assert f"- `{broken}` " in md and f"- `{run / 'eval' / '2026-12-02_11-00-00'}` " in md


# ------------------------------------------------------------------ item 9: inert user text


@pytest.mark.parametrize("payload", FORMULAS + ["'quoted"])
def test_formula_cells_are_guarded_and_read_back(payload):
    cell = spreadsheet_cell(payload)
    assert cell == "'" + payload and csv_value(cell) == payload


@pytest.mark.parametrize("value", ["-0.5", "+3", "1e-05", "-12", -0.5, 7, None, "", "plain", "a=b", "v-1.mp4"])
def test_numbers_and_plain_text_stay_as_they_are(value):
    assert spreadsheet_cell(value) == value


def test_eval_csv_files_hold_no_formula(tmp_path):
    names = ['=HYPERLINK("http://evil","click")', "@SUM(A1)", "+1-2"]
    videos = [f"/data/{p}.mp4" if i % 2 else p for i, p in enumerate(FORMULAS)]
    write_results(make_result(), tmp_path, names, records(videos))
    for name in ("per_class.csv", "predictions.csv"):
        for row in csv_cells(tmp_path / name)[1:]:
            for cell in row:
                if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
                    float(cell)  # only numbers may start like a formula
    with open(tmp_path / "per_class.csv", newline="") as f:
        assert [r["class"] for r in csv.DictReader(f)] == ["'" + n for n in names]
    # Our readers undo the guard: the report pairs videos by their real path.
    assert sorted(read_predictions(tmp_path / "predictions.csv")) == sorted(videos)


def test_negative_numbers_we_write_stay_numbers(tmp_path):
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv_writer(f).writerows([["drop", "label"], [f"{-0.5:.4f}", -1], ["=cmd", "-inf"]])
    assert csv_cells(tmp_path / "t.csv") == [["drop", "label"], ["-0.5000", "-1"], ["'=cmd", "'-inf"]]


def test_a_newline_in_a_file_name_stays_on_its_table_line():
    rows = [
        {"id": "evil\nFAKE 100.000 line.mp4", "error": None, "top": [{"class": "a\rb", "prob": 0.9}]},
        {"id": "bad.mp4", "error": "cannot open\x1b[2J", "top": []},
    ]
    lines = format_table(rows)
    assert len(lines) == 2 and not any(c in line for line in lines for c in "\n\r\x1b")
    assert lines[0].startswith("evil\\nFAKE") and "a\\rb (0.900)" in lines[0]
    assert printable("a\tb\u2028c") == "a\\tb\\u2028c" and printable("ünïcode ok") == "ünïcode ok"
