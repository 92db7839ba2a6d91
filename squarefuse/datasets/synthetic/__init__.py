"""The built-in synthetic dataset: task families of shapes that move, flash, grow and turn.

render    `sample_clip_params`, `draw_frames`, `render_clip`: a clip of the default `direction` task
tasks     `TASKS`, `TWIN_PAIRS`, `render_task_clip`: each task family, the statistic that separates it
generate  `ensure_synthetic(root, task=...)`: renders and encodes the videos on first use, under a lock
encoding  `write_video`: the one atomic PyAV encoder (this dataset, the preparation scripts, tests)
"""

from squarefuse.datasets.synthetic.generate import GENERATOR_VERSION, SyntheticSplits, ensure_synthetic
from squarefuse.datasets.synthetic.render import (
    CLASS_NAMES,
    ClipParams,
    class_trajectory,
    draw_frames,
    render_clip,
    sample_clip_params,
    twin_of,
)
from squarefuse.datasets.synthetic.tasks import TASKS, TWIN_PAIRS, frame_order, render_task_clip, task_scene

__all__ = [
    "CLASS_NAMES",
    "GENERATOR_VERSION",
    "TASKS",
    "TWIN_PAIRS",
    "ClipParams",
    "SyntheticSplits",
    "class_trajectory",
    "draw_frames",
    "ensure_synthetic",
    "frame_order",
    "render_clip",
    "render_task_clip",
    "sample_clip_params",
    "task_scene",
    "twin_of",
]
