"""Video model: per-frame timm backbone, temporal fusion (SQuaRe-Fuse and baselines), classification heads.

`CachedTokens` (cached_tokens.py) stands in for the backbone of a model trained on a token cache;
`PixelFrames` (pixels.py), each frame's downsampled pixels, for the temporal benchmark's pixel control.
"""

from squarefuse.models.backbone import VideoBackbone
from squarefuse.models.cached_tokens import CachedTokens
from squarefuse.models.classifier import VideoClassifier, build_classifier
from squarefuse.models.fusion import (
    JointMLP,
    NoFusion,
    SQuaReFuse,
    TemporalAttention,
    TemporalConv,
    TemporalShift,
    square_fuse,
)
from squarefuse.models.heads import AttentiveHead, ClsHead, MeanHead
from squarefuse.models.pixels import PixelFrames

__all__ = [
    "VideoBackbone",
    "CachedTokens",
    "PixelFrames",
    "ClsHead",
    "MeanHead",
    "AttentiveHead",
    "VideoClassifier",
    "build_classifier",
    "SQuaReFuse",
    "NoFusion",
    "square_fuse",
    "TemporalAttention",
    "TemporalShift",
    "TemporalConv",
    "JointMLP",
]
