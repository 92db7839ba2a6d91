"""The built-in synthetic dataset: shapes that move, grow and turn, in time-reversed class pairs.

generate  `ensure_synthetic(root, ...)`: renders and encodes the videos on first use, under a lock
encoding  `write_video`: the one atomic PyAV encoder (this dataset, the preparation scripts, tests)
"""

from squarefuse.datasets.synthetic.generate import (
    CLASS_NAMES,
    GENERATOR_VERSION,
    ClipParams,
    SyntheticSplits,
    class_trajectory,
    draw_frames,
    ensure_synthetic,
    render_clip,
    sample_clip_params,
    twin_of,
)

__all__ = [
    "CLASS_NAMES",
    "GENERATOR_VERSION",
    "ClipParams",
    "SyntheticSplits",
    "class_trajectory",
    "draw_frames",
    "ensure_synthetic",
    "render_clip",
    "sample_clip_params",
    "twin_of",
]
