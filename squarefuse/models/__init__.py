"""Video model: per-frame timm backbone, temporal fusion (SQuaRe-Fuse and baselines), classification heads.

`CachedTokens` (cached_tokens.py) stands in for the backbone of a model trained on a token cache.
"""

from squarefuse.models.backbone import VideoBackbone
from squarefuse.models.cached_tokens import CachedTokens
from squarefuse.models.classifier import VideoClassifier, build_classifier
from squarefuse.models.fusion import (
    NoFusion,
    SQuaReFuse,
    TemporalAttention,
    TemporalConv,
    TemporalShift,
    square_fuse,
)
from squarefuse.models.heads import ClsHead, MeanHead

__all__ = [
    "VideoBackbone",
    "CachedTokens",
    "ClsHead",
    "MeanHead",
    "VideoClassifier",
    "build_classifier",
    "SQuaReFuse",
    "NoFusion",
    "square_fuse",
    "TemporalAttention",
    "TemporalShift",
    "TemporalConv",
]
