"""The map-style video dataset: record -> sampled frames -> decoded uint8 clip(s) -> augmented.

Train items: ``{"video": uint8 [T,C,H,W] (or [R,T,C,H,W] with repeated augmentation R > 1),
"mask": bool [T] (or [R,T]), "label", "index", "num_replaced"}``. A video that cannot be decoded
is logged, skipped and replaced by the next index (up to ``max_replacements`` in a row, then an
error); ``num_replaced`` says how many were skipped for this item, ``index`` is the record used.

Eval items: ``{"video": uint8 [V,T,C,H,W], "mask": bool [V,T], "label", "index", "failed", "error"}``
with V = clips x crops views, clip-major (clip 0 crop 0, clip 0 crop 1, ...). A video that cannot be
decoded is never replaced: ``failed=True``, video zeros, mask all False, ``error`` the decoder's
message ("" when it decoded).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from squarefuse.datasets.annotations import VideoRecord
from squarefuse.datasets.decoding.video_reader import DecodeError, open_video
from squarefuse.datasets.frame_sampling import FrameSampler
from squarefuse.datasets.transforms import TrainTransform, eval_views
from squarefuse.runtime.safe_text import printable

__all__ = ["VideoDataset"]

log = logging.getLogger(__name__)


class VideoDataset(Dataset):
    """Videos of one split.

    Args:
        records: the videos (missing ones already left out).
        class_names: class id -> name.
        frame_sampler: which frames make a clip (train: one random clip; eval: test clips).
        train: train items (random, augmented, replaced on failure) or eval items.
        crop_size: output height and width.
        train_transform: the train augmentation (train only).
        eval_short_side: short side before the eval crops (eval only).
        num_crops: eval crops per clip, 1 or 3 (eval only).
        decoder: "decord", "pyav" or "torchcodec".
        fallback_decoder: decoder to retry a video with when `decoder` fails on it (None = no retry).
        decode_timeout: seconds a decoder call may take before the video counts as failed
            (decoding then runs in a guarded process); None or 0 = no guard, in-process.
        decode_short_side: scale videos whose short side is well above this while decoding
            (`squarefuse.datasets.decoding.video_reader.open_video`); None = decode as stored.
        decode_device: "cpu", or "cuda" (train only): items then hold ``path`` and
            ``frame_index`` [T] instead of ``video``, for `squarefuse.datasets.decoding.gpu`.
        repeated_aug: R, augmented copies of each decoded train clip.
        max_replacements: train: how many unreadable videos in a row may be skipped for one item.
        missing: paths left out at start-up because they did not exist.
        split: the split's name, for messages.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        *,
        class_names: Sequence[str],
        frame_sampler: FrameSampler,
        train: bool,
        crop_size: int,
        # No defaults: every value comes from the dataset config (video_dataset_options).
        train_transform: TrainTransform | None,
        eval_short_side: int,
        num_crops: int,
        decoder: str,
        fallback_decoder: str | None,
        decode_timeout: float | None,
        decode_short_side: int | None,
        decode_device: str,
        repeated_aug: int,
        max_replacements: int,
        missing: Sequence[str] = (),
        split: str = "",
    ) -> None:
        if not records:
            raise ValueError(f"split {split!r}: no videos")
        if train and train_transform is None:
            raise ValueError("a train dataset needs a train_transform")
        if repeated_aug < 1:
            raise ValueError(f"dataset.repeated_aug={repeated_aug}: must be >= 1")
        self.records = list(records)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.missing = list(missing)
        self.split = split
        self.frame_sampler, self.train = frame_sampler, train
        self.crop_size, self.train_transform = crop_size, train_transform
        self.eval_short_side, self.num_crops = eval_short_side, num_crops
        self.decoder, self.fallback_decoder = decoder, fallback_decoder
        self.decode_timeout, self.decode_short_side = decode_timeout, decode_short_side
        if decode_device != "cpu" and not train:
            raise ValueError(f"split {split!r}: decoding on {decode_device} is for train items only")
        self.decode_device = decode_device
        self.repeated_aug, self.max_replacements = repeated_aug, max_replacements
        # Paths `decoder` failed on in this process: later reads go straight to the fallback.
        self._primary_failed: set[str] = set()

    @property
    def views(self) -> tuple[int, int]:
        """(clips, crops) of each eval item; (1, 1) in train."""
        return (1, 1) if self.train else (self.frame_sampler.num_clips, self.num_crops)

    def __len__(self) -> int:
        return len(self.records)

    def _decode(
        self, path: str, rng: np.random.Generator | None, *, decode: bool = True
    ) -> tuple[torch.Tensor | None, np.ndarray, np.ndarray]:
        """Sample and decode: frames uint8 [C*T,H,W,3] (None when not `decode`), indices and mask [C,T].

        Raises:
            DecodeError: no decoder could open the video (or decode the frames).
        """
        decoders = [self.decoder]
        if self.fallback_decoder and self.fallback_decoder != self.decoder:
            decoders = decoders[1:] if path in self._primary_failed else decoders
            decoders.append(self.fallback_decoder)
        errors = []
        for decoder in decoders:
            try:
                with open_video(path, decoder, timeout=self.decode_timeout, short_side=self.decode_short_side) as video:
                    index_CT, mask_CT = self.frame_sampler(video.num_frames, rng)
                    frames = video.get_frames(index_CT.reshape(-1)) if decode else None
            except DecodeError as e:
                errors.append(f"{decoder}: {e}")
                if decoder == self.decoder:
                    self._primary_failed.add(path)
                continue
            if errors:
                log.warning(
                    printable(f"decoded {path} with {decoder} after {'; '.join(errors)}")
                )  # one line, whatever the name
            return frames, index_CT, mask_CT
        raise DecodeError("; ".join(errors))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._train_item(index) if self.train else self._eval_item(index)

    def _train_item(self, index: int) -> dict[str, Any]:
        # Draw from torch's generator, which the DataLoader seeds per worker and per epoch.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        errors = []
        for attempt in range(self.max_replacements + 1):
            i = (index + attempt) % len(self.records)
            record = self.records[i]
            try:
                frames_THWC, index_CT, mask_CT = self._decode(record.path, rng, decode=self.decode_device == "cpu")
            except DecodeError as e:
                log.warning(printable(f"train video {i} could not be decoded and is replaced by the next one: {e}"))
                errors.append(str(e))
                continue
            if frames_THWC is None:  # decoded on the GPU in the training process (decoding/gpu.py)
                return {
                    "path": record.path,
                    "frame_index": torch.from_numpy(index_CT[0]),
                    "mask": torch.from_numpy(mask_CT[0]),
                    "label": record.label,
                    "index": i,
                    "num_replaced": attempt,
                }
            video_TCHW = frames_THWC.permute(0, 3, 1, 2)  # a view: channels-last memory resizes fastest
            if self.repeated_aug == 1:
                video, mask = self.train_transform(video_TCHW), torch.from_numpy(mask_CT[0])
            else:
                video = torch.stack([self.train_transform(video_TCHW) for _ in range(self.repeated_aug)])
                mask = torch.from_numpy(mask_CT[0]).expand(self.repeated_aug, -1).clone()
            return {
                # No .contiguous(): the collate's stack copies every clip into the batch anyway.
                "video": video,
                "mask": mask,
                "label": record.label,
                "index": i,
                "num_replaced": attempt,
            }
        raise RuntimeError(
            f"split {self.split!r}: {len(errors)} videos in a row from index {index} could not be decoded "
            f"(dataset.max_replacements={self.max_replacements}); is the data readable? Last error: {errors[-1]}"
        )

    def _eval_item(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        clips, crops = self.views
        try:
            frames_NHWC, _, mask_CT = self._decode(record.path, None)
        except DecodeError as e:
            log.warning(printable(f"eval video {index} could not be decoded and counts as failed: {e}"))
            T = self.frame_sampler.num_frames
            return {
                "video": torch.zeros(clips * crops, T, 3, self.crop_size, self.crop_size, dtype=torch.uint8),
                "mask": torch.zeros(clips * crops, T, dtype=torch.bool),
                "label": record.label,
                "index": index,
                "failed": True,
                "error": str(e),
            }
        T = mask_CT.shape[1]
        # All clips' frames are resized in one call, then cut into crops.
        views_KNCHW = eval_views(
            frames_NHWC.permute(0, 3, 1, 2),
            short_side=self.eval_short_side,
            crop_size=self.crop_size,
            num_crops=crops,
        )
        views = views_KNCHW.unflatten(1, (clips, T)).transpose(0, 1)  # [clips, crops, T, C, H, W]
        mask_CKT = torch.from_numpy(mask_CT)[:, None, :].expand(clips, crops, T)
        return {
            "video": views.reshape(clips * crops, *views.shape[2:]).contiguous(),
            "mask": mask_CKT.reshape(clips * crops, T).clone(),
            "label": record.label,
            "index": index,
            "failed": False,
            "error": "",
        }
