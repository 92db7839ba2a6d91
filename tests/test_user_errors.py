"""Mistakes a user makes on the command line fail fast, name the file or key, and leave nothing behind."""

from __future__ import annotations

import logging
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import make_checkpoint
from helpers.configs import as_hydra_app, tiny_train_config
from helpers.scripts import run_script

from squarefuse.apps.user_errors import user_errors
from squarefuse.checkpoint import check_checkpoint_file, load_checkpoint
from squarefuse.config.override_types import check_added_keys, check_override_types
from squarefuse.datasets.decoding.backends import describe_error
from squarefuse.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return run_script(script, *args, cwd=REPO)


@pytest.fixture
def bad_checkpoints(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, this is a text file\n")
    empty = tmp_path / "empty.pt"
    empty.touch()
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(3)}, "step": 1}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {"text": text, "empty": empty, "truncated": truncated, "good": good}


@pytest.mark.parametrize(
    "kind, message", [("text", "is not a PyTorch checkpoint"), ("empty", "is empty"), ("truncated", "is truncated")]
)
def test_unreadable_checkpoints_name_the_file_and_the_reason(bad_checkpoints, kind, message):
    path = bad_checkpoints[kind]
    for check in (check_checkpoint_file, load_checkpoint):
        with pytest.raises(ValueError, match=message) as error:
            check(path)
        assert str(path) in str(error.value)
    assert zipfile.is_zipfile(bad_checkpoints["good"])
    assert load_checkpoint(bad_checkpoints["good"])["step"] == 1


def test_eval_of_a_text_file_fails_without_making_an_eval_folder(bad_checkpoints):
    result = _run("eval.py", f"ckpt={bad_checkpoints['text']}")
    assert result.returncode == 2
    assert "is not a PyTorch checkpoint" in result.stderr and str(bad_checkpoints["text"]) in result.stderr
    assert not (bad_checkpoints["text"].parent / "eval").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.batch_size=abc", "trainer.batch_size='abc': must be an integer"),
        ("trainer.epochs=1.5", "trainer.epochs=1.5: must be an integer"),
        ("optim.lr=fast", "optim.lr='fast': must be a number"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_key(override, message):
    with as_hydra_app("train", [override]) as cfg:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_override_types(cfg, "train")


def test_values_of_the_right_type_pass():
    overrides = ["trainer.batch_size=8", "trainer.epochs=3", "optim.lr=0.01", "optim.lr=1"]
    with as_hydra_app("train", overrides) as cfg:
        check_override_types(cfg, "train")


def test_train_py_checks_the_types_before_any_work(tmp_path):
    # The wiring: train.py runs the check above before the trainer makes anything.
    result = _run("train.py", "trainer.batch_size=abc", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "trainer.batch_size='abc': must be an integer" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        # Before: an assertion without the key, in the DataLoader.
        (["trainer.prefetch_factor=0", "trainer.num_workers=1"], r"trainer\.prefetch_factor must be >= 1, got 0"),
        # Before: an IndexError in a worker.
        (["dataset.max_replacements=-1"], r"dataset\.max_replacements=-1: must be >= 0"),
        # Before: an allocator error in the FLOP counter.
        (["dataset.num_frames=100000"], r"dataset\.num_frames=100000: must be in 1\.\.1024"),
        # Before: accepted.
        (["schedule.warmup_epochs=-1"], r"schedule\.warmup_epochs must be >= 0, got -1"),
        # Before: after the synthetic data was generated (the layer checks its arguments when built).
        (["fusion.K=0"], r"fusion\.K must be an integer >= 1, got 0"),
        (["fusion.quantiles=[0.1,1.5]"], r"fusion\.quantiles levels must be numbers in \[0, 1\], got 1\.5"),
    ],
)
def test_bad_training_values_name_their_key_before_any_work(tmp_path, override, message):
    root = tmp_path / "data"
    cfg = tiny_train_config(root, "trainer.max_steps=1", "trainer.val_every=0", *override)
    with pytest.raises(ValueError, match=message):
        Trainer(cfg, tmp_path / "run")
    assert not root.exists()  # refused before the synthetic dataset is generated


def test_a_run_folder_inside_a_new_synthetic_root_is_refused_as_such(tmp_path):
    # Before: "holds files the synthetic generator did not write", not saying that they are the run's.
    root = tmp_path / "data"
    cfg = tiny_train_config(root, "trainer.max_steps=1", "trainer.val_every=0")
    with pytest.raises(ValueError, match=r"run folder .*/data/runs/x \(hydra\.run\.dir\) is inside dataset\.root="):
        Trainer(cfg, root / "runs" / "x")
    assert not (root / "manifest.json").exists() and not (root / "videos").exists()


def test_a_bad_value_is_one_line_and_leaves_no_run_folder(tmp_path):
    result = run_script("train.py", "fusion.K=0", f"dataset.root={tmp_path / 'data'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: fusion.K must be an integer >= 1, got 0"  # no traceback
    assert not (tmp_path / "data").exists()  # validated before any data is touched
    assert list((tmp_path / "runs").rglob("*")) == []  # neither runs/<date>/<time> nor runs/<date>


def test_a_bad_eval_option_leaves_no_eval_folder(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", tiny_train_config(tmp_path / "data"))
    result = _run("eval.py", f"ckpt={ckpt}", "frame_order=backwards")
    assert result.returncode == 2 and result.stderr.strip().startswith("error: frame_order must be one of")
    assert "Traceback" not in result.stderr
    assert list((tmp_path / "run" / "eval").iterdir()) == []  # before: eval/<stamp>/ with an empty log


@pytest.mark.parametrize("script", ["eval.py", "scripts/predict.py"])
@pytest.mark.parametrize("kind", ["missing", "text"])
def test_a_missing_or_non_pytorch_checkpoint_exits_2(bad_checkpoints, script, kind):
    ckpt = bad_checkpoints["text"].parent / "missing.pt" if kind == "missing" else bad_checkpoints["text"]
    result = _run(script, f"ckpt={ckpt}", *(["input=video.mp4"] if "predict" in script else []))
    assert result.returncode == 2, result.stderr  # before: 1, the code of a crash
    assert result.stderr.strip().startswith("error: ") and str(ckpt) in result.stderr


def test_a_model_key_on_the_eval_command_line_is_refused(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", tiny_train_config(tmp_path / "data"))
    for script, args in (("eval.py", []), ("scripts/predict.py", [f"input={tmp_path}"])):
        for added in ("+fusion.K=4", "+backbone.img_size=64", "+fusion=square"):
            result = _run(script, f"ckpt={ckpt}", added, *args)
            assert result.returncode == 2, (script, added, result.stderr)  # before: evaluated the stored model
            refusal = f"error: `{added}`: {Path(script).name} builds the model from the config stored in the checkpoint"
            assert refusal in result.stderr
    assert list((tmp_path / "run" / "eval").iterdir()) == [] and list((tmp_path / "run" / "predict").iterdir()) == []


def test_a_dataset_key_may_still_be_added_on_the_eval_command_line(tmp_path):
    with as_hydra_app("eval", ["ckpt=x.pt", f"+dataset.test_file={tmp_path}/test.txt", "++hydra.job.chdir=false"]):
        check_added_keys("eval", app="eval.py")
    with as_hydra_app("eval", ["ckpt=x.pt", "+trainer.epochs=3"]):
        with pytest.raises(ValueError, match=re.escape("`+trainer.epochs=3`: eval.py builds the model")):
            check_added_keys("eval", app="eval.py")


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("train.py", ["fusion=nosuch"], "error: In 'train': Could not find 'fusion/nosuch'"),
        ("train.py", ["trainer.epoch=3"], "error: Could not override 'trainer.epoch'."),
        ("eval.py", ["ckpt=x.pt", "fusion.K=4"], "error: Could not override 'fusion.K'."),
        (
            "eval.py",
            ["ckpt=x.pt", "frame_order=["],
            "error: the value of 'frame_order' holds characters of Hydra's override grammar",
        ),
    ],
)
def test_a_command_line_hydra_refuses_exits_2_with_one_error_line(tmp_path, script, args, message):
    result = run_script(script, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr  # before: 1, the code of a crash
    assert result.stderr.startswith(message) and "HYDRA_FULL_ERROR" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # Hydra made no run folder


def test_a_library_that_did_not_fit_in_memory_is_explained(tmp_path, monkeypatch, capsys):
    # What PyAV's first decode raised under `ulimit -v 3500000`: every eval video "could not be
    # decoded", and the run ended with "check dataset.root and dataset.decoder".
    message = "libavcodec-6f073685.so.62.28.103: failed to map segment from shared object"
    explained = f"ImportError: {message} (out of memory: the process's memory limit (ulimit -v"
    assert describe_error(ImportError(message)).startswith(explained)
    assert describe_error(ImportError("No module named 'av'")) == "ImportError: No module named 'av'"
    with pytest.raises(SystemExit), user_errors(tmp_path / "run"):
        raise ImportError(message)  # a late import in the app itself
    assert capsys.readouterr().err.startswith(f"error: {message} (out of memory")


def _hydra_run_dir(folder: Path) -> logging.FileHandler:
    """A run folder as Hydra leaves it before the app runs, its log file attached to the root logger."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("a: 1\n")
    handler = logging.FileHandler(folder / "train.log")
    logging.getLogger().addHandler(handler)
    return handler


def test_user_errors_remove_an_unstarted_run_folder_only(tmp_path, capsys):
    fresh = tmp_path / "runs" / "2026-12-02" / "10-00-00"
    _hydra_run_dir(fresh)
    with pytest.raises(SystemExit) as exit_info, user_errors(fresh):
        raise ValueError("fusion.K must be an integer >= 1, got 0")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: fusion.K must be an integer >= 1, got 0\n"
    assert not (tmp_path / "runs" / "2026-12-02").exists()

    resumed = tmp_path / "resumed"
    handler = _hydra_run_dir(resumed)
    (resumed / "checkpoints").mkdir()
    (resumed / "checkpoints" / "last.pt").write_bytes(b"weights")
    try:
        with pytest.raises(SystemExit), user_errors(resumed):
            raise ValueError("a changed config")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert (resumed / "checkpoints" / "last.pt").read_bytes() == b"weights"  # a run's data is never removed
    log_text = (resumed / "train.log").read_text()
    assert "Traceback" in log_text and "ValueError: a changed config" in log_text
    assert capsys.readouterr().err == "error: a changed config\n"
