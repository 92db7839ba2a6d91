"""eval.py frame_order=reversed|shuffled: valid frames reordered, padding kept, order-free models unmoved."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.checkpoints import eval_cfg, make_checkpoint, tiny_train_cfg
from helpers.configs import fusion_config
from helpers.scripts import run_script
from omegaconf import open_dict

from squarefuse.apps.evaluate import run_eval
from squarefuse.evaluation.frame_order import check_frame_order, frame_permutation, reorder_frames
from squarefuse.models import build_classifier


def train_cfg(data_root, fusion: str):
    """The tiny training config of test_eval with `fusion=square` (its default) or `fusion=none`."""
    cfg = tiny_train_cfg(data_root)  # sets fusion.K, a key fusion=none lacks: swap the whole block
    if fusion == "none":
        with open_dict(cfg):
            cfg.fusion = fusion_config("none")
    return cfg


def test_reversed_permutation_keeps_padding_at_the_end():
    mask = torch.tensor([True, True, True, False, False])
    assert frame_permutation(mask, "reversed").tolist() == [2, 1, 0, 3, 4]
    assert frame_permutation(mask, "normal").tolist() == [0, 1, 2, 3, 4]
    assert frame_permutation(torch.tensor([1, 0, 1, 1]), "reversed").tolist() == [3, 1, 2, 0]  # 0/1 mask


def test_shuffled_permutes_the_valid_frames_only_and_is_seeded():
    mask = torch.tensor([True] * 8 + [False] * 3)
    perm = frame_permutation(mask, "shuffled", torch.Generator().manual_seed(0))
    assert sorted(perm[:8].tolist()) == list(range(8)) and perm[8:].tolist() == [8, 9, 10]
    again = frame_permutation(mask, "shuffled", torch.Generator().manual_seed(0))
    other = frame_permutation(mask, "shuffled", torch.Generator().manual_seed(1))
    assert perm.tolist() == again.tolist() and perm.tolist() != other.tolist()


def test_reorder_frames_moves_the_frames_of_every_view():
    B, V, T = 2, 3, 5
    video = torch.arange(B * V * T, dtype=torch.float32).view(B, V, T, 1, 1, 1).expand(B, V, T, 3, 2, 2).clone()
    mask = torch.ones(B, V, T, dtype=torch.bool)
    mask[1, :, 3:] = False  # the second video is short: 3 frames + 2 padded
    out = reorder_frames(video, mask, "reversed", video_ids=torch.tensor([7, 8]))
    assert torch.equal(out[0], video[0].flip(1))
    assert torch.equal(out[1, :, :3], video[1, :, :3].flip(1))
    assert torch.equal(out[1, :, 3:], video[1, :, 3:])  # padding untouched
    assert reorder_frames(video, mask, "normal", video_ids=torch.tensor([7, 8])) is video


def test_shuffle_of_a_video_does_not_depend_on_its_batch():
    T = 8
    video = torch.arange(T, dtype=torch.float32).view(1, 1, T).expand(3, 2, T).clone()
    mask = torch.ones(3, 2, T, dtype=torch.bool)
    together = reorder_frames(video, mask, "shuffled", video_ids=torch.tensor([4, 5, 6]), seed=3)
    alone = reorder_frames(video[1:2], mask[1:2], "shuffled", video_ids=torch.tensor([5]), seed=3)
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[1, 0], video[1, 0])  # really shuffled
    assert not torch.equal(together[0], together[1])  # each video its own permutation
    reseeded = reorder_frames(video, mask, "shuffled", video_ids=torch.tensor([4, 5, 6]), seed=4)
    assert not torch.equal(together, reseeded)


@pytest.mark.parametrize(
    ("order", "seed", "match"),
    [("backwards", 0, "frame_order must be one of normal, reversed, shuffled"), ("shuffled", -1, "frame_order_seed")],
)
def test_bad_frame_order_is_named(order, seed, match):
    with pytest.raises(ValueError, match=match):
        check_frame_order(order, seed)


def test_run_eval_refuses_a_bad_frame_order_before_loading(tmp_path):
    # The checkpoint does not exist: the frame_order error must come first, naming the key.
    with pytest.raises(ValueError, match="frame_order"):
        run_eval(eval_cfg(tmp_path / "nope.pt", "frame_order=backwards"), tmp_path / "out")


@pytest.mark.parametrize(("fusion", "changes"), [("square", True), ("none", False)])
def test_reversal_changes_a_trend_model_and_not_mean_pooling(tmp_path, fusion, changes):
    cfg = train_cfg(tmp_path, fusion)
    torch.manual_seed(0)
    model = build_classifier(cfg.backbone, cfg.fusion, cfg.head, num_classes=3).eval()
    video = torch.randn(2, 1, 6, 3, 32, 32)
    mask = torch.ones(2, 1, 6, dtype=torch.bool)
    mask[1, :, 4:] = False
    reversed_ = reorder_frames(video, mask, "reversed", video_ids=torch.tensor([0, 1]))
    with torch.no_grad():
        logits = model(video.flatten(0, 1), mask.flatten(0, 1))
        logits_rev = model(reversed_.flatten(0, 1), mask.flatten(0, 1))
    assert torch.allclose(logits, logits_rev, atol=1e-5) is not changes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from helpers.checkpoints import LABELS, make_list_dataset  # noqa: PLC0415

    data_root = make_list_dataset(tmp_path_factory.mktemp("videos"), LABELS)
    runs = tmp_path_factory.mktemp("runs")
    return {
        fusion: make_checkpoint(runs / fusion / "checkpoints" / "best.pt", train_cfg(data_root, fusion))[0]
        for fusion in ("square", "none")
    }


@pytest.mark.parametrize(("fusion", "changes"), [("square", True), ("none", False)])
def test_run_eval_with_reversed_frames(tmp_path, checkpoints, fusion, changes):
    normal = run_eval(eval_cfg(checkpoints[fusion], "dataset.test_clips=2"), tmp_path / "normal")
    reversed_ = run_eval(
        eval_cfg(checkpoints[fusion], "dataset.test_clips=2", "frame_order=reversed"), tmp_path / "rev"
    )
    assert torch.equal(normal.indices, reversed_.indices)
    assert torch.allclose(normal.probs, reversed_.probs, atol=1e-5) is not changes
    summary = json.loads((tmp_path / "rev" / "results.json").read_text())
    assert summary["frame_order"] == "reversed" and summary["frame_order_seed"] is None
    assert json.loads((tmp_path / "normal" / "results.json").read_text())["frame_order"] == "normal"


def test_eval_py_with_shuffled_frames(tmp_path, checkpoints):
    command = [
        f"ckpt={checkpoints['square']}",
        "num_workers=0",
        "device=cpu",
        "progress=false",
        "frame_order=shuffled",
        "frame_order_seed=5",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    done = run_script("eval.py", *command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["frame_order"] == "shuffled" and summary["frame_order_seed"] == 5
    assert "frame order: shuffled" in done.stdout + done.stderr

    done = run_script("eval.py", *command[:-3], "frame_order=sideways", cwd=tmp_path)
    assert done.returncode != 0 and "frame_order must be one of" in done.stderr
