"""The eval app behind `eval.py`: checkpoint -> model -> eval split -> multi-view test -> result files.

`run_eval` loads the checkpoint, rebuilds its model (`checkpoint.build_model_from_checkpoint`),
builds the split from the stored dataset config with the eval overrides applied, runs
`evaluator.evaluate` on every rank, and has rank 0 write the result files (`results.write_results`)
into `<run>/eval/<stamp>` (`config.output_dirs.default_eval_dir`) or `hydra.run.dir`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from squarefuse.apps.batch_settings import batch_settings
from squarefuse.checkpoint import build_model_from_checkpoint, load_checkpoint, select_weights
from squarefuse.config.dataset_overrides import merge_dataset_overrides
from squarefuse.datasets import build_dataset
from squarefuse.datasets.preprocess import input_normalizer
from squarefuse.evaluation.class_subsets import class_subset_metrics, read_class_subset, read_twin_pairs
from squarefuse.evaluation.evaluator import check_finite, evaluate
from squarefuse.evaluation.frame_order import check_frame_order
from squarefuse.evaluation.metrics import EvalResult
from squarefuse.evaluation.results import summary_lines, write_results
from squarefuse.models.complexity import model_complexity
from squarefuse.runtime.distributed import distributed_session

log = logging.getLogger(__name__)


def _check_class_files(
    subset_files: list[str], twin_file: str | None, class_names: list[str], *, only_existing: bool
) -> None:
    """Reads the class subset and twin files, which raises a ValueError for a name not in `class_names`."""
    for subset_file in subset_files:
        if not only_existing or Path(subset_file).is_file():
            read_class_subset(subset_file, class_names)
    if twin_file is not None and (not only_existing or Path(twin_file).is_file()):
        read_twin_pairs(twin_file, class_names)


def _log_summary(result: EvalResult, meta: dict, *, ckpt: str, num_missing: int, run_dir: Path) -> None:
    """Log the results: the summary lines, the class subsets, twin confusion, frame order and missing videos."""
    frame_order = meta["frame_order"]
    for line in summary_lines(result, weights=meta["weights"], ckpt=ckpt, split=meta["split"]):
        log.info(line)
    for name, subset in meta.get("class_subsets", {}).items():
        log.info(f"class subset {name}: top-1 {subset['top1']}% over {subset['num_videos']} videos")
    if "twin_confusion" in meta:
        twins = meta["twin_confusion"]
        log.info(f"twin confusion: {twins['confusion']}% of {twins['num_videos']} videos predicted as the twin")
    if frame_order != "normal":
        log.info(f"frame order: {frame_order} (the frames of every view reordered before the model)")
    if num_missing:
        log.info(f"{num_missing} videos were missing at start-up and left out (see {run_dir})")
    log.info(f"results written to {run_dir}")


def run_eval(cfg: DictConfig, run_dir: str | Path) -> EvalResult:
    """The eval app: load `cfg.ckpt`, evaluate it on `cfg.split` with multi-view testing.

    Args:
        cfg: the composed `configs/eval.yaml` (ckpt, use_ema, split, batch_size, num_workers,
            device, precision, progress, dataset overrides).
        run_dir: where the result files go (written by rank 0 only).

    Returns:
        The `EvalResult` (the same on every rank).
    """
    if cfg.get("ckpt") is None:
        raise ValueError("ckpt is required: python eval.py ckpt=PATH/TO/checkpoint.pt")
    frame_order, frame_order_seed = str(cfg.frame_order), cfg.frame_order_seed
    check_frame_order(frame_order, frame_order_seed)
    ckpt = str(cfg.ckpt)
    state = load_checkpoint(ckpt)
    for key in ("config", "class_names"):
        if key not in state:
            raise ValueError(f"{ckpt} has no '{key}' entry: it was not written by the squarefuse trainer")
    class_names = list(state["class_names"])
    subset_files = [str(f) for f in cfg.get("subsets") or []]
    twin_file = cfg.get("twin_pairs")
    # A wrong class name fails now, not after the evaluation; a synthetic dataset's twins.txt may
    # not exist before the dataset is generated, and is read after that.
    _check_class_files(subset_files, twin_file, class_names, only_existing=True)
    split = str(cfg.split)
    dataset_cfg = merge_dataset_overrides(
        state["config"]["dataset"], cfg.get("dataset"), allow_new=(f"{split}_file", f"{split}_video_dir")
    )

    with distributed_session(str(cfg.device)) as (dist_info, device):
        run_dir = Path(run_dir)
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        weights, weights_name = select_weights(state, bool(cfg.use_ema))
        model = build_model_from_checkpoint(state, weights).to(device)
        dataset = build_dataset(dataset_cfg, split, views=True, report_dir=run_dir if dist_info.is_main else None)
        _check_class_files(subset_files, twin_file, class_names, only_existing=False)
        if dataset.num_classes != len(class_names):
            raise ValueError(
                f"the checkpoint has {len(class_names)} classes but the {split} split of "
                f"dataset.root={dataset_cfg.get('root')} has {dataset.num_classes}"
            )
        if list(dataset.class_names) != class_names:
            log.warning("the dataset's class names differ from the checkpoint's; labels are compared by id")
        normalizer = input_normalizer(model.mean, model.std, device)
        settings = batch_settings(cfg, device, normalizer, frame_order=frame_order, frame_order_seed=frame_order_seed)
        precision = settings.precision
        result = evaluate(model, dataset, settings, dist_info=dist_info, progress=bool(cfg.progress))
        check_finite(result, dataset, model)  # every rank: the same result, the same error
        if dist_info.is_main:
            meta = {
                "checkpoint": str(Path(ckpt).resolve()),
                "step": state.get("step"),
                "epoch": state.get("epoch"),
                "weights": weights_name,
                "split": split,
                "dataset": dataset_cfg.get("name"),
                "dataset_root": dataset_cfg.get("root"),
                "num_frames": dataset_cfg.get("num_frames"),
                "precision": precision,
                "world_size": dist_info.world_size,
                "model_info": model_complexity(model, int(dataset_cfg.num_frames), model.backbone.img_size),
                "frame_order": frame_order,
                "frame_order_seed": frame_order_seed if frame_order == "shuffled" else None,
                **class_subset_metrics(
                    result.labels.tolist(),
                    result.probs.argmax(1).tolist(),
                    class_names,
                    subset_files=subset_files,
                    twin_file=twin_file,
                ),
            }
            write_results(result, run_dir, class_names, dataset.records, missing=dataset.missing, meta=meta)
            _log_summary(result, meta, ckpt=ckpt, num_missing=len(dataset.missing), run_dir=run_dir)
        return result
