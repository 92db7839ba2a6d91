"""Checkpoint files on bad disks: a flipped bit is found and named, a full disk is named as such (and
the previous file stays), temporary files of killed writers are found, an unwritable folder is named.
Checkpoints from elsewhere: their stored config is never resolved, builds only squarefuse models, and
the files it names are never echoed."""

from __future__ import annotations

import errno
import json
import os
import tempfile

import numpy as np
import pytest
import torch
from helpers.checkpoints import (
    LABELS,
    eval_cfg,
    flip_bit,
    make_checkpoint,
    make_list_dataset,
    tiny_train_cfg,
    unwritable,
)
from helpers.scripts import run_script

import squarefuse.runtime.atomic_file as atomic_file
from squarefuse.api import load_model
from squarefuse.apps.evaluate import run_eval
from squarefuse.apps.export import export_model
from squarefuse.checkpoint import check_model_targets, load_checkpoint, save_checkpoint, verify_checkpoint
from squarefuse.datasets.annotations import load_list, load_ssv2, read_k400_csv, read_label_map
from squarefuse.datasets.synthetic.encoding import write_video
from squarefuse.models import build_classifier
from squarefuse.runtime.atomic_file import atomic_write, check_writable, remove_stale_temp_files
from squarefuse.training.init_from import init_from, read_init_weights


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint({"model": {"w": torch.arange(64.0)}, "step": 3}, tmp_path / "last.pt")


# ------------------------------------------------------------------------------- integrity


def test_a_flipped_bit_is_named_with_the_file_and_the_member(checkpoint):
    member = flip_bit(checkpoint)
    # What made this check necessary: torch.load returns the wrong weight without a word.
    assert not torch.equal(torch.load(checkpoint, weights_only=True)["model"]["w"], torch.arange(64.0))
    for read in (verify_checkpoint, load_checkpoint):
        with pytest.raises(ValueError) as error:
            read(checkpoint)
        assert f"checkpoint {checkpoint} is damaged: member {member!r}" in str(error.value)
    with pytest.raises(ValueError, match=f"{checkpoint} is damaged: member {member!r}"):
        read_init_weights(checkpoint)  # trainer.init_from reads it too


def test_eval_and_predict_refuse_a_flipped_bit_before_making_anything(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", tiny_train_cfg(tmp_path / "data"))
    member = flip_bit(ckpt, "data/3")  # another tensor than the first
    with pytest.raises(ValueError, match=f"{ckpt} is damaged: member {member!r}"):
        load_model(ckpt)  # predict.py, extract.py, export.py
    with pytest.raises(ValueError, match=f"{ckpt} is damaged: member {member!r}"):
        run_eval(eval_cfg(ckpt), tmp_path / "eval_out")
    assert not (tmp_path / "eval_out").exists()


def test_intact_checkpoints_pass_also_without_stored_crcs(checkpoint, tmp_path):
    assert verify_checkpoint(checkpoint) == checkpoint
    assert load_checkpoint(checkpoint)["step"] == 3
    no_crc = tmp_path / "no_crc.pt"
    torch.serialization.set_crc32_options(False)  # other tools may save so: every CRC-32 stored as 0
    try:
        torch.save({"model": {"w": torch.arange(64.0)}}, no_crc)
    finally:
        torch.serialization.set_crc32_options(True)
    assert verify_checkpoint(no_crc) == no_crc


# ------------------------------------------------------------------------------- full disk


def _torch_full_disk_error():
    """What torch.save raises when the disk fills up: a RuntimeError raised while handling the OSError."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904


def test_full_disk_names_the_file_and_keeps_the_previous_one(checkpoint, monkeypatch):
    before = checkpoint.read_bytes()

    def full_disk_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 part of a checkpoint")
        _torch_full_disk_error()

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(OSError) as error:
        save_checkpoint({"model": {}}, checkpoint)
    assert error.value.errno == errno.ENOSPC
    message = str(error.value)
    assert f"no space left on device while writing {checkpoint}" in message
    assert f"the previous {checkpoint} is untouched" in message
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.pt"]  # no temporary file left


def test_short_write_without_errno_on_a_full_disk_is_named_too(tmp_path, monkeypatch):
    # numpy (extract's features.npy) reports a full disk as a short write, with no errno at all.
    path = tmp_path / "features.npy"
    monkeypatch.setattr(atomic_file, "_free_bytes", lambda folder: 0)
    with pytest.raises(OSError, match=f"no space left on device while writing {path}.*{path} was not written"):
        with atomic_write(path, "wb"):
            raise OSError("3072 requested and 992 written")
    # With space left, the same error is not blamed on the disk.
    monkeypatch.setattr(atomic_file, "_free_bytes", lambda folder: 10 << 30)
    with pytest.raises(OSError, match="^3072 requested and 992 written$"):
        with atomic_write(path, "wb"):
            raise OSError("3072 requested and 992 written")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ temporary files


def test_only_the_atomic_writers_temporary_files_are_removed(tmp_path):
    ours = []
    for name in ("last.pt", "last.pt", "best.pt", "metrics.jsonl"):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=tmp_path)  # as atomic_write names them
        os.close(fd)
        ours.append(tmp)
    others = ["last.pt", "notes.tmp", ".last.pt.tmp", ".last.pt.toolong123.tmp", "x.last.pt.abcdefgh.tmp"]
    for name in others:
        (tmp_path / name).write_text("keep")
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()
    removed = remove_stale_temp_files(tmp_path)
    assert sorted(map(str, removed)) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, ".dir.abcdefgh.tmp"])


# ----------------------------------------------------------------------------- writability


def test_unwritable_folder_is_named(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    check_writable(folder, "the checkpoints")  # writable: nothing left behind
    assert list(folder.iterdir()) == []
    check_writable(folder / "not_yet", "the checkpoints")  # not made yet: its parent decides
    assert not (folder / "not_yet").exists()
    with unwritable(folder):
        with pytest.raises(
            PermissionError, match=f"cannot write to {folder} .*, where the checkpoints will be written"
        ):
            check_writable(folder, "the checkpoints")


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, expected):
    """mkstemp makes 0600 files and the rename keeps the mode: colleagues must be able to read a run."""

    class MeanLogits(torch.nn.Module):
        def forward(self, video, mask=None):
            return video.mean(dim=(1, 2, 3, 4))[:, None].repeat(1, 2)

    previous = os.umask(umask)
    try:
        save_checkpoint({"step": 1}, tmp_path / "best.pt")
        with atomic_write(tmp_path / "results.json") as f:
            f.write("{}")
        write_video(tmp_path / "clip.mp4", np.zeros((2, 16, 16, 3), dtype=np.uint8), fps=4, codec="libx264")
        export_model(MeanLogits(), tmp_path / "model.pt", fmt="torchscript", num_frames=2, crop_size=2)
    finally:
        os.umask(previous)
    for name in ("best.pt", "results.json", "clip.mp4", "model.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


# ------------------------------------------------------------------ untrusted stored configs

SECRET = "sk-squarefuse-test-0123456789"  # what must never be printed


@pytest.fixture(scope="module")
def list_data(tmp_path_factory):
    return make_list_dataset(tmp_path_factory.mktemp("list_data"), LABELS)


def changed_checkpoint(path, data, **blocks):
    """A trainer checkpoint whose stored config was edited afterwards: `block={key: value}` per config block."""
    ckpt, _ = make_checkpoint(path, tiny_train_cfg(data))
    state = torch.load(ckpt, weights_only=True)
    for block, values in blocks.items():
        state["config"][block] = values if "_target_" in values else {**state["config"][block], **values}
    return save_checkpoint(state, ckpt)


def secret_file(tmp_path):
    """Not an annotation file: a credentials file a checkpoint's dataset config points at."""
    path = tmp_path / "credentials"
    path.write_text(f"password={SECRET}\n")
    return str(path)


ENV = "${oc.env:SQF_TEST_SECRET}"  # resolved, the secret; "SECRET_FILE" stands for `secret_file`
# case: (script, config block, key, the value written there, what the error names)
HOSTILE = {
    "eval-env-in-val_file": ("eval.py", "dataset", "val_file", ENV, "dataset.val_file"),
    "eval-val_file-is-a-secret-file": ("eval.py", "dataset", "val_file", "SECRET_FILE", "credentials:1"),
    "predict-env-in-backbone": ("scripts/predict.py", "backbone", "name", ENV, "backbone.name"),
    "extract-val_file-is-a-secret-file": ("scripts/extract.py", "dataset", "val_file", "SECRET_FILE", "credentials:1"),
    "extract-env-in-val_file": ("scripts/extract.py", "dataset", "val_file", ENV, "dataset.val_file"),
    "export-env-in-fusion": ("scripts/export.py", "fusion", "K", ENV, "fusion.K"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_checkpoints_config_is_never_resolved_and_files_it_names_are_never_echoed(case, list_data, tmp_path):
    script, block, key, value, named = HOSTILE[case]
    value = secret_file(tmp_path) if value == "SECRET_FILE" else value
    ckpt = changed_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", list_data, **{block: {key: value}})
    args = [f"input={list_data / 'v0.mp4'}"] if "predict" in script else []
    args += ["device=cpu", "num_workers=0"] if "export" not in script else []
    done = run_script(script, f"ckpt={ckpt}", *args, cwd=tmp_path, env={"SQF_TEST_SECRET": SECRET})
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.log"))
    assert SECRET not in done.stdout + done.stderr + logs
    assert done.returncode == 2 and named in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_a_checkpoints_config_may_build_only_squarefuse_models(list_data, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    # Hydra blocklists os.remove and the like, but builtins.open(path, "w") empties any file.
    head = {"_target_": "builtins.open", "_args_": [str(victim), "w"]}
    ckpt = changed_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", list_data, head=head)
    with pytest.raises(ValueError, match=r"head\._target_='builtins.open', which is not a squarefuse model class"):
        load_model(ckpt)
    with pytest.raises(ValueError, match=r"head\._target_='builtins.open'"):
        run_eval(eval_cfg(ckpt), tmp_path / "eval_out")
    assert victim.read_text() == "keep me\n"
    # A path that starts right but reaches elsewhere through a module's imports.
    backbone = {"_target_": "squarefuse.models.backbone.torch.save", "_args_": [0, str(victim)]}
    ckpt = changed_checkpoint(tmp_path / "run2" / "checkpoints" / "best.pt", list_data, backbone=backbone)
    with pytest.raises(ValueError, match=r"backbone\._target_='squarefuse.models.backbone.torch.save'"):
        load_model(ckpt)
    assert victim.read_text() == "keep me\n"


def test_init_from_reads_only_the_weights_of_a_changed_checkpoint(list_data, tmp_path, monkeypatch):
    # trainer.init_from takes the weights and never the stored config: nothing there to resolve.
    monkeypatch.setenv("SQF_TEST_SECRET", SECRET)
    ckpt = changed_checkpoint(
        tmp_path / "run" / "checkpoints" / "best.pt", list_data, backbone={"name": "${oc.env:SQF_TEST_SECRET}"}
    )
    cfg = tiny_train_cfg(list_data)
    model = build_classifier(cfg.backbone, cfg.fusion, cfg.head, num_classes=3)
    assert init_from(model, ckpt).loaded


@pytest.mark.parametrize("reader", ["list", "kinetics_csv", "label_map", "ssv2_labels", "ssv2_entries"])
def test_annotation_errors_name_the_line_of_a_file_that_is_not_one_never_its_text(reader, tmp_path):
    path = tmp_path / "secret_file"
    if reader == "list":
        path.write_text(f"machine host login me password {SECRET}\n")  # the last field is no label
        read = lambda: load_list(list_file=path, video_dir=None, class_names=["a"])  # noqa: E731
    elif reader == "kinetics_csv":
        path.write_text(f"token,{SECRET}\n")
        read = lambda: read_k400_csv(path)  # noqa: E731
    elif reader == "label_map":
        path.write_text(f"{SECRET}\nother\n{SECRET}\n")
        read = lambda: read_label_map(path)  # noqa: E731
    elif reader == "ssv2_labels":
        path.write_text(json.dumps({"api_key": SECRET}))
        read = lambda: load_ssv2(labels_file=path, annotation_file=path, video_dir=tmp_path, video_ext="mp4")  # noqa: E731
    else:
        labels = tmp_path / "labels.json"
        labels.write_text(json.dumps({"a": "0"}))
        path.write_text(json.dumps([{"token": SECRET}]))
        read = lambda: load_ssv2(labels_file=labels, annotation_file=path, video_dir=tmp_path, video_ext="mp4")  # noqa: E731
    with pytest.raises(ValueError) as error:
        read()
    assert str(path) in str(error.value) and SECRET not in str(error.value)


@pytest.mark.parametrize("group", ["backbone", "fusion", "head"])
def test_every_model_the_configs_can_build_may_be_rebuilt_from_a_checkpoint(group):
    """A class a config group selects but `squarefuse.models` does not export would train, then be
    refused by eval, predict, extract and export (`check_model_targets`)."""
    from helpers.configs import CONFIG_DIR  # noqa: PLC0415 - the one configs/ location
    from omegaconf import OmegaConf  # noqa: PLC0415

    options = sorted((CONFIG_DIR / group).glob("*.yaml"))
    targets = {str(OmegaConf.load(p).get("_target_")) for p in options if OmegaConf.load(p).get("_target_")}
    assert targets
    for target in targets:
        check_model_targets({group: {"_target_": target}})
