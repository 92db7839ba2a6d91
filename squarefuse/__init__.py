"""squarefuse: video action recognition with a per-frame timm ViT and SQuaRe-Fuse temporal fusion."""

from squarefuse.models.fusion import SQuaReFuse

__all__ = ["SQuaReFuse"]
__version__ = "0.1.0"
