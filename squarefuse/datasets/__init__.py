"""Video datasets: annotations -> frame sampling -> decoding -> uint8 augmentation.

`build_dataset(cfg.dataset, split, views=..., report_dir=...)` is the entry point; see
`squarefuse.datasets.build` for the config keys and `squarefuse.datasets.video_dataset` for what
an item holds.
"""

from squarefuse.datasets.annotations import VideoRecord
from squarefuse.datasets.build import DATASET_NAMES, build_dataset, build_device_augment
from squarefuse.datasets.video_dataset import VideoDataset
from squarefuse.datasets.video_reader import DecodeError, DecodeTimeout, VideoReader, open_video, resolve_decoder

__all__ = [
    "DATASET_NAMES",
    "DecodeError",
    "DecodeTimeout",
    "VideoDataset",
    "VideoReader",
    "VideoRecord",
    "build_dataset",
    "build_device_augment",
    "open_video",
    "resolve_decoder",
]
