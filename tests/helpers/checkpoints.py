"""Tiny list datasets, training/eval configs and checkpoints as the trainer writes them, for eval-side tests."""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from helpers.configs import compose_config
from helpers.videos import write_video
from squarefuse.checkpoint import save_checkpoint
from squarefuse.datasets.preprocess import VideoNormalizer
from squarefuse.evaluation.evaluator import evaluate
from squarefuse.evaluation.inference_loop import BatchSettings
from squarefuse.models import build_classifier
from squarefuse.runtime.launch_env import DistInfo

REPO = Path(__file__).resolve().parents[2]
CLASS_NAMES = ["push", "pull", "spin"]
LABELS = [0, 1, 2, 0, 1, 2, 0]  # 7 videos: an odd count, so 2 shards differ in length
CPU = torch.device("cpu")


def tiny_list_overrides(root: Path) -> list[str]:
    """A `list` dataset under `root` (one view per video, PyAV in-process) and a 2-block ViT at 32 px."""
    return [
        "dataset=list",
        f"dataset.root={root}",
        f"dataset.label_map={root}/classes.txt",
        "dataset.decoder=pyav",
        "dataset.decode_timeout=0",
        "dataset.test_clips=1",
        "dataset.test_crops=1",
        "backbone=tiny",
        "backbone.img_size=32",
        "backbone.model_kwargs.depth=2",
        "backbone.model_kwargs.embed_dim=48",
    ]


def tiny_train_cfg(root: Path, *extra: str):
    """The training config a checkpoint stores: list dataset under `root`, a 2-block ViT at 32 px."""
    return compose_config(
        "train",
        [*tiny_list_overrides(root), "dataset.num_frames=4", "dataset.sampling=segment", "fusion.K=4", *extra],
    )


def make_list_dataset(root: Path, labels: list[int], *, corrupt: int | None = None) -> Path:
    """Tiny H.264 videos of random noise (so every video gets its own prediction) + list files."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, label in enumerate(labels):
        name = f"v{i}.mp4"
        if i == corrupt:
            (root / name).write_text("not a video\n" * 10)
        else:
            frames = rng.integers(0, 256, size=(10, 32, 40, 3), dtype=np.uint8)
            write_video(root / name, frames=frames, fps=8)
        lines.append(f"{name} {label}\n")
    (root / "train.txt").write_text("".join(lines))
    (root / "val.txt").write_text("".join(lines))
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASS_NAMES))
    return root


def make_checkpoint(path: Path, cfg, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A checkpoint as the trainer writes it; the EMA weights differ from the model weights."""
    torch.manual_seed(seed)
    model = build_classifier(cfg.backbone, cfg.fusion, cfg.head, num_classes=len(CLASS_NAMES))
    ema = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    state = {
        "model": model.state_dict(),
        "ema": ema,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "class_names": CLASS_NAMES,
        "step": 123,
        "epoch": 4,
    }
    return save_checkpoint(state, path), model


def eval_cfg(ckpt: Path, *overrides: str):
    return compose_config("eval", [f"ckpt={ckpt}", "num_workers=0", "device=cpu", "progress=false", *overrides])


def in_process_settings(model, *, device: torch.device = CPU, batch_size: int = 3) -> BatchSettings:
    """fp32, no DataLoader workers: evaluations in the test's own process."""
    normalizer = VideoNormalizer(model.mean, model.std, device)
    return BatchSettings(device, normalizer, batch_size=batch_size, num_workers=0, precision="fp32")


def run_evaluate(model, dataset, *, device: torch.device = CPU, batch_size: int = 3):
    """`evaluate` in this process, fp32, no workers."""
    return evaluate(
        model, dataset, in_process_settings(model, device=device, batch_size=batch_size), dist_info=DistInfo()
    )


def flip_bit(path: Path, member_suffix: str = "data/0", byte: int = 17) -> str:
    """Flip one bit inside the stored bytes of the zip member ending with `member_suffix`; its name.

    What a bad disk sector or a faulty copy does: the zip structure stays valid, only the member's
    CRC-32 no longer matches. `torch.load` reads such a file without a word.
    """
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the member's bytes (torch stores them uncompressed)
    assert info.compress_type == zipfile.ZIP_STORED and byte < info.file_size
    data[start + byte] ^= 0x04
    path.write_bytes(bytes(data))
    return info.filename


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """`folder` refuses new files inside the block, as a read-only mount does; writable again after."""
    with pytest.MonkeyPatch.context() as patch:
        if os.geteuid() == 0:
            # root writes through permission bits: make the folder refuse temporary files instead.
            mkstemp = tempfile.mkstemp

            def read_only(*args, dir=None, **kwargs):
                if dir is not None and os.path.samefile(dir, folder):
                    raise PermissionError(errno.EACCES, "Permission denied")
                return mkstemp(*args, dir=dir, **kwargs)

            patch.setattr(tempfile, "mkstemp", read_only)
        else:
            folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
