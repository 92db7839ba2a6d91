"""scripts/temporal_benchmark.py end to end on a micro setting: every phase, in the folders the README names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers.scripts import run_script

from squarefuse.report.groups import fusion_option
from squarefuse.report.runs import load_run

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_benchmark_caches_tunes_on_val_and_reports_other_seeds_on_test(tmp_path):
    out = tmp_path / "bench"
    args = [
        str(out),
        "--tasks",
        "path_shape",
        "--fusions",
        "none",
        "square",
        "--lrs",
        "1e-3",
        "1e-2",
        "--seeds",
        "1",
        "2",
        "--grid-seeds",
        "0",
        "--heads",
        "mean",
        "--data-dir",
        str(tmp_path / "data"),
        "--data",
        "dataset.generate.train_per_class=4",
        "dataset.generate.val_per_class=2",
        "dataset.generate.test_per_class=3",
        "--",
        "trainer.epochs=1",
        "trainer.val_every=1",
        "trainer.batch_size=4",
    ]
    # In this process (helpers/scripts.py); the training runs it starts are processes of their own.
    done = run_script("scripts/temporal_benchmark.py", *args, cwd=REPO, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # 0. The cache holds train, val and test of the never-trained backbone train.py starts from.
    cache = json.loads((out / "cache" / "path_shape" / "cache.json").read_text())
    assert cache["checkpoint"] is None and cache["task"] == "path_shape"
    assert cache["train_config"][:2] == ["dataset.task=path_shape", f"dataset.root={tmp_path / 'data' / 'path_shape'}"]
    for split, videos in (("train", 8), ("val", 4), ("test", 6)):
        index = json.loads((out / "cache" / "path_shape" / split / "index.json").read_text())
        assert len(index["videos"]) == videos, split
    # 0. The pixel control's cache: the same videos' eval views, each frame as its 8 x 8 pixels.
    pixels = json.loads((out / "cache_pixels" / "path_shape" / "cache.json").read_text())
    assert pixels["backbone_name"] == "pixels" and pixels["num_tokens"] == 1 and pixels["views"] == cache["views"]
    # 1-2. Every grid point ran at grid seed 0, one sweep per option (the token control joint_mlp among
    # the fusions, the pixel control on its cache), each validating over every view of each val video;
    # the chosen lr is the one lr_grid.md marks.
    grid_runs = sorted((out / "grid" / "path_shape" / "mean").glob("*/*_*"))
    assert {p.parent.name for p in grid_runs} == {"fusions", "pixels+joint_mlp"}
    grid = [yaml.safe_load((p / "config.yaml").read_text()) for p in grid_runs]
    option = [fusion_option(load_run(p)) for p in grid_runs]
    options = ("none", "square", "joint_mlp", "pixels+joint_mlp")
    points = sorted((o, c["optim"]["lr"]) for o, c in zip(option, grid, strict=True))
    assert points == sorted((option, lr) for option in options for lr in (0.001, 0.01))
    assert {c["trainer"]["seed"] for c in grid} == {0} and {c["dataset"]["name"] for c in grid} == {"tokens"}
    roots = {o: c["dataset"]["root"] for o, c in zip(option, grid, strict=True)}
    assert roots["pixels+joint_mlp"] == str(out / "cache_pixels" / "path_shape")
    assert roots["square"] == roots["joint_mlp"] == str(out / "cache" / "path_shape")
    # Every run of every option: until val stops improving (the user's trainer.epochs=1 wins over the cap).
    assert {(c["trainer"]["patience"], c["trainer"]["epochs"], c["head"]["_target_"]) for c in grid} == {
        (3, 1, "squarefuse.models.heads.MeanHead")
    }
    for run in grid_runs:  # val over all of each video's cached views: the number that picks best.pt and the lr
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert {r["views"] for r in records if r.get("split") == "val_clip"} == {"2x3"}, run
        assert not list(run.glob("eval/*_val"))  # no second reading of val
    assert len(list((out / "logs").glob("grid_path_shape_mean_*.log"))) == 2
    lr_grid = (out / "report" / "lr_grid.md").read_text()
    chosen = {
        line.split("|")[2].strip(): float(line.split("|")[3]) for line in lr_grid.splitlines() if "| yes |" in line
    }
    assert set(chosen) == {"none", "square", "joint_mlp", "pixels+joint_mlp"}
    # 3. The final runs: the other seeds at the chosen lr, each best.pt evaluated on test (twin confusion too).
    for fusion, lr in chosen.items():
        runs = sorted((out / "final" / "path_shape" / "mean" / fusion).glob("*_*"))
        configs = [yaml.safe_load((r / ".hydra" / "config.yaml").read_text()) for r in runs]
        assert sorted(c["trainer"]["seed"] for c in configs) == [1, 2]
        assert {c["optim"]["lr"] for c in configs} == {lr}
        for run in runs:
            (result,) = [json.loads(p.read_text()) for p in run.glob("eval/*_test/results.json")]
            assert result["split"] == "test" and result["num_videos"] == 6
            assert "twin_confusion" in result
    # 4. The verdict, each task marked informative or not by its token control, and the wall time of every phase.
    matrix = (out / "report" / "matrix.md").read_text()
    assert "| none | square | joint_mlp | pixels+joint_mlp | informative |" in matrix
    assert "| path_shape |" in matrix and "token control" in matrix
    assert (out / "report" / "temporal_matrix.png").is_file()
    wall = json.loads((out / "benchmark.json").read_text())["wall_s"]
    assert {"path_shape: caches", "path_shape: done after", "test evaluations", "total"} == set(wall)
    budget = (out / "report" / "budget.md").read_text()
    assert "within 96 optimiser steps" in budget and "| path_shape | square |" in budget
    assert (out / "report" / "budget_path_shape.png").is_file()


@pytest.mark.slow
def test_the_static_backbone_is_trained_on_the_shape_task_and_every_task_is_cached_with_it(tmp_path):
    out, data = tmp_path / "bench", tmp_path / "data"
    args = [str(out), "--backbone", "static", "--static-epochs", "1", "--tasks", "path_shape", "--fusions", "none"]
    args += ["--no-controls", "--lrs", "1e-3", "--seeds", "1", "--grid-seeds", "0", "--heads", "mean"]
    args += ["--data-dir", str(data), "--data", "dataset.generate.train_per_class=4"]
    args += ["dataset.generate.val_per_class=2", "dataset.generate.test_per_class=2"]
    args += ["--", "trainer.epochs=1", "trainer.val_every=1", "trainer.batch_size=4"]
    done = run_script("scripts/temporal_benchmark.py", *args, cwd=REPO, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # The backbone: one train.py run of the default recipe on the static task, its --static-epochs.
    backbone = out / "backbone_static"
    config = yaml.safe_load((backbone / ".hydra" / "config.yaml").read_text())
    assert config["dataset"]["task"] == "shape" and config["dataset"]["root"] == str(data / "shape")
    assert config["trainer"]["epochs"] == 1
    best = backbone / "checkpoints" / "best.pt"
    assert best.is_file()
    # Every task cached with that checkpoint's backbone, on the task's own videos and labels.
    cache = json.loads((out / "cache" / "path_shape" / "cache.json").read_text())
    assert cache["checkpoint"] == str(best) and cache["train_config"] is None
    assert cache["task"] == "path_shape" and cache["class_names"] == ["out_and_back", "back_and_out"]
    assert cache["weights"] != "initial"
    index = json.loads((out / "cache" / "path_shape" / "train" / "index.json").read_text())
    assert sorted(v["label"] for v in index["videos"]) == [0] * 4 + [1] * 4
    # The runs after it as with the never-trained backbone; benchmark.json says which backbone.
    assert len(list((out / "final" / "path_shape" / "mean" / "none").glob("*/eval/*_test/results.json"))) == 1
    bench = json.loads((out / "benchmark.json").read_text())
    assert bench["backbone"] == "static" and bench["checkpoint"] == str(best)
    assert "static backbone" in bench["wall_s"]


@pytest.mark.slow
def test_a_failed_sweep_stops_the_benchmark_naming_its_log(tmp_path):
    out = tmp_path / "bench"
    args = [str(out), "--tasks", "path_shape", "--fusions", "none", "--no-controls", "--lrs", "1e-3"]
    args += ["--seeds", "1", "--grid-seeds", "0", "--heads", "mean", "--data-dir", str(tmp_path / "data")]
    args += ["--data", "dataset.generate.train_per_class=2", "dataset.generate.val_per_class=1"]
    args += ["dataset.generate.test_per_class=1", "--", "trainer.batch_size=0"]
    done = run_script("scripts/temporal_benchmark.py", *args, cwd=REPO, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    log = out / "logs" / "grid_path_shape_mean_fusions.log"
    assert f"the sweep {out / 'grid' / 'path_shape' / 'mean' / 'fusions'} failed" in done.stderr
    assert str(log) in done.stderr and "trainer.batch_size must be >= 1" in done.stderr
    assert not (out / "final").exists()  # nothing after the grid started
