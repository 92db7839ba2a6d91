"""Export: ONNX (checked with onnxruntime) and TorchScript parity, frozen directions, what fails."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime
import pytest
import torch
from helpers.checkpoints import CLASS_NAMES, compose_config, make_checkpoint
from helpers.scripts import run_script
from helpers.videos import write_video

import squarefuse
import squarefuse.apps.export as export_app
from squarefuse.apps.export import export_model
from squarefuse.models import SQuaReFuse

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_ckpt(tmp_path_factory) -> Path:
    """The default model of `python train.py`: tiny ViT (64 px, 4 blocks), fusion=square, head=mean."""
    cfg = compose_config("train", [])
    assert cfg.backbone.name == "vit_tiny_patch16_224" and cfg.fusion._target_.endswith("square_fuse")
    assert cfg.head._target_.endswith("MeanHead")
    path, _ = make_checkpoint(tmp_path_factory.mktemp("export_run") / "checkpoints" / "best.pt", cfg)
    return path


@pytest.fixture(scope="module")
def loaded(default_ckpt):
    return squarefuse.load_model(default_ckpt)


def random_clips(batch_size: int, loaded, seed: int) -> torch.Tensor:
    size = loaded.preprocess.crop_size
    return torch.randn(
        batch_size, loaded.preprocess.num_frames, 3, size, size, generator=torch.Generator().manual_seed(seed)
    )


def test_freeze_directions_fixes_u_without_changing_the_state_dict():
    torch.manual_seed(0)
    fusion = SQuaReFuse(d_model=16, num_dirs=4)
    keys = set(fusion.state_dict())
    x = torch.randn(2, 5, 3, 16)
    before, _ = fusion(x)
    fusion.freeze_directions()
    assert set(fusion.state_dict()) == keys  # a seed checkpoint still loads with strict=True
    frozen, _ = fusion(x)
    torch.testing.assert_close(frozen, before)
    with torch.no_grad():
        fusion.proj.weight.add_(1.0)
    torch.testing.assert_close(fusion(x)[0], before)  # the frozen U, not a QR of the new weight
    fusion.freeze_directions(False)
    assert not torch.allclose(fusion(x)[0], before)


def test_onnx_export_of_the_default_model_matches_pytorch(loaded, tmp_path):
    path = tmp_path / "model.onnx"
    worst = export_model(
        loaded.model, path, fmt="onnx", num_frames=loaded.preprocess.num_frames, crop_size=loaded.preprocess.crop_size
    )
    assert worst <= 1e-4
    assert loaded.model.fusion.frozen_directions is None  # the caller's model is left as it was
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert "TopK" in ops or "Sort" in ops  # the soft quantiles' sort is in the graph...
    assert "ATen" not in ops  # every op is a standard ONNX op (there is no ONNX QR)...
    # ...because U is a constant of the graph, computed once at export.
    u = loaded.model.fusion.directions().detach().numpy()
    constants = [onnx.numpy_helper.to_array(t) for t in graph.initializer]
    constants += [onnx.numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute]
    assert any(c.shape == u.shape and np.allclose(c, u, atol=1e-6) for c in constants)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["video"]
    for seed, batch_size in enumerate((1, 4)):  # a dynamic batch
        clips = random_clips(batch_size, loaded, seed)
        (logits,) = session.run(["logits"], {"video": clips.numpy()})
        with torch.no_grad():
            expected = loaded.model(clips)
        assert logits.shape == (batch_size, len(CLASS_NAMES))
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_torchscript_export_matches_pytorch_with_and_without_mask(loaded, tmp_path):
    T = loaded.preprocess.num_frames
    for mask in (False, True):
        path = tmp_path / f"model_{mask}.pt"
        export_model(
            loaded.model, path, fmt="torchscript", num_frames=T, crop_size=loaded.preprocess.crop_size, mask=mask
        )
        traced = torch.jit.load(str(path))
        assert "linalg_qr" not in str(traced.inlined_graph)
        clips = random_clips(3, loaded, seed=7)
        valid = torch.ones(3, T, dtype=torch.bool)
        valid[1, T // 2 :] = False  # a padded short clip
        inputs = (clips, valid) if mask else (clips,)
        with torch.no_grad():
            got, expected = traced(*inputs), loaded.model(clips, valid if mask else None)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_what_does_not_export_fails_clearly(loaded, tmp_path):
    shape = dict(num_frames=loaded.preprocess.num_frames, crop_size=loaded.preprocess.crop_size)
    with pytest.raises(RuntimeError, match="masked path does not export to ONNX"):
        export_model(loaded.model, tmp_path / "masked.onnx", fmt="onnx", mask=True, **shape)
    assert list(tmp_path.iterdir()) == []  # no file, not even a temporary one
    with pytest.raises(ValueError, match="format='tflite'"):
        export_model(loaded.model, tmp_path / "m.tflite", fmt="tflite", **shape)


def test_missing_onnx_packages_name_the_extra_before_anything_is_read(default_ckpt, tmp_path, monkeypatch):
    real_import = importlib.import_module

    def without_onnxruntime(name, *args):
        if name == "onnxruntime":
            raise ModuleNotFoundError("No module named 'onnxruntime'")
        return real_import(name, *args)

    monkeypatch.setattr(export_app.importlib, "import_module", without_onnxruntime)
    cfg = compose_config("export", [f"ckpt={tmp_path / 'not_read.pt'}", "format=onnx"])
    with pytest.raises(ImportError, match=r'onnxruntime is not installed.*pip install -e "\.\[export\]"'):
        export_app.run_export(cfg, tmp_path / "out")  # the checkpoint does not exist: never reached
    assert not (tmp_path / "out").exists()
    export_app.check_export_packages("torchscript")  # needs nothing more


def test_export_script_onnx_classifies_a_real_clip_like_pytorch(default_ckpt, loaded, tmp_path):
    done = run_script("scripts/export.py", f"ckpt={default_ckpt}", "format=onnx", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    (out,) = (default_ckpt.parent.parent / "export").glob("*/export.json")  # <run>/export/<stamp>
    info = json.loads(out.read_text())
    assert info["class_names"] == CLASS_NAMES and info["max_abs_diff"] <= 1e-4 and info["weights"] == "ema"
    T, S = loaded.preprocess.num_frames, loaded.preprocess.crop_size
    assert info["inputs"] == [{"name": "video", "dtype": "float32", "shape": ["batch", T, 3, S, S]}]
    # A real video, prepared as export.json says (the eval views, normalised): the same logits.
    video = write_video(tmp_path / "clip.mp4", num_frames=20, width=96, height=72)
    views, _ = loaded.preprocess(video)
    session = onnxruntime.InferenceSession(str(out.parent / info["file"]), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"video": views.numpy()})
    with torch.no_grad():
        expected = loaded.model(views)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)


def test_attentive_head_exports_to_onnx_and_to_torchscript_with_a_mask(tmp_path):
    cfg = compose_config("train", ["head=attentive", "head.pos_embed=space_time", "fusion=temporal_attn"])
    path, _ = make_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", cfg)
    loaded = squarefuse.load_model(path)
    shape = dict(num_frames=loaded.preprocess.num_frames, crop_size=loaded.preprocess.crop_size)
    # export_model checks the file against PyTorch (batches of 1 and 3; random padding with a mask).
    assert export_model(loaded.model, tmp_path / "model.onnx", fmt="onnx", **shape) <= 1e-4
    ops = {node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert "Softmax" in ops and "ATen" not in ops  # the probe's attention, in standard ops
    assert export_model(loaded.model, tmp_path / "model.pt", fmt="torchscript", mask=True, **shape) <= 1e-4
