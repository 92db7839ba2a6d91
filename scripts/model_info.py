"""Parameters and FLOPs per clip of a model config, without a checkpoint or any weights file.

    python scripts/model_info.py                                     # the default (tiny) model
    python scripts/model_info.py backbone=vit_b16 fusion=square dataset.num_frames=16
    python scripts/model_info.py dataset=ssv2 fusion.K=16 --json info.json

The arguments are `configs/train.yaml` overrides, exactly as for train.py; `num_classes=N` sets the
head's classes where the dataset config does not say (default: 174 for ssv2, 400 for k400, the
synthetic set's 8, else dataset.num_classes). The model is built with random weights (nothing is
downloaded) and run once on a zero clip at dataset.num_frames x backbone.img_size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KNOWN_NUM_CLASSES = {"ssv2": 174, "k400": 400}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="configs/train.yaml overrides (key=value, group=option)")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON (the run's model_info.json format)")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir  # noqa: PLC0415 (keeps --help fast)

    from squarefuse.datasets.synthetic import TASKS  # noqa: PLC0415
    from squarefuse.models import build_classifier  # noqa: PLC0415
    from squarefuse.models.complexity import format_model_info, model_complexity, write_model_info  # noqa: PLC0415

    num_classes = None
    overrides = []
    for item in args.overrides:
        if item.startswith("num_classes="):
            num_classes = int(item.partition("=")[2])
        else:
            overrides.append(item)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "backbone.pretrained=false"])
    known = dict(KNOWN_NUM_CLASSES)
    if cfg.dataset.name == "synthetic":
        known["synthetic"] = len(TASKS[cfg.dataset.task])
    num_classes = num_classes or cfg.dataset.get("num_classes") or known.get(cfg.dataset.name)
    if num_classes is None:
        sys.exit(f"error: dataset {cfg.dataset.name!r} does not say its number of classes: add num_classes=N")

    model = build_classifier(cfg.backbone, cfg.fusion, cfg.head, num_classes=int(num_classes))
    info = model_complexity(model, int(cfg.dataset.num_frames), int(cfg.backbone.img_size))
    print(f"{cfg.backbone.name} + fusion {cfg.fusion._target_.rsplit('.', 1)[-1]} + head, {num_classes} classes")
    print(format_model_info(info))
    if args.json is not None:
        write_model_info(info, args.json)
        print(f"written to {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
