"""Video datasets: annotations -> frame sampling -> decoding -> uint8 augmentation.

`build_dataset(cfg.dataset, split, views=..., report_dir=...)` is the entry point; see
`squarefuse.datasets.build` for the config keys and `squarefuse.datasets.video_dataset` for what
an item holds.

annotations     annotation files (SSv2 json, Kinetics csv, "path label" lists) -> video records
formats         `dataset.name`: which keys a format reads, which reader it calls, and what the rest of
                the code asks of its data (decoded videos or not, the settings a run takes from it)
frame_sampling  which frames make a clip: segment (TSN) and dense-stride sampling
transforms      uint8 train augmentation (CPU; the photometric steps also on the device), eval views
video_dataset   `VideoDataset`: record -> sampled frames -> decoded, augmented clip(s)
token_cache     the token cache's files and `TokenDataset` (cached tokens read memory-mapped, `dataset=tokens`)
token_cache_files  a cache split's file names, checksums and integrity checks (`check_split_files`)
build           `build_dataset`: a dataset config and a split -> `VideoDataset` (or `TokenDataset`)
preprocess      `VideoNormalizer` (uint8 -> normalised on the device), `EvalPreprocess` (a file -> eval views)
inputs          `find_videos`, `parse_views`: the videos and views an app's `input=` and `views=` name
decoding/       decord, PyAV, torchcodec, NVDEC; in-process or in a guarded decoding process
synthetic/      the built-in synthetic dataset and `write_video`, the one atomic PyAV encoder

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
