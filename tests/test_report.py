"""scripts/report.py on hand-written run folders with known metrics: means, stds, McNemar, the runs left out."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers.scripts import run_script

from squarefuse.config.compose_config import compose_app_config
from squarefuse.evaluation.eval_files import RESULT_FILES
from squarefuse.report.app import make_report
from squarefuse.report.groups import group_runs, run_matches
from squarefuse.report.plots import training_curves_figure
from squarefuse.report.runs import Run, expected_jobs, find_run_dirs, load_run
from squarefuse.report.significance import PairingError, discordant_counts, mcnemar_exact

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["left", "right"]
FUSIONS = {
    "square": {"_target_": "squarefuse.models.fusion.square_fuse", "_partial_": True, "K": 8, "P": 2},
    "none": {"_target_": "squarefuse.models.fusion.NoFusion", "_partial_": True},
    "temporal_conv": {"_target_": "squarefuse.models.fusion.TemporalConv", "_partial_": True},
    "temporal_shift": {"_target_": "squarefuse.models.fusion.TemporalShift", "_partial_": True},
}


def write_eval(run: Path, name: str, correct: list[bool], *, frame_order: str = "normal", videos=None) -> None:
    """eval/<name>/ as eval.py writes it (results.json, written last, predictions.csv, and the files the
    report does not read as placeholders); video i has label i % 2."""
    out = run / "eval" / name
    out.mkdir(parents=True)
    videos = videos or [f"/data/v{i}.mp4" for i in range(len(correct))]
    with open(out / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["index", "id", "path", "label", "label_name", "pred", "pred_name", "prob", "correct", "top5", "top5_probs"]
        )
        for i, (path, ok) in enumerate(zip(videos, correct, strict=True)):
            label = i % 2
            pred = label if ok else 1 - label
            writer.writerow(
                [i, Path(path).stem, path, label, CLASSES[label], pred, CLASSES[pred], "0.9", int(ok), "", ""]
            )
    for name in RESULT_FILES:
        if not (out / name).exists():
            (out / name).write_bytes(b"placeholder")
    top1 = 100.0 * sum(correct) / len(correct)
    results = {"top1": top1, "top5": 100.0, "mean_class_acc": top1, "num_videos": len(correct), "views": {"clips": 2}}
    (out / "results.json").write_text(json.dumps({**results, "frame_order": frame_order}))


def write_run(
    root: Path,
    name: str,
    *,
    fusion: str,
    seed: int,
    val: list[float],
    epochs: int = 2,
    end: dict | None = None,
    clips_per_s: list[float] = (10.0, 20.0, 30.0),
    hydra_choices: bool = True,
    model_info: dict | None = None,
    head: str | None = None,
) -> Path:
    """A run folder as train.py writes it: config.yaml, metrics.jsonl (val top-1 of epochs 1..), .hydra."""
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    config = {
        "fusion": FUSIONS[fusion],
        "trainer": {"epochs": epochs, "max_steps": None, "seed": seed, "batch_size": 4},
        "dataset": {"name": "synthetic", "root": f"/data/{name}"},  # paths differ: must not split groups
    }
    if head is not None:
        config["head"] = {"_target_": f"squarefuse.models.heads.{head.capitalize()}Head", "_partial_": True}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    if hydra_choices:
        (run / ".hydra").mkdir()
        choices = {"fusion": fusion, "dataset": "synthetic", **({"head": head} if head else {})}
        hydra = {"hydra": {"runtime": {"choices": choices}}}
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    records = [
        {"step": i + 1, "epoch": 0, "split": "train", "loss": 1.0, "clips_per_s": c} for i, c in enumerate(clips_per_s)
    ]
    records += [{"step": 4 * (e + 1), "epoch": e + 1, "split": "val_clip", "top1": t} for e, t in enumerate(val)]
    if end is not None:
        records.append({"step": 4 * len(val), "epoch": len(val), "split": "end", **end})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if model_info is not None:
        (run / "model_info.json").write_text(json.dumps(model_info))
    return run


FINISHED = {"status": "finished", "wall_s": 60.0}
SQUARE_INFO = {
    "params": {"backbone": 1000, "fusion": 2000, "block_fusions": 500, "head": 10, "total": 3510},
    "flops_per_clip": {"backbone": 4e9, "fusion": 2e6, "head": 1e3, "total": 4.002e9},
}


# ------------------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (1, 7, 18 / 256),  # 2 * P(X <= 1 | n=8) = 2 * (1 + 8) / 2**8
        (0, 5, 2 / 32),  # 2 * 0.5**5
        (3, 3, 1.0),  # a tie: no evidence either way
        (0, 0, 1.0),  # no video separates the two models
        (9, 1, 22 / 1024),  # symmetric in b and c: 2 * (1 + 10) / 2**10
    ],
)
def test_exact_mcnemar_against_hand_computed_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_discordant_counts_and_refusal_of_different_videos(tmp_path):
    from squarefuse.report.runs import Prediction  # noqa: PLC0415

    base = {"a": Prediction(0, "x", True), "b": Prediction(1, "y", False), "c": Prediction(0, "x", True)}
    other = {"a": Prediction(0, "x", False), "b": Prediction(1, "y", True), "c": Prediction(0, "x", True)}
    assert discordant_counts(base, other) == (1, 1)
    with pytest.raises(PairingError, match="different video sets"):
        discordant_counts(base, {**other, "d": Prediction(1, "y", True)})
    with pytest.raises(PairingError, match="label"):
        discordant_counts(base, {**other, "c": Prediction(1, "y", True)})


# ------------------------------------------------------------------------------------- a sweep


@pytest.fixture
def sweep(tmp_path) -> Path:
    """square x 3 seeds + none x 3 seeds (finished, evaluated), a crashed and an unfinished square run,
    and a finished none run that was never evaluated."""
    root = tmp_path / "multirun"
    # square: final val 80, 90, 70 (mean 80, std 10); best 85, 90, 75 (mean 83.33, std 7.638)
    for i, (seed, val) in enumerate([(0, [85, 80]), (1, [60, 90]), (2, [75, 70])]):
        write_run(root, str(i), fusion="square", seed=seed, val=val, end=FINISHED, model_info=SQUARE_INFO)
    for i, seed in enumerate([0, 1, 2]):
        write_run(root, str(3 + i), fusion="none", seed=seed, val=[50.0, 40.0 + 10 * seed], end=FINISHED)
    write_run(root, "6", fusion="square", seed=3, val=[10.0], end={"status": "crashed", "error": "RuntimeError: boom"})
    write_run(root, "7", fusion="square", seed=4, val=[12.0])  # no end record, 1 of 2 epochs
    write_run(root, "8", fusion="none", seed=3, val=[50.0, 50.0], end=FINISHED)  # not evaluated

    # Eval on 10 videos. Seed 0: b=1 (video 0: none only), c=4 (videos 1-4: square only).
    # Seed 1: b=0, c=3.  Seed 2: b=0, c=0 (both right on the same videos). Pooled b=1, c=7.
    none_ok = {0: [1, 0, 0, 0, 0, 1, 1, 0, 0, 0], 1: [0] * 5 + [1] * 5, 2: [1] * 7 + [0] * 3}
    square_ok = {0: [0, 1, 1, 1, 1, 1, 1, 0, 0, 0], 1: [1, 1, 1] + [0] * 2 + [1] * 5, 2: [1] * 7 + [0] * 3}
    for seed in range(3):
        write_eval(root / str(seed), "2026-11-29_10-00-00", [bool(x) for x in square_ok[seed]])
        write_eval(root / str(3 + seed), "2026-11-29_10-00-00", [bool(x) for x in none_ok[seed]])
    # Reversed: square drops to 20% on every seed, none keeps its accuracy.
    for seed in range(3):
        write_eval(root / str(seed), "2026-11-29_11-00-00", [True, True] + [False] * 8, frame_order="reversed")
        write_eval(
            root / str(3 + seed), "2026-11-29_11-00-00", [bool(x) for x in none_ok[seed]], frame_order="reversed"
        )
    return root


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["group"]: row for row in csv.DictReader(f)}


def test_report_means_stds_and_p_value(sweep, tmp_path):
    report = make_report([sweep], tmp_path / "out")
    labels = [s.label for s in report.summaries]
    assert labels == ["fusion=square", "fusion=none"]  # dataset.root differs per run, yet one group each
    square, none = report.summaries

    assert len(square.finished) == 3 and square.final_top1.mean == pytest.approx(80.0)
    assert square.final_top1.std == pytest.approx(10.0)
    assert square.best_top1.mean == pytest.approx(250 / 3) and square.best_top1.std == pytest.approx(7.6376261583)
    # square eval top-1 per seed: 60, 80, 70 -> 70 ± 10; reversed 20 -> drops 40, 60, 50 -> 50 ± 10
    assert square.eval_top1.values == [60.0, 80.0, 70.0] and square.eval_top1.std == pytest.approx(10.0)
    assert square.reversal_drop.mean == pytest.approx(50.0) and square.reversal_drop.std == pytest.approx(10.0)
    assert none.reversal_drop.values == [0.0, 0.0, 0.0]
    assert square.clips_per_s.mean == pytest.approx(25.0)  # the first (start-up) window left out
    assert square.wall_s.mean == pytest.approx(60.0)
    assert square.fusion_params == 2000 + 500  # the layer after the backbone + those inserted in it
    assert square.fusion_flops == 2e6 and none.fusion_params is None

    assert none.is_baseline and square.comparison.test is not None
    test = square.comparison.test
    assert (test.b, test.c, test.seeds) == (1, 7, [0, 1, 2])
    assert test.p_value == pytest.approx(18 / 256)

    rows = read_csv(tmp_path / "out" / "report.csv")
    assert float(rows["fusion=square"]["final_top1_mean"]) == pytest.approx(80.0)
    assert float(rows["fusion=square"]["final_top1_std"]) == pytest.approx(10.0)
    assert float(rows["fusion=square"]["mcnemar_p"]) == pytest.approx(18 / 256)
    assert rows["fusion=square"]["num_runs"] == "5" and rows["fusion=square"]["num_finished"] == "3"
    assert rows["fusion=none"]["baseline"] == "(this group)" and rows["fusion=none"]["fusion_params"] == ""

    md = (tmp_path / "out" / "report.md").read_text()
    assert "80.00 ± 10.00" in md and "0.0703 (b=1, c=7)" in md and "3/5" in md
    # Nothing dropped silently: the crashed, the unfinished and the un-evaluated runs are named.
    assert f"`{sweep / '6'}` (fusion=square): crashed, crashed at step 4: RuntimeError: boom" in md
    assert f"`{sweep / '7'}` (fusion=square): unfinished" in md
    assert f"`{sweep / '8'}` (fusion=none): no eval" in md
    for name in ("training_curves.png", "accuracy_vs_fusion_flops.png", "per_class_gain.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000, name
        assert f"![{name}]({name})" in md


def test_tie_and_no_discordant_video(tmp_path):
    root = tmp_path / "runs"
    for fusion in ("square", "none"):
        for seed in (0, 1):
            write_run(root, f"{fusion}{seed}", fusion=fusion, seed=seed, val=[50.0, 50.0], end=FINISHED)
    # seed 0: square right on 0-1, none right on 2-3 -> b=2, c=2 (a tie); seed 1: identical -> b=c=0
    write_eval(root / "square0", "e", [True, True, False, False])
    write_eval(root / "none0", "e", [False, False, True, True])
    write_eval(root / "square1", "e", [True, False, True, False])
    write_eval(root / "none1", "e", [True, False, True, False])
    square = next(s for s in make_report([root], tmp_path / "out").summaries if s.label == "fusion=square")
    assert (square.comparison.test.b, square.comparison.test.c, square.comparison.test.p_value) == (2, 2, 1.0)

    identical = tmp_path / "identical"
    for fusion in ("square", "none"):
        write_run(identical, fusion, fusion=fusion, seed=0, val=[50.0, 50.0], end=FINISHED)
        write_eval(identical / fusion, "e", [True, False])
    square = next(s for s in make_report([identical], tmp_path / "out2").summaries if s.label == "fusion=square")
    assert (square.comparison.test.b, square.comparison.test.c, square.comparison.test.p_value) == (0, 0, 1.0)


def test_different_video_sets_are_refused_for_pairing(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "square", fusion="square", seed=0, val=[50.0, 60.0], end=FINISHED)
    write_run(root, "none", fusion="none", seed=0, val=[50.0, 50.0], end=FINISHED)
    write_eval(root / "square", "e", [True, False, True], videos=["/a/v0.mp4", "/a/v1.mp4", "/a/v2.mp4"])
    write_eval(root / "none", "e", [True, False, True], videos=["/b/v0.mp4", "/b/v1.mp4", "/b/v2.mp4"])
    report = make_report([root], tmp_path / "out")
    square = next(s for s in report.summaries if s.label == "fusion=square")
    assert square.comparison.test is None and "different video sets" in square.comparison.refused
    assert "seed 0" in square.comparison.refused
    md = (tmp_path / "out" / "report.md").read_text()
    assert "refused (see below)" in md and "## Pairing refused" in md and "different video sets" in md
    assert "per_class_gain.png not drawn" in md  # said, not silently missing


def test_training_curves_show_train_loss_next_to_val_and_single_points(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, f"s{seed}", fusion="square", seed=seed, val=[40.0 + 20 * seed], end=FINISHED)
    (summary,) = make_report([root], tmp_path / "out").summaries
    assert [run.train_curve for run in summary.finished] == [[(1, 1.0), (2, 1.0), (3, 1.0)]] * 2
    fig = training_curves_figure([summary])
    loss_ax, val_ax = fig.axes
    assert loss_ax.get_ylabel() == "train loss" and "val top-1" in val_ax.get_ylabel()
    (loss_line,) = loss_ax.lines
    (val_line,) = val_ax.lines
    assert list(loss_line.get_xdata()) == [1, 2, 3] and list(loss_line.get_ydata()) == [1.0, 1.0, 1.0]
    # One validation per run: a single point, visible only with a marker; the mean of 40 and 60.
    assert list(val_line.get_xdata()) == [1] and list(val_line.get_ydata()) == [50.0]
    assert val_line.get_marker() == "o" and loss_line.get_color() == val_line.get_color()


def test_accuracy_vs_flops_says_what_is_missing(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", fusion="square", seed=0, val=[50.0], end=FINISHED, model_info=SQUARE_INFO)
    md = (make_report([root], tmp_path / "out").out_dir / "report.md").read_text()
    assert "accuracy_vs_fusion_flops.png not drawn: no run was evaluated yet" in md
    write_eval(root / "a", "e", [True, False])
    (root / "a" / "model_info.json").unlink()
    md = (make_report([root], tmp_path / "out2").out_dir / "report.md").read_text()
    assert "accuracy_vs_fusion_flops.png not drawn: no run folder has a model_info.json with fusion FLOPs" in md


def test_baseline_is_found_without_hydra_choices(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", fusion="none", seed=0, val=[1.0], hydra_choices=False)
    run = load_run(root / "a")
    assert run.choices == {}
    assert run_matches(run, "fusion", "none")  # via configs/fusion/none.yaml's _target_
    assert run_matches(run, "fusion", "NoFusion") and not run_matches(run, "fusion", "square")
    assert run_matches(run, "trainer.epochs", "2") and not run_matches(run, "trainer.epochs", "3")


def test_explicit_baseline_that_matches_nothing_is_an_error(sweep, tmp_path):
    with pytest.raises(ValueError, match="fusion=temporal_attn matches no group"):
        make_report([sweep], tmp_path / "out", baseline=["fusion=temporal_attn"])
    report = make_report([sweep], tmp_path / "out", baseline=["fusion=square"])
    assert report.summaries[0].is_baseline and report.summaries[1].comparison.test.c == 1  # the roles swap


def test_each_group_is_compared_with_the_baseline_of_its_other_settings(tmp_path):
    root = tmp_path / "runs"
    # fusion x head: square/cls must be paired with none/cls, square/mean with none/mean.
    outcomes = {("square", "cls"): [1, 1, 1], ("none", "cls"): [0, 0, 0], ("square", "mean"): [1, 0, 0]}
    outcomes[("none", "mean")] = [1, 1, 0]
    for (fusion, head), correct in outcomes.items():
        run = write_run(root, f"{fusion}_{head}", fusion=fusion, head=head, seed=0, val=[1.0, 1.0], end=FINISHED)
        write_eval(run, "e", [bool(x) for x in correct])
    summaries = {s.label: s for s in make_report([root], tmp_path / "out").summaries}
    assert summaries["fusion=none head=cls"].is_baseline and summaries["fusion=none head=mean"].is_baseline
    square_cls, square_mean = summaries["fusion=square head=cls"], summaries["fusion=square head=mean"]
    assert square_cls.comparison.baseline.label == "fusion=none head=cls"
    assert (square_cls.comparison.test.b, square_cls.comparison.test.c) == (0, 3)
    assert square_mean.comparison.baseline.label == "fusion=none head=mean"
    assert (square_mean.comparison.test.b, square_mean.comparison.test.c) == (1, 0)


def test_groups_split_on_varying_keys_only(tmp_path):
    root = tmp_path / "runs"
    runs = []
    for name, fusion, k in [("a", "square", 4), ("b", "square", 8), ("c", "none", None), ("d", "square", 4)]:
        run = write_run(root, name, fusion=fusion, seed=ord(name), val=[1.0], end=FINISHED)
        if k is not None:
            config = yaml.safe_load((run / "config.yaml").read_text())
            config["fusion"]["K"] = k
            (run / "config.yaml").write_text(yaml.safe_dump(config))
        runs.append(load_run(run))
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["fusion=square fusion.K=4", "fusion=square fusion.K=8", "fusion=none"]
    assert [len(g.runs) for g in groups] == [2, 1, 1]


def test_run_status_without_an_end_record(tmp_path):
    done = load_run(write_run(tmp_path, "done", fusion="none", seed=0, val=[1.0, 2.0], epochs=2))
    half = load_run(write_run(tmp_path, "half", fusion="none", seed=0, val=[1.0], epochs=2))
    assert done.status == "finished" and half.status == "unfinished" and "no end record" in half.problem
    (tmp_path / "early" / ".hydra").mkdir(parents=True)  # failed before the trainer wrote anything
    early = load_run(tmp_path / "early")
    assert early.status == "crashed" and "no metrics.jsonl" in early.problem
    assert isinstance(early, Run) and early.val_curve == []


def test_sweep_folders_named_by_their_overrides_are_found_and_grouped(tmp_path):
    root = tmp_path / "sweep"
    names = ["0_fusion-square_seed-0", "1_fusion-square_seed-1", "10_fusion-none_seed-0"]
    for name, fusion, seed in zip(names, ["square", "square", "none"], [0, 1, 0], strict=True):
        write_run(root, name, fusion=fusion, seed=seed, val=[50.0], end=FINISHED)
    assert [p.name for p in find_run_dirs([root])] == names  # 10 after 1, as jobs were numbered
    report = make_report([root], tmp_path / "out")
    assert [(s.label, len(s.finished)) for s in report.summaries] == [("fusion=square", 2), ("fusion=none", 1)]


def test_run_folder_names_are_shown_not_rendered_and_the_eval_command_runs(tmp_path):
    root = tmp_path / "sweep"
    html, newline = "<img src=x onerror=alert(1)>", "a\nb"
    write_run(root, html, fusion="square", seed=0, val=[50.0], end=FINISHED)
    write_run(root, newline, fusion="none", seed=0, val=[50.0], end=FINISHED)
    md = (make_report([root], tmp_path / "out").out_dir / "report.md").read_text()
    # Each path in a code span; no raw HTML tag anywhere (before: `- .../<img src=x onerror=alert(1)> (fusion=...`).
    assert f"- `{root / html}` (fusion=square): no eval" in md
    assert "<img" not in md.replace(f"`{root / html}`", "").replace(f"{root / html}/checkpoints", "")
    assert "ckpt=\\<run\\>/checkpoints/best.pt" in md  # a note's placeholder, escaped (was an invisible tag)
    # The suggested command, run by bash, names the folder (before: a literal backslash-n).
    commands = re.findall(r"run `(python eval\.py .*)`$", md, flags=re.MULTILINE)
    checkpoints = set()
    for command in commands:
        word = subprocess.run(
            ["bash", "-c", "printf %s " + command.removeprefix("python eval.py ")], capture_output=True, text=True
        ).stdout
        checkpoints.add(compose_app_config("eval", [word]).ckpt)
    assert checkpoints == {str(root / folder / "checkpoints" / "best.pt") for folder in (html, newline)}


def test_multirun_discovery_and_missing_jobs(sweep, tmp_path):
    multirun = {"hydra": {"overrides": {"task": ["fusion=square,none", "trainer.seed=range(5)", "trainer.epochs=2"]}}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    assert expected_jobs(sweep) == 10
    assert [p.name for p in find_run_dirs([sweep])] == [str(i) for i in range(9)]  # eval/ is not a run
    md = (make_report([sweep], tmp_path / "out").out_dir / "report.md").read_text()
    assert "the sweep asked for 10 jobs but only 9 have a run folder" in md
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_run_dirs([tmp_path / "nowhere"])


def test_report_py_command_line(sweep):
    done = run_script("scripts/report.py", str(sweep), "--baseline", "fusion=none", cwd=sweep)
    assert done.returncode == 0, done.stderr
    assert (sweep / "report" / "report.md").is_file() and (sweep / "report" / "report.csv").is_file()
    assert "fusion=square" in done.stdout and "0.0703" in done.stdout
    done = run_script("scripts/report.py", str(sweep), "--baseline", "fusion", cwd=sweep)
    assert done.returncode != 0 and "KEY=VALUE" in done.stderr
