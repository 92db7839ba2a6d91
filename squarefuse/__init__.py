"""squarefuse: video action recognition with a per-frame timm ViT and SQuaRe-Fuse temporal fusion.

import squarefuse
model = squarefuse.load_model("runs/<run>/checkpoints/best.pt")
print(squarefuse.predict(model, "clip.mp4"))
"""

__all__ = ["SQuaReFuse", "load_model", "predict"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import squarefuse.datasets` (loader workers, data scripts) should not pay for timm.
    if name == "SQuaReFuse":
        from squarefuse.models.fusion import SQuaReFuse  # noqa: PLC0415 - lazy: `import squarefuse` stays light

        return SQuaReFuse
    if name in ("load_model", "predict"):
        from squarefuse import api  # noqa: PLC0415 - lazy: `import squarefuse` stays light

        return getattr(api, name)
    raise AttributeError(f"module 'squarefuse' has no attribute {name!r}")
