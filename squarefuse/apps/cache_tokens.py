"""The token cache app: `python scripts/cache_tokens.py ckpt=PATH split=train out=CACHE`.

Or, without a checkpoint, `train_config=[OVERRIDES]`: the backbone `python train.py OVERRIDES`
starts from (pretrained weights, `backbone.pretrained_path`, or its initialisation seeded by
`trainer.seed`), on that run's dataset.

Runs the frozen backbone of a squarefuse checkpoint over every video of a split (its eval views:
`views=CLIPSxCROPS`, the checkpoint's frame sampling unless `dataset.*` overrides say otherwise)
and writes the tokens the fusion would receive, `[views, T, N, D]` per video, into the cache
folder `out` (format: `squarefuse.datasets.token_cache`). `tokens=all|cls|pooled` chooses what is
kept of each frame's tokens; `split=val` afterwards adds the val split to the same folder (its
settings must then be the same).

Shards of `shard_size` videos are the unit of work and of resumption: under torchrun shard k goes
to rank k % world_size; a shard is written atomically, its json last, and a rerun skips the
shards that have their json, so a killed run continues where it stopped and every video is cached
once. Rank 0 then writes the split's index.json (and failed.csv for videos that did not decode),
with the sha256 of every shard recorded when it was written.
Nothing is deleted unless `overwrite=true`, which removes the split's files first: only files the
cache wrote (by name), in a folder with the cache's cache.json; any other file there is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from squarefuse.api import LoadedModel, load_model
from squarefuse.apps.batch_settings import batch_settings
from squarefuse.apps.extract import checkpoint_preprocess
from squarefuse.config.compose_config import compose_app_config
from squarefuse.datasets import build_dataset
from squarefuse.datasets.annotations import split_missing
from squarefuse.datasets.build import load_annotations
from squarefuse.datasets.formats import find_format
from squarefuse.datasets.preprocess import EvalPreprocess
from squarefuse.datasets.token_cache import (
    CACHE_FILE,
    CACHE_VERSION,
    INDEX_FILE,
    TOKEN_OPTIONS,
    file_checksum,
    is_split_file,
    pool_tokens,
    read_shard_json,
    shard_done,
    shard_files,
    write_shard,
    write_split_index,
)
from squarefuse.evaluation.inference_loop import run_batches
from squarefuse.models import build_classifier
from squarefuse.runtime.atomic_file import atomic_write
from squarefuse.runtime.distributed import barrier, broadcast_object, distributed_session
from squarefuse.runtime.safe_text import csv_writer
from squarefuse.training.trainer import check_train_config

__all__ = ["initial_model", "run_cache_tokens", "weights_hash"]

log = logging.getLogger(__name__)

DTYPES = {"float16": np.float16, "float32": np.float32}


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and values, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _check_options(cfg: DictConfig) -> None:
    if (cfg.get("ckpt") is None) == (cfg.get("train_config") is None):
        raise ValueError(
            "give the backbone either as ckpt=PATH (a squarefuse checkpoint) or as train_config=[OVERRIDES] "
            f"(the backbone `python train.py OVERRIDES` starts from), not {'both' if cfg.get('ckpt') else 'neither'}: "
            "python scripts/cache_tokens.py ckpt=PATH split=train out=CACHE"
        )
    if cfg.get("train_config") is not None and not OmegaConf.is_list(cfg.train_config):
        raise ValueError(
            f"train_config={cfg.train_config!r}: must be a list of train.py overrides, each quoted, e.g. "
            """'train_config=["dataset.task=path_shape","backbone.pretrained_path=W.safetensors"]'"""
        )
    if cfg.get("out") is None:
        raise ValueError("out is required: the cache folder, e.g. out=data/cache/ssv2_vitb16")
    if str(cfg.tokens) not in TOKEN_OPTIONS:
        raise ValueError(f"tokens={cfg.tokens!r}: choose one of {', '.join(TOKEN_OPTIONS)}")
    if str(cfg.dtype) not in DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: choose float16 or float32")
    if int(cfg.shard_size) < 1:
        raise ValueError(f"shard_size={cfg.shard_size}: must be >= 1")


def _cache_info(
    cfg: DictConfig, model: Any, dataset_cfg: dict[str, Any], preprocess: EvalPreprocess, class_names: list[str]
) -> dict:
    """What every split of the cache shares (cache.json); `class_names` are the cached dataset's (its labels')."""
    backbone = model.model.backbone
    tokens = str(cfg.tokens)
    if tokens == "cls" and not backbone.num_prefix_tokens:
        raise ValueError(
            f"tokens=cls keeps each frame's class and register tokens, and backbone {backbone.name} has none: "
            "use tokens=all"
        )
    num_tokens = {
        "all": backbone.num_tokens,
        "cls": backbone.num_prefix_tokens,
        "pooled": backbone.num_prefix_tokens + int(cfg.grid) ** 2,
    }[tokens]
    return {
        "version": CACHE_VERSION,
        "backbone_name": backbone.name,
        "backbone": model.info["config"]["backbone"],
        "checkpoint": str(Path(str(cfg.ckpt)).resolve()) if cfg.get("ckpt") is not None else None,
        "train_config": list(cfg.train_config) if cfg.get("train_config") is not None else None,
        "weights": model.weights,
        "weights_hash": weights_hash(backbone),
        "num_frames": preprocess.num_frames,
        "img_size": backbone.img_size,
        "task": dataset_cfg.get("task"),
        "sampling": {k: dataset_cfg.get(k) for k in ("sampling", "stride", "short_video", "eval_short_side")},
        "tokens": tokens,
        "grid": int(cfg.grid) if tokens == "pooled" else None,
        "dtype": str(cfg.dtype),
        "views": list(preprocess.views),
        "embed_dim": backbone.embed_dim,
        "num_prefix_tokens": backbone.num_prefix_tokens,
        "has_class_token": backbone.has_class_token,
        "num_tokens": num_tokens,
        "class_names": list(class_names),
    }


def initial_model(overrides: list[str], device: torch.device, *, is_main: bool = True) -> LoadedModel:
    """The model `python train.py OVERRIDES` starts from, before any step, with its dataset's class names.

    Its backbone has the weights the run would load (the hub's, `backbone.pretrained_path`), or
    without them the initialisation drawn after `torch.manual_seed(trainer.seed)`: a backbone that
    has seen none of the dataset's labels. A synthetic dataset is generated here (rank 0 first) when
    its files are missing, as `train.py` would.

    Raises:
        ValueError: an override names no key or option, or the train config fails its checks.
    """
    train_cfg = compose_app_config("train", overrides)
    if not find_format(train_cfg.dataset.name).decodes_videos:
        raise ValueError(
            f"train_config={overrides}: dataset={train_cfg.dataset.name} holds tokens already; give the video dataset"
        )
    check_train_config(train_cfg)
    if is_main:
        class_names = build_dataset(train_cfg.dataset, "train", report_dir=None).class_names
    barrier()
    if not is_main:
        class_names = build_dataset(train_cfg.dataset, "train", report_dir=None).class_names
    torch.manual_seed(int(train_cfg.trainer.seed))
    model = build_classifier(train_cfg.backbone, train_cfg.fusion, train_cfg.head, num_classes=len(class_names))
    model = model.to(device).eval()
    preprocess = EvalPreprocess(
        train_cfg.dataset, class_names=list(class_names), mean=model.mean, std=model.std, device=device
    )
    info = {"step": 0, "epoch": 0, "config": OmegaConf.to_container(train_cfg, resolve=True)}
    source = f"the initial model of train.py {' '.join(overrides)}"
    return LoadedModel(model, list(class_names), preprocess, weights="initial", checkpoint=source, info=info)


def _previous_settings(cache_file: Path) -> dict[str, Any]:
    """The settings in an existing cache.json, which must be one this app wrote."""
    try:
        previous = json.loads(cache_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        previous = str(e)
    if not isinstance(previous, dict) or "version" not in previous or "backbone_name" not in previous:
        raise ValueError(
            f"{cache_file} is not the cache.json of a token cache (damaged, or another program's file): "
            "choose another out= folder; nothing was changed"
        )
    return previous


def _splits(out: Path) -> list[str]:
    """The split folders of a cache: those holding its files (not `.hydra_logs` nor a folder of the user's)."""
    return sorted(
        p.name
        for p in out.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any(is_split_file(f.name) for f in p.iterdir())
    )


def _remove_split_files(split_dir: Path, *, in_cache: bool) -> None:
    """overwrite=true: delete the files the cache wrote into `split_dir`; refuse if anything else is there."""
    entries = sorted(split_dir.iterdir())
    if entries and not in_cache:
        raise ValueError(
            f"{split_dir} is not a split of a token cache ({split_dir.parent / CACHE_FILE} is missing) and "
            f"overwrite=true deletes only a cache's own files; it holds {[p.name for p in entries[:10]]}: "
            "choose another out= folder. Nothing was deleted"
        )
    foreign = [p.name for p in entries if not (p.is_file() and is_split_file(p.name))]
    if foreign:
        more = f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        raise ValueError(
            f"{split_dir} holds files the token cache did not write: {foreign[:10]}{more}. overwrite=true deletes "
            "only the cache's own files: move these elsewhere, or choose another out= folder. Nothing was deleted"
        )
    for path in entries:
        path.unlink()


def _prepare_folder(out: Path, split: str, info: dict[str, Any], overwrite: bool) -> bool:
    """Rank 0: True when the split is already cached; checks an existing cache.json, writes a new one."""
    out.mkdir(parents=True, exist_ok=True)
    split_dir = out / split
    cache_file = out / CACHE_FILE
    in_cache = cache_file.is_file()
    if in_cache:
        previous = _previous_settings(cache_file)
        differ = [k for k, v in info.items() if previous.get(k) != v and k not in ("checkpoint", "train_config")]
        if differ and not overwrite:
            raise ValueError(
                f"{out} holds a token cache made with other settings "
                f"({'; '.join(f'{k}: {previous.get(k)!r} there, {info[k]!r} now' for k in differ)}): "
                "choose another out= folder, or overwrite=true to replace it"
            )
        if differ and overwrite:
            # The other splits were made with the old settings: a cache never mixes settings.
            others = [name for name in _splits(out) if name != split]
            if others:
                raise ValueError(
                    f"overwrite=true would change the settings of {out}, which also holds the splits {others} "
                    "made with the old ones: use a new out= folder"
                )
    if overwrite and split_dir.is_dir():
        _remove_split_files(split_dir, in_cache=in_cache)
    with atomic_write(cache_file) as f:
        json.dump(info, f, indent=1)
    split_dir.mkdir(exist_ok=True)
    return (split_dir / INDEX_FILE).is_file()


def _load_cacheable_model(cfg: DictConfig, device: Any, *, is_main: bool) -> Any:
    """The checkpoint's model (or the train config's initial model); refused if its backbone holds fusion layers."""
    if cfg.get("ckpt") is not None:
        model = load_model(str(cfg.ckpt), use_ema=bool(cfg.use_ema), device=device)
    else:
        model = initial_model(list(cfg.train_config), device, is_main=is_main)
    if len(model.model.block_fusions):
        raise ValueError(
            f"{model.checkpoint}: its fusion layers sit inside the backbone (fusion.after_blocks), so the "
            "backbone's tokens depend on trained layers and cannot be cached; "
            "cache a model with fusion.after_blocks=[]"
        )
    return model


def _log_plan(info: dict[str, Any], num_videos: int, split: str, num_shards: int, split_dir: Path) -> None:
    """Rank 0: log what will be cached and its size on disk."""
    per_video = int(np.prod([*info["views"], info["num_frames"], info["num_tokens"], info["embed_dim"]]))
    size = num_videos * per_video * np.dtype(DTYPES[info["dtype"]]).itemsize
    log.info(
        f"caching {num_videos} {split} videos x {info['views'][0]}x{info['views'][1]} views x "
        f"{info['num_frames']} frames x {info['num_tokens']} tokens x {info['embed_dim']} "
        f"({info['tokens']}, {info['dtype']}): {size / 2**30:.2f} GiB on disk, "
        f"in {num_shards} shards, into {split_dir}"
    )


def run_cache_tokens(cfg: DictConfig) -> dict[str, Any]:
    """Cache the backbone tokens of one split of the checkpoint's dataset into `cfg.out`.

    Args:
        cfg: the composed `configs/cache_tokens.yaml`.

    Returns:
        The split's index (the same on every rank).
    """
    _check_options(cfg)
    out, split = Path(str(cfg.out)), str(cfg.split)
    with distributed_session(str(cfg.device)) as (dist_info, device):
        model = _load_cacheable_model(cfg, device, is_main=dist_info.is_main)
        preprocess = checkpoint_preprocess(model, cfg, device)
        # The labels are the cached dataset's: a backbone may be cached on another task than it was
        # trained on (dataset.task=..., e.g. the temporal benchmark's static backbone).
        annotations = load_annotations(preprocess.dataset_cfg, split)
        info = _cache_info(cfg, model, preprocess.dataset_cfg, preprocess, annotations.class_names)
        done = None
        if dist_info.is_main:
            done = _prepare_folder(out, split, info, bool(cfg.overwrite))
        split_dir = out / split
        if broadcast_object(done):
            index = json.loads((split_dir / INDEX_FILE).read_text(encoding="utf-8"))
            log.info(f"{split_dir} already holds this split ({len(index['videos'])} videos): nothing to do")
            return index

        records, missing = split_missing(annotations.records)
        if missing:
            log.warning(f"{len(missing)} videos of {split} are missing and left out of the cache, e.g. {missing[:3]}")
        dataset = preprocess.dataset(records)
        shard_size = int(cfg.shard_size)
        num_shards = -(-len(records) // shard_size)
        if dist_info.is_main:
            _log_plan(info, len(records), split, num_shards, split_dir)
        backbone = model.model.backbone

        def tokens_of(video: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
            tokens_BTND = backbone(video)
            B, T = tokens_BTND.shape[:2]
            kept = pool_tokens(
                tokens_BTND.flatten(0, 1), info["tokens"], num_prefix_tokens=backbone.num_prefix_tokens, grid=cfg.grid
            )
            return {"tokens": kept.unflatten(0, (B, T)), "mask": mask}

        mine = [k for k in range(dist_info.rank, num_shards, dist_info.world_size) if not shard_done(split_dir, k)]
        for k in mine:
            indices = list(range(k * shard_size, min((k + 1) * shard_size, len(records))))
            part = run_batches(
                tokens_of,
                dataset,
                batch_settings(cfg, device, preprocess.normalizer),
                shard=indices,
                progress=bool(cfg.progress) and dist_info.is_main,
                desc=f"cache shard {k + 1}/{num_shards}",
                average_views=False,
            )
            rows = part["indices"].tolist()
            D = info["embed_dim"]
            empty = (0, int(np.prod(info["views"])), info["num_frames"], info["num_tokens"], D)
            tokens = part["outputs"]["tokens"].numpy() if rows else np.zeros(empty)
            mask = part["outputs"]["mask"].numpy() if rows else np.zeros(empty[:3], dtype=bool)
            videos = [
                {"index": i, "id": records[i].id, "path": records[i].path, "label": records[i].label} for i in rows
            ]
            write_shard(
                split_dir,
                k,
                tokens=tokens.astype(DTYPES[info["dtype"]]),
                mask=mask.astype(bool),
                videos=videos,
                errors=part["errors"],
            )
        barrier()
        index = None
        if dist_info.is_main:
            index = _write_index(split_dir, records, num_shards, missing)
        return broadcast_object(index)


def _write_index(split_dir: Path, records: list[Any], num_shards: int, missing: list[str]) -> dict[str, Any]:
    """Rank 0, after every shard is written: index.json (and failed.csv) of the split."""
    videos, failed, files = [], [], {}
    for k in range(num_shards):
        shard = read_shard_json(split_dir, k)
        videos += [{**v, "shard": k, "row": row} for row, v in enumerate(shard["videos"])]
        # A shard written before checksums were recorded (a run resumed across the upgrade): taken now.
        files.update(shard.get("files") or {name: file_checksum(split_dir / name) for name in shard_files(k)})
        for index, error in shard["errors"].items():
            record = records[int(index)]
            failed.append({"index": int(index), "id": record.id, "path": record.path, "error": error})
    seen = sorted([v["index"] for v in videos] + [f["index"] for f in failed])
    assert seen == list(range(len(records))), f"the shards of {split_dir} do not hold every video exactly once"
    if failed:
        with atomic_write(split_dir / "failed.csv") as f:
            writer = csv_writer(f)
            writer.writerow(["index", "id", "path", "error"])
            for row in failed:
                writer.writerow([row["index"], row["id"], row["path"], row["error"]])
        log.warning(
            f"{len(failed)} of {len(records)} videos did not decode and are not cached: see {split_dir}/failed.csv"
        )
    index = {"split": split_dir.name, "videos": videos, "failed": failed, "missing": missing, "files": files}
    write_split_index(split_dir, index)
    log.info(f"{len(videos)} videos cached in {split_dir}")
    return index
