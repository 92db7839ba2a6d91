"""Decode train clips on the GPU (torchcodec's NVDEC) in the training process: ``dataset.decode_device=cuda``.

CUDA cannot be used in forked DataLoader workers, so with GPU decoding the workers only sample:
a train item holds the video's path and the frame indices the sampler chose (the frame count
comes from the CPU decoder, so indices mean what they mean with CPU decoding). `GpuClipDecoder`
then decodes the batch's clips on a few threads of the training process with
``torchcodec.decoders.VideoDecoder(device="cuda")``, scales large videos as decode-time resize
does on the CPU (`backends.decode_size`, here with an antialiased resize on the GPU), and
runs the dataset's spatial train transform on the GPU per clip; the device-side photometric
augmentation, normalisation and MixUp follow as with CPU decoding. Validation and `eval.py`
decode on the CPU.

A clip that fails on the GPU is decoded on the CPU with the dataset's decoder; a clip that fails
there too is replaced by another clip of the same batch and counted in ``num_replaced``.

Never the default; without CUDA or torchcodec `check_decode_device` stops the run at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from squarefuse.datasets.decoding.backends import decode_size
from squarefuse.datasets.decoding.video_reader import TORCHCODEC_INSTALL, DecodeError, open_video, torchcodec_problem

__all__ = ["DECODE_DEVICES", "GpuClipDecoder", "check_decode_device"]

log = logging.getLogger(__name__)

DECODE_DEVICES = ("cpu", "cuda")


def check_decode_device(decode_device: str) -> str:
    """Check ``dataset.decode_device`` at start-up.

    Raises:
        ValueError: unknown value; "cuda" without a CUDA device or without a loadable torchcodec.
    """
    if decode_device not in DECODE_DEVICES:
        raise ValueError(f"dataset.decode_device={decode_device!r}: choose one of {list(DECODE_DEVICES)}")
    if decode_device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "dataset.decode_device=cuda decodes with the GPU's NVDEC, but no CUDA device is available "
                "(torch.cuda.is_available() is False): use dataset.decode_device=cpu"
            )
        problem = torchcodec_problem()
        if problem is not None:
            raise ValueError(f"dataset.decode_device=cuda needs torchcodec: {problem}. Install {TORCHCODEC_INSTALL}")
    return decode_device


class GpuClipDecoder:
    """Decode and spatially augment a batch of sampled clips on `device`.

    Args:
        device: where to decode ("cuda"; "cpu" runs the same code with torchcodec's CPU decoder,
            which is what the CPU tests check).
        transform: the per-clip spatial train transform (uint8 [T,C,H,W] -> [T,C,crop,crop]),
            applied `repeated_aug` times per decoded clip.
        short_side: scale frames whose short side is well above this (None = as stored).
        cpu_decoder: the decoder a clip is retried with on the CPU when GPU decoding fails.
        decode_timeout: the CPU retry's guard (see `open_video`).
        repeated_aug: augmented copies per decoded clip (output [B,R,T,C,H,W] when > 1).
        num_threads: clips decoded at once.
    """

    def __init__(
        self,
        *,
        device: torch.device | str,
        transform: Callable[[torch.Tensor], torch.Tensor],
        short_side: int | None,
        cpu_decoder: str,
        decode_timeout: float | None,
        repeated_aug: int = 1,
        num_threads: int = 4,
    ) -> None:
        self.device = torch.device(device)
        self.transform = transform
        self.short_side = short_side
        self.cpu_decoder, self.decode_timeout = cpu_decoder, decode_timeout
        self.repeated_aug = repeated_aug
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="gpu-decode")

    def _decode_on_device(self, path: str, index_T: torch.Tensor) -> torch.Tensor:
        from torchcodec.decoders import VideoDecoder  # noqa: PLC0415 - optional dependency

        decoder = VideoDecoder(path, device=self.device, seek_mode="exact", dimension_order="NCHW")
        last = int(decoder.metadata.num_frames) - 1
        return decoder.get_frames_at(index_T.clamp(0, last).tolist()).data

    def _decode_on_cpu(self, path: str, index_T: torch.Tensor) -> torch.Tensor:
        with open_video(path, self.cpu_decoder, timeout=self.decode_timeout) as video:
            frames_THWC = video.get_frames(index_T.tolist())
        return frames_THWC.permute(0, 3, 1, 2).to(self.device, non_blocking=True)

    def decode(self, path: str, index_T: torch.Tensor) -> torch.Tensor:
        """uint8 [T,C,H,W] on the device, scaled like decode-time resize; DecodeError when it fails."""
        try:
            video = self._decode_on_device(path, index_T)
        except Exception as e:  # noqa: BLE001 - NVDEC/FFmpeg raise anything; retry on the CPU
            log.warning(f"{path}: decoding on {self.device} failed ({type(e).__name__}: {e}); decoding on the CPU")
            video = self._decode_on_cpu(path, index_T)
        size = decode_size(video.shape[-2], video.shape[-1], self.short_side)
        if size is not None:
            video = F.resize(tv_tensors.Video(video), list(size), antialias=True).as_subclass(torch.Tensor)
        return video

    def _augment(self, video_TCHW: torch.Tensor) -> torch.Tensor:
        if self.repeated_aug == 1:
            return self.transform(video_TCHW)
        return torch.stack([self.transform(video_TCHW) for _ in range(self.repeated_aug)])

    def __call__(self, paths: Sequence[str], index_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Decode and augment a batch.

        Args:
            paths: the B videos.
            index_BT: their frame indices (int64 [B,T]).

        Returns:
            (uint8 video [B,T,C,H,W] or [B,R,T,C,H,W] on the device, number of clips replaced).
        """

        def one(b: int) -> torch.Tensor | None:
            try:
                return self.decode(paths[b], index_BT[b])
            except DecodeError as e:
                log.warning(f"train video {paths[b]} could not be decoded and is replaced within its batch: {e}")
                return None

        decoded = list(self._pool.map(one, range(len(paths))))
        # Augmented here, in batch order: the random crops come from this process's torch RNG in
        # a fixed order (reproducible and part of the resumable state), never from racing threads.
        clips = [self._augment(video) if video is not None else None for video in decoded]
        good = [clip for clip in clips if clip is not None]
        if not good:
            raise DecodeError(f"no video of the batch could be decoded, e.g. {paths[0]}")
        replaced = len(clips) - len(good)
        clips = [clip if clip is not None else good[i % len(good)] for i, clip in enumerate(clips)]
        return torch.stack(clips), replaced

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
