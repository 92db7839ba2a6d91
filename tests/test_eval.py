"""Multi-view evaluation: exact counting, failed videos, view averaging, result files, eval.py."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.checkpoints import (
    CLASS_NAMES,
    CPU,
    LABELS,
    REPO,
    eval_cfg,
    in_process_settings,
    make_checkpoint,
    make_list_dataset,
    run_evaluate,
    tiny_train_cfg,
)
from helpers.scripts import run_script
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from squarefuse.apps.evaluate import run_eval
from squarefuse.checkpoint import save_checkpoint
from squarefuse.config.dataset_overrides import merge_dataset_overrides
from squarefuse.config.output_dirs import default_eval_dir
from squarefuse.datasets import build_dataset
from squarefuse.datasets.preprocess import VideoNormalizer
from squarefuse.evaluation.evaluator import merge_shards, predict_shard, shard_indices
from squarefuse.evaluation.results import plot_confusion_matrix, write_results
from squarefuse.models import build_classifier


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_list_dataset(tmp_path_factory.mktemp("videos"), LABELS)


@pytest.fixture(scope="module")
def train_cfg(data_root):
    return tiny_train_cfg(data_root)


@pytest.fixture(scope="module")
def model(train_cfg):
    torch.manual_seed(0)
    return build_classifier(train_cfg.backbone, train_cfg.fusion, train_cfg.head, num_classes=len(CLASS_NAMES))


# --------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("num_items", [0, 1, 2, 7, 11])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_cover_every_index_once_without_padding(num_items, world_size):
    shards = [shard_indices(num_items, rank, world_size) for rank in range(world_size)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(num_items))  # no index twice, none left out, no padding
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_rank_out_of_range():
    with pytest.raises(ValueError, match="rank"):
        shard_indices(5, 2, 2)


def test_metrics_are_percent_and_match_a_hand_computation():
    labels = torch.tensor([0, 0, 1, 1])
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.1, 0.3, 0.6]])
    part = {"indices": torch.arange(4), "labels": labels, "probs": probs, "failed": []}
    result = merge_shards([part], num_items=4, views=(2, 3))
    assert result.top1 == pytest.approx(50.0)  # videos 0 and 2 right: percent, not a fraction
    assert result.topk == 3 and result.topk_acc == pytest.approx(100.0)  # 3 classes: top-3
    # Class 2 has no video but is predicted once: it is left out of the mean (0.5 + 0.5) / 2.
    assert result.mean_class_acc == pytest.approx(50.0)
    assert result.loss == pytest.approx(-np.log([0.7, 0.2, 0.6, 0.3]).mean(), rel=1e-6)
    assert result.views == (2, 3) and result.num_videos == 4 and result.num_failed == 0


def test_merge_rejects_duplicates_and_gaps():
    part = {"indices": torch.tensor([0, 1]), "labels": torch.tensor([0, 1]), "probs": torch.eye(3)[:2], "failed": []}
    with pytest.raises(AssertionError, match="exactly once"):
        merge_shards([part, part], num_items=4, views=(1, 1))  # the DistributedSampler padding bug
    with pytest.raises(AssertionError, match="exactly once"):
        merge_shards([part], num_items=3, views=(1, 1))


def test_evaluate_counts_each_video_once(model, train_cfg):
    dataset = build_dataset(train_cfg.dataset, "val")
    model.train()
    model.backbone.eval()  # a frozen backbone the trainer keeps in eval mode
    rng_state = torch.get_rng_state()
    result = run_evaluate(model, dataset)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the training run's random stream is untouched
    assert result.num_videos == len(dataset) == len(LABELS) and result.num_failed == 0
    assert result.indices.tolist() == list(range(len(LABELS)))
    assert result.labels.tolist() == LABELS
    assert torch.allclose(result.probs.sum(dim=1), torch.ones(len(LABELS)), atol=1e-5)
    assert result.views == (1, 1)
    assert model.training and not model.backbone.training  # each module's mode restored


def test_sharded_evaluation_equals_single_process(model, train_cfg):
    dataset = build_dataset(train_cfg.dataset, "val")
    settings = in_process_settings(model, batch_size=2)
    parts = [predict_shard(model, dataset, settings, shard=shard_indices(len(dataset), rank, 2)) for rank in (0, 1)]
    assert len(parts[0]["indices"]) == 4 and len(parts[1]["indices"]) == 3
    assert not set(parts[0]["indices"].tolist()) & set(parts[1]["indices"].tolist())
    sharded = merge_shards(parts, num_items=len(dataset), views=(1, 1))
    single = run_evaluate(model, dataset)
    assert sharded.num_videos == single.num_videos == len(LABELS)
    assert torch.equal(sharded.indices, single.indices)
    assert torch.allclose(sharded.probs, single.probs, atol=1e-6)
    assert sharded.top1 == single.top1


def test_multi_view_probs_are_the_mean_of_per_view_softmax(model, train_cfg):
    cfg = merge_dataset_overrides(train_cfg.dataset, {"test_clips": 2, "test_crops": 3})
    dataset = build_dataset(cfg, "val", views=True)
    item = dataset[4]
    assert item["video"].shape[:2] == (6, 4) and item["mask"].shape == (6, 4)  # V = 2 x 3
    result = run_evaluate(model, dataset)  # the views come from the dataset
    assert result.views == (2, 3) and result.num_videos == len(LABELS)
    model.eval()
    with torch.no_grad():
        video = VideoNormalizer(model.mean, model.std, CPU)(item["video"])
        expected = model(video, item["mask"]).softmax(dim=-1).mean(dim=0)
    assert torch.allclose(result.probs[4], expected, atol=1e-5)
    # A single view would not give this: the views really differ.
    assert not torch.allclose(result.probs[4], model(video[:1], item["mask"][:1]).softmax(-1)[0], atol=1e-4)
    # evaluate() is not told the views, so it cannot be told wrong ones: it reports the dataset's.
    assert dataset.views == result.views


def test_corrupt_video_is_failed_not_replaced(tmp_path, model):
    root = make_list_dataset(tmp_path / "videos", LABELS[:5], corrupt=2)
    dataset = build_dataset(tiny_train_cfg(root).dataset, "val")
    result = run_evaluate(model, dataset)
    assert result.num_failed == 1 and result.failed_indices == [2]
    assert result.num_videos == 4 and 2 not in result.indices.tolist()  # not replaced by another video
    write_results(result, tmp_path / "out", CLASS_NAMES, dataset.records, missing=dataset.missing)
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["num_failed"] == 1 and summary["num_videos"] == 4 and summary["num_missing"] == 0
    assert summary["failed_videos"][0]["path"].endswith("v2.mp4")


def test_all_videos_failing_is_an_error(tmp_path, model):
    root = make_list_dataset(tmp_path / "videos", [0], corrupt=0)
    dataset = build_dataset(tiny_train_cfg(root).dataset, "val")
    with pytest.raises(ValueError, match="none of the 1 eval videos"):
        run_evaluate(model, dataset)


# ------------------------------------------------------------------------------- result files


def test_result_files_agree_with_a_hand_computation(tmp_path, model, train_cfg):
    dataset = build_dataset(train_cfg.dataset, "val")
    result = run_evaluate(model, dataset)
    write_results(result, tmp_path, CLASS_NAMES, dataset.records, missing=["gone.mp4"], meta={"step": 7})

    summary = json.loads((tmp_path / "results.json").read_text())
    for key in ("top1", "topk_acc", "mean_class_acc", "loss", "num_videos", "num_failed", "num_missing", "views"):
        assert key in summary, key
    assert summary["views"] == {"clips": 1, "crops": 1} and summary["num_missing"] == 1 and summary["step"] == 7

    saved = torch.load(tmp_path / "probs.pt", weights_only=True)
    hand_top1 = 100.0 * (saved["probs"].argmax(1) == saved["labels"]).float().mean().item()
    assert summary["top1"] == pytest.approx(hand_top1)  # percent scale, from the saved probs
    per_class_hand = [
        100.0
        * ((saved["probs"].argmax(1) == c) & (saved["labels"] == c)).sum().item()
        / (saved["labels"] == c).sum().item()
        for c in range(len(CLASS_NAMES))
    ]
    assert summary["mean_class_acc"] == pytest.approx(np.mean(per_class_hand))

    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result.num_videos == len(LABELS)  # one row per video
    assert [int(r["index"]) for r in rows] == list(range(len(LABELS)))
    assert [int(r["pred"]) for r in rows] == saved["probs"].argmax(1).tolist()
    assert rows[3]["path"].endswith("v3.mp4") and rows[3]["label_name"] == CLASS_NAMES[LABELS[3]]
    # 3 classes: the top-k accuracy is top-3, k stated in results.json; 3 classes in each row.
    assert summary["topk"] == 3 and all(len(r["topk_ids"].split()) == len(r["topk_probs"].split()) == 3 for r in rows)

    with open(tmp_path / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [r["class"] for r in per_class] == CLASS_NAMES
    assert sum(int(r["support"]) for r in per_class) == len(LABELS)
    assert [float(r["top1"]) for r in per_class] == pytest.approx(per_class_hand, abs=0.01)
    assert all(float(r["topk_acc"]) == 100.0 for r in per_class)  # top-3 of 3 classes
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000


def test_confusion_matrix_plot_for_400_classes(tmp_path):
    confmat = torch.randint(0, 5, (400, 400))
    plot_confusion_matrix(confmat, [f"class {i}" for i in range(400)], tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 1000


def test_long_class_names_leave_the_matrix_and_its_title_in_the_figure(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: figures.append(fig))
    names = [f"Pushing something from left to right so that it almost falls off but does not {i}" for i in range(3)]
    confmat = torch.tensor([[3, 1, 0], [0, 2, 1], [1, 0, 4]])
    plot_confusion_matrix(confmat, names, tmp_path / "cm.png", conditions=["split test", "frames reversed"])
    (fig,) = figures
    fig.draw_without_rendering()  # the constrained layout, as savefig does it
    ax = fig.axes[0]
    title = ax.title.get_window_extent()
    assert fig.bbox.x0 <= title.x0 and title.x1 <= fig.bbox.x1, (title, fig.bbox)  # before: clipped at the right
    assert ax.get_window_extent().width > 0.25 * fig.bbox.width  # before: a sliver beside the names
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(set(labels)) == 3 and all(len(label) <= 40 and label.endswith(str(i)) for i, label in enumerate(labels))


def test_result_files_refuse_non_finite_values_and_results_json_is_strict_json(tmp_path):
    labels = torch.tensor([0, 1, 2])
    probs = torch.tensor([[0.7, 0.2, 0.1], [float("nan")] * 3, [0.1, 0.3, 0.6]])
    part = {"indices": torch.arange(3), "labels": labels, "probs": probs, "failed": []}
    result = merge_shards([part], num_items=3, views=(1, 1))
    with pytest.raises(ValueError, match=r"NaN or infinite probabilities for 1 videos \(dataset indices \[1\]"):
        write_results(result, tmp_path / "nan", CLASS_NAMES)
    assert not (tmp_path / "nan").exists()  # refused before anything is written

    part["probs"] = probs.nan_to_num(1 / 3)
    result = merge_shards([part], num_items=3, views=(1, 1))
    with pytest.raises(ValueError, match=r"results.json: model_info.flops is nan, which JSON cannot hold"):
        write_results(result, tmp_path / "meta", CLASS_NAMES, meta={"model_info": {"flops": float("nan")}})
    write_results(result, tmp_path / "ok", CLASS_NAMES)

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    summary = json.loads((tmp_path / "ok" / "results.json").read_text(), parse_constant=no_constants)
    assert summary["probs_sha256"] == hashlib.sha256((tmp_path / "ok" / "probs.pt").read_bytes()).hexdigest()


def test_eval_stops_on_non_finite_outputs_naming_the_videos_and_the_cause(tmp_path, data_root, train_cfg):
    ckpt, _ = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", train_cfg)
    state = torch.load(ckpt, weights_only=True)
    state["ema"] = {
        k: torch.full_like(v, float("nan")) if k.startswith("head.") else v for k, v in state["ema"].items()
    }
    save_checkpoint(state, ckpt)
    with pytest.raises(ValueError) as error:
        run_eval(eval_cfg(ckpt), tmp_path / "out")
    message = str(error.value)
    assert message.startswith(f"the model's outputs are NaN or infinite for {len(LABELS)} of {len(LABELS)} videos: ")
    assert f"{data_root}/v0.mp4 (index 0)" in message and "and 2 more" in message
    assert "They are not scored" in message and "The model's weights hold NaN or infinite values (head." in message
    assert not (tmp_path / "out" / "results.json").exists()
    assert run_eval(eval_cfg(ckpt, "use_ema=false"), tmp_path / "model").num_videos == len(LABELS)


# ------------------------------------------------------------------------------------ the app


@pytest.fixture(scope="module")
def moved_checkpoint(tmp_path_factory, data_root):
    """A checkpoint whose stored dataset.root no longer exists (the data moved since training)."""
    run = tmp_path_factory.mktemp("run")
    cfg = tiny_train_cfg(run / "old_root", f"dataset.label_map={data_root}/classes.txt")
    ckpt, _ = make_checkpoint(run / "checkpoints" / "best.pt", cfg)
    return ckpt


def test_run_eval_with_dataset_root_override(tmp_path, moved_checkpoint, data_root):
    with pytest.raises((ValueError, FileNotFoundError), match="old_root"):
        run_eval(eval_cfg(moved_checkpoint), tmp_path / "no_override")

    ema = run_eval(eval_cfg(moved_checkpoint, f"dataset.root={data_root}", "dataset.test_clips=2"), tmp_path / "ema")
    assert ema.num_videos == len(LABELS) and ema.views == (2, 1)
    summary = json.loads((tmp_path / "ema" / "results.json").read_text())
    assert summary["weights"] == "ema" and summary["step"] == 123 and summary["views"] == {"clips": 2, "crops": 1}
    assert summary["dataset_root"] == str(data_root) and summary["num_missing"] == 0
    assert summary["top1"] == pytest.approx(ema.top1)
    for name in ("per_class.csv", "predictions.csv", "probs.pt", "confusion_matrix.png"):
        assert (tmp_path / "ema" / name).is_file(), name
    assert not (tmp_path / "ema" / "missing_val.txt").exists()  # nothing is missing: no empty list

    plain = run_eval(
        eval_cfg(moved_checkpoint, f"dataset.root={data_root}", "dataset.test_clips=2", "use_ema=false"),
        tmp_path / "model",
    )
    assert json.loads((tmp_path / "model" / "results.json").read_text())["weights"] == "model"
    assert not torch.allclose(plain.probs, ema.probs)  # the other weights were really used


def test_unknown_dataset_override_is_named(tmp_path, moved_checkpoint):
    with pytest.raises(ValueError, match="no_such_key"):
        run_eval(eval_cfg(moved_checkpoint, "+dataset.no_such_key=1"), tmp_path)


def test_a_split_the_training_run_did_not_use(tmp_path, moved_checkpoint, data_root):
    (tmp_path / "test.txt").write_text("v1.mp4 1\nv2.mp4 2\n")
    overrides = [f"dataset.root={data_root}", "split=test"]
    with pytest.raises(ValueError, match="test_file"):
        run_eval(eval_cfg(moved_checkpoint, *overrides), tmp_path / "a")
    # The new split's list file may be added; any other unknown key is still refused.
    result = run_eval(eval_cfg(moved_checkpoint, *overrides, f"+dataset.test_file={tmp_path}/test.txt"), tmp_path / "b")
    assert result.num_videos == 2 and result.labels.tolist() == [1, 2]
    with pytest.raises(ValueError, match="train_fle"):
        run_eval(eval_cfg(moved_checkpoint, *overrides, "+dataset.train_fle=x"), tmp_path / "c")


def test_root_override_moves_paths_derived_from_the_old_root():
    stored = {
        "root": "/old",
        "val_file": "/old/lists/val.txt",
        "video_dir": "/old",
        "label_map": "/elsewhere/c.txt",
        "generate": {"seed": 0, "size": 80},
    }
    merged = merge_dataset_overrides(stored, {"root": "/new", "test_clips": None, "generate": {"seed": 3}})
    assert merged.val_file == "/new/lists/val.txt" and merged.video_dir == "/new"
    assert merged.label_map == "/elsewhere/c.txt"  # an explicit path outside the old root stays
    assert merged.generate == {"seed": 3, "size": 80}  # a nested override changes one key only
    with pytest.raises(ValueError, match="dataset.generate.sede"):
        merge_dataset_overrides(stored, {"generate": {"sede": 3}})


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        run_eval(eval_cfg(tmp_path / "nope.pt"), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        default_eval_dir(str(tmp_path / "nope.pt"))


def test_default_eval_dir_is_next_to_the_run(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.touch()
    out = Path(default_eval_dir(str(ckpt)))
    assert out.parent == tmp_path / "run" / "eval"


@pytest.mark.slow
def test_eval_py_end_to_end(tmp_path, moved_checkpoint, data_root):
    command = [
        sys.executable,
        str(REPO / "eval.py"),
        f"ckpt={moved_checkpoint}",
        f"dataset.root={data_root}",
        "num_workers=0",
        "device=cpu",
        "progress=false",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    outputs = list((moved_checkpoint.parent.parent / "eval").glob("*/results.json"))
    assert len(outputs) == 1  # the default run dir: <run>/eval/<timestamp>
    summary = json.loads(outputs[0].read_text())
    assert summary["num_videos"] == len(LABELS) and summary["weights"] == "ema"
    log = done.stdout + done.stderr
    assert "top-1: " in log and "top-3: 100.00%" in log and "weights: ema" in log
    assert f"videos: {len(LABELS)} evaluated, 0 failed" in log


def test_eval_py_names_a_missing_checkpoint_and_a_missing_ckpt_key(tmp_path):
    missing = tmp_path / "runs" / "typo" / "checkpoints" / "best.pt"
    done = run_script("eval.py", f"ckpt={missing}", cwd=tmp_path)
    assert done.returncode == 2 and str(missing) in done.stderr  # 2: a user mistake (README), not 1, a crash
    assert not (tmp_path / "runs").exists()  # no stray run folder for a mistyped path

    done = run_script("eval.py", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: ckpt is required")


def test_a_checkpoint_that_predates_a_dataset_key_gets_its_default(train_cfg):
    stored = OmegaConf.to_container(train_cfg.dataset, resolve=True)
    del stored["decode_short_side"], stored["decode_device"]
    merged = merge_dataset_overrides(stored, {"test_clips": 2})
    # The defaults the training config composes (synthetic.yaml keeps base.yaml's for both keys).
    composed = train_cfg.dataset
    assert merged.decode_short_side == composed.decode_short_side and merged.decode_device == composed.decode_device
    assert merged.test_clips == 2 and merged.root == stored["root"]
    build_dataset(merged, "val", views=True)  # builds, where a missing key used to be an error


def test_confusion_matrix_title_says_what_was_evaluated(tmp_path, model, train_cfg, monkeypatch):
    titles = []
    real_savefig = Figure.savefig

    def savefig(fig, *args, **kwargs):
        titles.append(fig.axes[0].get_title().replace("\n", " "))  # a long title wraps to the matrix's width
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    dataset = build_dataset(train_cfg.dataset, "val")
    result = run_evaluate(model, dataset)
    records = dataset.records
    write_results(result, tmp_path / "normal", CLASS_NAMES, records, meta={"frame_order": "normal"})
    write_results(result, tmp_path / "rev", CLASS_NAMES, records, meta={"frame_order": "reversed", "split": "test"})
    n = result.num_videos
    assert titles == [
        f"confusion matrix ({n} videos, 3 classes)",
        f"confusion matrix ({n} videos, 3 classes; split test; frames reversed)",
    ]
