"""Fine-tuning from a checkpoint or state dict (`trainer.init_from`): what is loaded, re-initialised,
missing; fresh optimiser; a run with its own last.pt resumes instead."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers.checkpoints import tiny_train_cfg
from helpers.configs import tiny_train_config
from helpers.videos import write_video

from squarefuse.checkpoint import load_checkpoint, save_checkpoint
from squarefuse.models import build_classifier
from squarefuse.models.complexity import model_complexity
from squarefuse.training.init_from import init_from, read_init_weights
from squarefuse.training.trainer import Trainer


def make_list_dataset(root: Path, num_classes: int, per_class: int = 2) -> Path:
    """Tiny noise videos, `per_class` per class, as `path label` lists with a label map."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(num_classes)
    lines = []
    for i in range(num_classes * per_class):
        name = f"v{i}.mp4"
        write_video(root / name, frames=rng.integers(0, 256, size=(8, 32, 40, 3), dtype=np.uint8), fps=8)
        lines.append(f"{name} {i % num_classes}\n")
    (root / "train.txt").write_text("".join(lines))
    (root / "val.txt").write_text("".join(lines))
    (root / "classes.txt").write_text("".join(f"class{c}\n" for c in range(num_classes)))
    return root


def list_cfg(root: Path, *extra: str):
    """The tiny list-dataset training config (helpers.checkpoints) with short, quiet CPU training."""
    return tiny_train_cfg(
        root,
        "dataset.randaug_n=0",
        "trainer.batch_size=2",
        "trainer.num_workers=0",
        "trainer.epochs=1",
        "trainer.val_every=0",
        "trainer.log_every=1",
        "trainer.device=cpu",
        "trainer.precision=fp32",
        *extra,
    )


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A 3-class model trained for 2 steps: its checkpoints/last.pt is the fine-tuning source."""
    root = make_list_dataset(tmp_path_factory.mktemp("three"), 3)
    run = tmp_path_factory.mktemp("source")
    Trainer(list_cfg(root, "trainer.max_steps=2"), run).fit()
    return run


@pytest.fixture(scope="module")
def five_classes(tmp_path_factory) -> Path:
    return make_list_dataset(tmp_path_factory.mktemp("five"), 5, per_class=1)


def test_init_from_a_checkpoint_with_another_class_count(source_run, five_classes, tmp_path, caplog, no_network):
    source = load_checkpoint(source_run / "checkpoints" / "last.pt")
    assert source["ema"] is None and source["step"] == 2
    run = tmp_path / "finetune"
    ckpt = source_run / "checkpoints" / "last.pt"
    # backbone.pretrained=true as in the recipes: the file replaces those weights, so no download is tried.
    cfg = list_cfg(five_classes, f"trainer.init_from={ckpt}", "trainer.max_steps=1", "backbone.pretrained=true")
    with caplog.at_level(logging.INFO, logger="squarefuse"):
        trainer = Trainer(cfg, run)

    weights = trainer.model.state_dict()
    head_keys = {"head.fc.weight", "head.fc.bias"}
    for key, value in weights.items():
        if key in head_keys:
            assert value.shape[0] == 5 and source["model"][key].shape[0] == 3
        else:
            torch.testing.assert_close(value, source["model"][key], rtol=0, atol=0, msg=key)
    # The head is freshly initialised as in any new model (small weights, zero bias), not copied.
    assert torch.count_nonzero(weights["head.fc.bias"]) == 0

    # Optimiser and schedule start fresh.
    assert trainer.state.step == 0 and trainer.state.epoch == 0 and not trainer.optimizer.state
    report = json.loads((run / "init_from.json").read_text())
    assert report["weights"] == "model" and report["missing"] == [] and report["unexpected"] == []
    assert {r["key"] for r in report["reinitialised"]} == head_keys
    assert sorted(report["loaded"]) == sorted(set(weights) - head_keys)
    logged = caplog.text
    assert f"loaded {len(weights) - 2} keys" in logged and "head.fc.weight (3, 48) -> (5, 48)" in logged

    # The start-up also wrote the model's size (params and FLOPs per clip) for reports.
    assert json.loads((run / "model_info.json").read_text()) == model_complexity(trainer.model, 4, 32)
    assert "GFLOPs" in logged

    trainer.fit()  # trains from there
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1

    # The same command again: the run resumes from its own last.pt, not from the source weights.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="squarefuse"):
        resumed = Trainer(cfg, run)
    assert resumed.state.step == 1 and "init_from" in caplog.text and "ignored" in caplog.text
    last = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, last[key], rtol=0, atol=0, msg=key)


def small_model(K: int = 4, num_classes: int = 3):
    cfg = list_cfg(Path("unused"), f"fusion.K={K}")
    return build_classifier(cfg.backbone, cfg.fusion, cfg.head, num_classes=num_classes)


def test_a_mismatch_outside_the_head_is_named_unless_allowed(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "k4.pth"
    torch.save(small_model(K=4).state_dict(), path)
    with pytest.raises(ValueError, match=r"fusion\.proj\.weight.*\(4, 48\).*\(2, 48\).*init_allow_mismatch"):
        init_from(small_model(K=2), path)

    target = small_model(K=2, num_classes=4)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = init_from(target, path, allow_mismatch=True)
    reinit = {r["key"] for r in report.reinitialised}
    assert "fusion.proj.weight" in reinit and "head.fc.weight" in reinit
    torch.testing.assert_close(target.state_dict()["fusion.proj.weight"], fresh["fusion.proj.weight"])
    assert "backbone.model.blocks.1.attn.qkv.weight" in report.loaded


def test_plain_state_dicts_wrapped_or_safetensors_and_missing_keys(tmp_path):
    torch.manual_seed(0)
    source = small_model(K=4)
    state = source.state_dict()
    wrapped = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    weights, name = read_init_weights(wrapped)
    assert name == "state_dict" and weights.keys() == state.keys()

    # No fusion in the file (a mean-pool baseline): the fusion stays fresh and is listed as missing.
    no_fusion = {k: v for k, v in state.items() if not k.startswith("fusion.")}
    no_fusion["extra.weight"] = torch.zeros(2)
    path = tmp_path / "baseline.safetensors"
    safetensors.torch.save_file(no_fusion, str(path))
    target = small_model(K=4)
    report = init_from(target, path)
    assert report.missing == [k for k in state if k.startswith("fusion.")] and report.missing
    assert report.unexpected == ["extra.weight"] and report.reinitialised == []
    torch.testing.assert_close(target.state_dict()["head.fc.weight"], state["head.fc.weight"], rtol=0, atol=0)

    # Without backbone weights the backbone would stay random: an error unless allowed.
    no_backbone = tmp_path / "no_backbone.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("backbone.")}, no_backbone)
    with pytest.raises(ValueError, match=r"no_backbone\.pth.*backbone keys.*backbone\.model\.cls_token"):
        init_from(small_model(K=4), no_backbone)
    assert init_from(small_model(K=4), no_backbone, allow_mismatch=True).missing[0] == "backbone.model.cls_token"


def test_ema_weights_are_preferred_and_unfitting_files_are_refused(tmp_path):
    torch.manual_seed(0)
    state = small_model().state_dict()
    ema = {k: v + 1 for k, v in state.items()}
    ckpt = save_checkpoint(
        {"model": state, "ema": ema, "config": {}, "class_names": ["a", "b", "c"]}, tmp_path / "c.pt"
    )
    target = small_model()
    assert init_from(target, ckpt).weights == "ema"
    torch.testing.assert_close(target.state_dict()["head.fc.bias"], ema["head.fc.bias"], rtol=0, atol=0)

    image_weights = tmp_path / "vit.pth"
    torch.save(small_model().backbone.model.state_dict(), image_weights)
    with pytest.raises(ValueError, match=r"vit\.pth.*none of its.*backbone\.pretrained_path"):
        init_from(small_model(), image_weights)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        init_from(small_model(), tmp_path / "nope.pt")


@pytest.fixture
def bad_init_files(tmp_path) -> list[tuple[str, Path]]:
    """Files a user may pass by mistake, each with the words its error must say."""
    torch.manual_seed(0)
    state = small_model().state_dict()
    text = tmp_path / "notes.pth"
    text.write_text("hello, this is a text file\n")
    empty = tmp_path / "empty.pt"
    empty.touch()
    video = write_video(tmp_path / "clip.mp4", num_frames=4)
    good_pt = tmp_path / "good.pt"
    torch.save(state, good_pt)
    truncated_pt = tmp_path / "cut.pt"
    truncated_pt.write_bytes(good_pt.read_bytes()[: good_pt.stat().st_size // 2])
    good_st = tmp_path / "good.safetensors"
    safetensors.torch.save_file(state, str(good_st))
    truncated_st = tmp_path / "cut.safetensors"
    truncated_st.write_bytes(good_st.read_bytes()[: good_st.stat().st_size // 2])
    return [
        ("not a PyTorch checkpoint or safetensors file", text),
        (r"is empty \(0 bytes\)", empty),
        ("not a PyTorch checkpoint or safetensors file", video),
        ("is truncated", truncated_pt),
        ("is a truncated safetensors file", truncated_st),
    ]


def test_unreadable_init_files_name_the_file_and_the_problem(bad_init_files):
    # Before: KeyError: 101 (text), "refusing a file with objects other than tensors" (mp4, as if a
    # malicious pickle), "cannot read it ()" (empty), a safetensors error naming no file (truncated).
    for message, path in bad_init_files:
        with pytest.raises(ValueError, match=message) as error:
            init_from(small_model(), path)
        assert str(path) in str(error.value) and "trainer.init_from" in str(error.value)
    good = bad_init_files[0][1].parent
    assert (
        init_from(small_model(), good / "good.pt").loaded and init_from(small_model(), good / "good.safetensors").loaded
    )


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_non_float_weights_are_refused_not_cast(tmp_path, dtype, suffix):
    torch.manual_seed(0)
    state = small_model().state_dict()
    quantised = {k: v.to(dtype) if k.startswith("backbone.model.blocks.0.") else v for k, v in state.items()}
    path = tmp_path / f"quantised{suffix}"
    if suffix == ".pt":
        torch.save(quantised, path)
    else:
        safetensors.torch.save_file(quantised, str(path))
    target = small_model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=rf"quantised{suffix}.*backbone\.model\.blocks\.0\.\S+ is {dtype}.*refused"):
        init_from(target, path)
    for key, value in target.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_a_wrong_init_file_fails_before_the_dataset_is_built(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello, this is a text file\n")
    root = tmp_path / "data"
    cfg = tiny_train_config(root, f"trainer.init_from={text}", "trainer.max_steps=1", "trainer.val_every=0")
    with pytest.raises(
        ValueError, match=r"trainer\.init_from=.*notes\.pth.* is not a PyTorch checkpoint or safetensors"
    ):
        Trainer(cfg, tmp_path / "run")
    assert not root.exists()  # the synthetic dataset was not generated first
