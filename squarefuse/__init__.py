"""squarefuse: video action recognition with a per-frame timm ViT and SQuaRe-Fuse temporal fusion."""

__all__ = ["SQuaReFuse"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import squarefuse.datasets` (loader workers, data scripts) should not pay for timm.
    if name == "SQuaReFuse":
        from squarefuse.models.fusion import SQuaReFuse  # noqa: PLC0415 - lazy: `import squarefuse` stays light

        return SQuaReFuse
    raise AttributeError(f"module 'squarefuse' has no attribute {name!r}")
