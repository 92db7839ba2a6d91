"""Accuracy on named class subsets and the twin confusion, by hand and through eval.py's app."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import eval_cfg, make_checkpoint
from helpers.configs import tiny_train_config
from omegaconf import OmegaConf

from squarefuse.apps.evaluate import run_eval
from squarefuse.checkpoint import save_checkpoint
from squarefuse.datasets.synthetic import TASKS
from squarefuse.evaluation.class_subsets import (
    class_subset_metrics,
    read_class_subset,
    read_twin_pairs,
    subset_accuracy,
    twin_confusion,
)
from squarefuse.models import build_classifier

REPO = Path(__file__).resolve().parents[1]
NAMES = ["a", "b", "c", "d"]
LABELS = [0, 0, 1, 1, 2, 2, 3]
PREDS = [0, 1, 0, 1, 2, 3, 2]


def test_subset_accuracy_and_twin_confusion_by_hand():
    # Subset {a, c}: the videos labelled 0, 0, 2, 2 are predicted 0, 1, 2, 3: 2 of 4 right.
    assert subset_accuracy(LABELS, PREDS, [0, 2]) == {"top1": 50.0, "num_videos": 4}
    assert subset_accuracy(LABELS, PREDS, [3]) == {"top1": 0.0, "num_videos": 1}
    # a|b: 0->1 and 1->0 are confusions (2 of 4); c|d: 2->3 and 3->2 (2 of 3); pooled 4 of 7.
    result = twin_confusion(LABELS, PREDS, [(0, 1), (2, 3)])
    assert result["confusion"] == pytest.approx(100 * 4 / 7) and result["num_videos"] == 7
    assert [p["confusion"] for p in result["pairs"]] == pytest.approx([50.0, 100 * 2 / 3])
    # A prediction outside the pair is wrong but not a confusion with the twin.
    assert twin_confusion([0, 0], [2, 1], [(0, 1)])["confusion"] == 50.0


def test_files_are_read_with_comments_and_wrong_names_are_named(tmp_path):
    (tmp_path / "subset.txt").write_text("# a comment\nc\n\nd  # the last\n")
    (tmp_path / "twins.txt").write_text("# pairs\na | b\nc|d\n")
    assert read_class_subset(tmp_path / "subset.txt", NAMES) == [2, 3]
    assert read_twin_pairs(tmp_path / "twins.txt", NAMES) == [(0, 1), (2, 3)]
    (tmp_path / "bad.txt").write_text("a | e\n")
    with pytest.raises(ValueError, match=r"bad.txt: 'e' is not one of the 4 evaluated classes"):
        read_twin_pairs(tmp_path / "bad.txt", NAMES)
    (tmp_path / "three.txt").write_text("a | b | c\n")
    with pytest.raises(ValueError, match="not a pair"):
        read_twin_pairs(tmp_path / "three.txt", NAMES)
    metrics = class_subset_metrics(LABELS, PREDS, NAMES, subset_files=[tmp_path / "subset.txt"])
    assert metrics["class_subsets"]["subset"]["top1"] == pytest.approx(100 / 3)


def test_shipped_subset_files():

    temporal = read_class_subset(REPO / "configs/class_subsets/k400_temporal.txt", _k400_names())
    static = read_class_subset(REPO / "configs/class_subsets/k400_static.txt", _k400_names())
    assert len(set(temporal)) == len(set(static)) == 32 and not set(temporal) & set(static)
    lines = (REPO / "configs/class_subsets/ssv2_twins.txt").read_text().splitlines()
    pairs = [[n.strip() for n in line.split("|")] for line in lines if line and not line.startswith("#")]
    names = [n for pair in pairs for n in pair]
    assert len(pairs) >= 10 and len(set(names)) == len(names)
    assert read_twin_pairs(REPO / "configs/class_subsets/ssv2_twins.txt", names)


def _k400_names() -> list[str]:
    """Every name the two K400 files use (their validity against K400 is checked where they were made)."""
    names = []
    for name in ("k400_temporal.txt", "k400_static.txt"):
        text = (REPO / "configs/class_subsets" / name).read_text().splitlines()
        names += [line.strip() for line in text if line.strip() and not line.startswith("#")]
    return names


@pytest.mark.slow
def test_eval_on_the_synthetic_test_split_reports_subsets_and_twin_confusion(tmp_path):
    root = tmp_path / "syn"
    cfg = tiny_train_config(root, "dataset.task=event_time", "dataset.generate.test_per_class=3")
    torch.manual_seed(0)
    model = build_classifier(cfg.backbone, cfg.fusion, cfg.head, num_classes=3)
    state = {"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True), "step": 1}
    ckpt = save_checkpoint({**state, "class_names": list(TASKS["event_time"])}, tmp_path / "run" / "best.pt")
    (tmp_path / "subset.txt").write_text("early\nlate\n")
    out = tmp_path / "eval"
    overrides = ["split=test", f"subsets=[{tmp_path}/subset.txt]", f"twin_pairs={root}/twins.txt"]
    result = run_eval(eval_cfg(ckpt, *overrides), out)
    assert result.num_videos == 9  # 3 classes x 3 test videos

    with open(out / "predictions.csv", newline="") as f:
        rows = [(int(r["label"]), int(r["pred"]), r["path"]) for r in csv.DictReader(f)]
    assert all("/test/" in path for _, _, path in rows)
    summary = json.loads((out / "results.json").read_text())
    assert summary["split"] == "test"
    ends = [(label, pred) for label, pred, _ in rows if label in (0, 2)]  # early = 0, late = 2
    subset = summary["class_subsets"]["subset"]
    right = sum(label == pred for label, pred in ends)
    assert subset["num_videos"] == 6 and subset["top1"] == pytest.approx(100 * right / 6)
    twins = summary["twin_confusion"]
    assert twins["pairs"][0]["classes"] == ["early", "late"] and twins["num_videos"] == 6
    assert twins["confusion"] == pytest.approx(100 * sum(pred == 2 - label for label, pred in ends) / 6)


def test_a_wrong_class_name_fails_before_evaluating(tmp_path):
    cfg = tiny_train_config(tmp_path / "never_generated")
    ckpt, _ = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", cfg)
    (tmp_path / "twins.txt").write_text("push | shove\n")
    with pytest.raises(ValueError, match="'shove' is not one of the 3 evaluated classes"):
        run_eval(eval_cfg(ckpt, f"twin_pairs={tmp_path}/twins.txt"), tmp_path / "eval")
    assert not (tmp_path / "never_generated").exists()
