"""What the config files say runs is what runs: defaults lists, recipes, shared base files, package data."""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from helpers.configs import CONFIG_DIR, compose_config
from helpers.scripts import run_script
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from squarefuse.config.dataset_overrides import DATASET_BASE_CONFIG
from squarefuse.models import VideoBackbone
from squarefuse.training.trainer import Trainer

REPO = CONFIG_DIR.parent
CHECKPOINT_APPS = ("eval", "predict", "extract", "export")


def choices(config_name: str, overrides: list[str]) -> dict[str, str]:
    """Hydra's group choices of a composed config (what each config group resolved to)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    return dict(cfg.hydra.runtime.choices)


def own_keys(path: Path) -> set[str]:
    """The top-level keys a config file sets itself (its defaults list aside)."""
    return set(yaml.safe_load(path.read_text()) or {}) - {"defaults"}


def test_train_yaml_defaults_list_names_what_the_default_run_uses():
    listed = {}
    for entry in yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            ((group, option),) = entry.items()
            if not group.startswith("override ") and option not in (None, "???"):
                listed[group] = option
    chosen = choices("train", [])
    # No recipe or dataset config silently replaces a choice train.yaml states.
    assert {group: chosen[group] for group in listed} == listed
    assert chosen["recipe"] == "tiny_scratch"
    # backbone and head are the recipe's: train.yaml does not claim them.
    assert "backbone" not in listed and "head" not in listed
    assert (chosen["backbone"], chosen["head"]) == ("tiny", "mean")


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONFIG_DIR / "recipe").glob("*.yaml")))
def test_every_recipe_names_itself_and_chooses_backbone_and_head(recipe):
    cfg = compose_config("train", [f"recipe={recipe}"])
    assert cfg.recipe == recipe  # what the resolved config (`--cfg job`, config.yaml) shows
    recipe_defaults = yaml.safe_load((CONFIG_DIR / "recipe" / f"{recipe}.yaml").read_text())["defaults"]
    groups = {next(iter(e)).lstrip("/") for e in recipe_defaults if isinstance(e, dict)}
    assert {"backbone", "head"} <= groups


def test_datasets_pick_their_recipe_and_the_command_line_still_wins():
    card = compose_config("train", ["dataset=ssv2", "fusion.K=8"])  # the model card's command
    assert card.recipe == "vitb16_finetune" and card.backbone.name.startswith("vit_base_patch16_224")
    assert card.head._target_.endswith("ClsHead") and card.fusion.K == 8
    assert compose_config("train", ["dataset=list"]).recipe == "vitb16_finetune"

    cpu_list = compose_config("train", ["dataset=list", "recipe=tiny_scratch"])
    assert cpu_list.recipe == "tiny_scratch" and cpu_list.backbone.name == "vit_tiny_patch16_224"
    assert not cpu_list.backbone.pretrained and cpu_list.head._target_.endswith("MeanHead")

    assert compose_config("train", ["head=cls"]).head._target_.endswith("ClsHead")
    assert compose_config("train", ["dataset=ssv2", "backbone=vit_s16"]).backbone.name.startswith("vit_small")
    meanpool = compose_config("train", ["experiment=k400_vitb16_meanpool"])
    assert meanpool.recipe == "vitb16_finetune" and meanpool.head._target_.endswith("MeanHead")
    assert meanpool.fusion._target_.endswith("NoFusion")


def test_backbone_files_share_one_base():
    base = OmegaConf.load(CONFIG_DIR / "backbone" / "base.yaml")
    for path in sorted((CONFIG_DIR / "backbone").glob("*.yaml")):
        if path.stem == "base":
            continue
        cfg = compose_config("train", [f"backbone={path.stem}"]).backbone
        assert set(cfg) == set(base), path.stem
        if cfg.pretrained:  # a pretrained ViT names its timm model; the rest is the base's
            assert own_keys(path) == {"name"}, path.stem


def test_checkpoint_apps_share_one_block():
    shared = own_keys(CONFIG_DIR / "app" / "checkpoint.yaml") | own_keys(CONFIG_DIR / "app" / "inference_loop.yaml")
    for app in CHECKPOINT_APPS:
        assert not own_keys(CONFIG_DIR / f"{app}.yaml") & (shared - {"hydra"}), app
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(app, overrides=["ckpt=/runs/a/checkpoints/best.pt"], return_hydra_config=True)
        assert cfg.ckpt == "/runs/a/checkpoints/best.pt" and cfg.use_ema is True
        assert cfg.hydra.runtime.choices["hydra/job_logging"] == "rank_zero", app
        assert cfg.hydra.runtime.choices["hydra/hydra_logging"] == "rank_zero", app
        assert cfg.hydra.job.chdir is False and "hydra" not in own_keys(CONFIG_DIR / "app" / "inference_loop.yaml")
        assert ("progress" in cfg) == (app != "export"), app  # export runs no batches
    assert compose_config("eval", ["ckpt=x"]).progress is True


def test_the_dataset_defaults_the_code_reads_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the slow install test below covers 3.10
    package_dir = REPO / "squarefuse"
    path = Path(str(DATASET_BASE_CONFIG))
    assert path.is_file() and package_dir in path.parents
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    covered = [
        pattern
        for package, patterns in package_data.items()
        for pattern in patterns
        if fnmatch.fnmatch(str(path.relative_to(REPO / package.replace(".", "/"))), pattern)
        and (REPO / package.replace(".", "/") / "__init__.py").is_file()
    ]
    assert covered, f"{path} is not in pyproject's package-data: an installed squarefuse would lack it"
    # The training configs compose the same file (Hydra's search path), not a copy of it.
    composed = compose_config("train", ["dataset=list"]).dataset
    assert composed.decode_timeout == OmegaConf.load(path).decode_timeout


@pytest.mark.slow
def test_a_non_editable_install_reads_the_dataset_defaults(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "squarefuse", source / "squarefuse", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    snippet = (
        "import squarefuse, json; from squarefuse.config.dataset_overrides import merge_dataset_overrides; "
        "m = merge_dataset_overrides({'name': 'list', 'root': '/d'}, {}); "
        "print(json.dumps([squarefuse.__file__, m.decoder, m.decode_timeout]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    module_file, decoder, timeout = yaml.safe_load(done.stdout.strip().splitlines()[-1])
    assert module_file.startswith(str(target))  # the installed copy, not the source tree
    base = OmegaConf.load(REPO / "squarefuse" / "config" / "defaults" / "dataset" / "base.yaml")
    assert (decoder, timeout) == (base.decoder, base.decode_timeout)


def test_unreachable_hub_fails_in_seconds_naming_the_keys(monkeypatch):
    # A closed local port stands in for a machine without network: huggingface_hub would retry
    # each file with backoff (about 30 s per file); the probe fails at the first refusal.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        VideoBackbone("vit_tiny_patch16_224.augreg_in21k", img_size=32, pretrained=True)
    assert time.perf_counter() - start < 10
    assert "backbone.pretrained_path" in str(err.value) and "recipe=tiny_scratch" in str(err.value)


def test_start_up_log_names_the_recipe_before_the_data_is_read(tmp_path, caplog):
    overrides = ["dataset=list", f"dataset.root={tmp_path / 'absent'}", "trainer.num_workers=0", "trainer.device=cpu"]
    cfg = compose_config("train", overrides)
    with caplog.at_level(logging.INFO), pytest.raises(FileNotFoundError):
        Trainer(cfg, tmp_path / "run")  # the list files do not exist: fails right after start-up
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe ")]
    assert len(lines) == 1
    assert "recipe vitb16_finetune" in lines[0] and "vit_base_patch16_224" in lines[0]
    assert "Hugging Face hub" in lines[0] and "backbone.pretrained_path" in lines[0] and "ClsHead" in lines[0]


@pytest.mark.slow
def test_the_readme_cpu_list_example_trains(tmp_path, make_video):
    """docs/training.md: `dataset=list ... recipe=tiny_scratch trainer.batch_size=2` on 6 videos."""
    root = tmp_path / "my_list"
    lines = []
    for i in range(6):
        make_video(root / "videos" / f"v{i}.mp4", num_frames=24, width=64, height=64)
        lines.append(f"videos/v{i}.mp4 {i % 2}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "val.txt").write_text("\n".join(lines[:2]) + "\n")
    run = tmp_path / "run"
    docs = (REPO / "docs" / "training.md").read_text()
    command = "dataset=list dataset.root=data/my_list recipe=tiny_scratch trainer.batch_size=2"
    assert command in docs
    overrides = command.replace("data/my_list", str(root)).split()
    # Shorter than the README's run: one epoch, no loader workers, one validation.
    quick = ["trainer.epochs=1", "trainer.val_every=1", "trainer.num_workers=0", f"hydra.run.dir={run}"]
    done = run_script("train.py", *overrides, *quick, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recipe tiny_scratch" in (run / "train.log").read_text()
    assert OmegaConf.load(run / "config.yaml").recipe == "tiny_scratch"
    assert (run / "checkpoints" / "best.pt").is_file()
