"""Video datasets: annotations -> frame sampling -> decoding -> uint8 augmentation.

`build_dataset(cfg.dataset, split, views=..., report_dir=...)` is the entry point; see
`squarefuse.datasets.build` for the config keys and `squarefuse.datasets.video_dataset` for what
an item holds.

The names below are imported on first use: the decoding process (``python -m
squarefuse.datasets.decoding.server``) imports this package and must not pay for torch and
torchvision at every start.
"""

import importlib

_EXPORTS = {
    "VideoRecord": "squarefuse.datasets.annotations",
    "DATASET_NAMES": "squarefuse.datasets.build",
    "build_dataset": "squarefuse.datasets.build",
    "build_device_augment": "squarefuse.datasets.build",
    "build_gpu_decoder": "squarefuse.datasets.build",
    "DecodeError": "squarefuse.datasets.decoding.video_reader",
    "DecodeTimeout": "squarefuse.datasets.decoding.video_reader",
    "VideoReader": "squarefuse.datasets.decoding.video_reader",
    "open_video": "squarefuse.datasets.decoding.video_reader",
    "resolve_decoder": "squarefuse.datasets.decoding.video_reader",
    "VideoDataset": "squarefuse.datasets.video_dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'squarefuse.datasets' has no attribute {name!r}")
