"""The temporal benchmark's positive controls (issue 29): the token control `fusion=joint_mlp`, the pixel
control `backbone=pixels fusion=joint_mlp`, the matrix's informative rows, and the benchmark's commands."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers.configs import compose_config, tiny_overrides
from omegaconf import OmegaConf
from test_report_matrix import benchmark_run
from test_scripts import load_script

from squarefuse.apps.cache_tokens import run_cache_tokens
from squarefuse.apps.evaluate import run_eval
from squarefuse.models import JointMLP, PixelFrames, build_classifier
from squarefuse.models.complexity import model_complexity
from squarefuse.report.app import make_report
from squarefuse.report.groups import fusion_option
from squarefuse.report.lr_grid import choose_lrs
from squarefuse.report.matrix import matrix_markdown, task_fusion_matrix
from squarefuse.report.runs import load_run
from squarefuse.report.significance import holm
from squarefuse.training.trainer import Trainer

T, N, D = 4, 3, 8


def joint_mlp(seed: int = 0) -> JointMLP:
    """With weights of order 1: at its init (std 0.02) the layer's update is too small to see mixing."""
    torch.manual_seed(seed)
    layer = JointMLP(d_model=D, num_frames=T, num_tokens=N, d_token=4, hidden=16)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    return layer


def tokens(B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, N, D, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- joint_mlp


def test_joint_mlp_adds_one_vector_of_every_frame_and_position_to_every_token():
    layer, x = joint_mlp(), tokens()
    h, aux = layer(x)
    assert h.shape == x.shape and aux == {}
    update = h - x
    torch.testing.assert_close(update, update[:, :1, :1].expand_as(update))  # one vector per clip
    # Any single token, at any frame and position, changes what every token of its clip gets.
    for t, n in ((0, 0), (T - 1, N - 1), (1, 2)):
        moved = x.clone()
        moved[0, t, n] += torch.linspace(-1.0, 1.0, D)  # not a constant: the norm would remove it
        changed = layer(moved)[0] - moved
        assert not torch.allclose(changed[0], update[0], atol=1e-6), (t, n)
        torch.testing.assert_close(changed[1], update[1])  # the other clip is its own


@pytest.mark.parametrize("mask_shape", ["BT", "BTN"])
def test_joint_mlp_ignores_what_padded_frames_hold(mask_shape):
    layer, x = joint_mlp(), tokens()
    valid_BT = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    mask = valid_BT if mask_shape == "BT" else valid_BT[:, :, None].expand(2, T, N).clone()
    if mask_shape == "BTN":
        mask[0, 0, 1] = False  # a single padded token of a valid frame
    valid = mask if mask.dim() == 3 else mask[:, :, None].expand(2, T, N)
    zeros = torch.where(valid[..., None], x, 0.0)
    garbage = torch.where(valid[..., None], x, 1e4 * tokens(seed=7))
    garbage[1, 3, 0, 0] = float("nan")
    with torch.no_grad():
        h_zeros, _ = layer(zeros, valid_mask=mask)
        h_garbage, _ = layer(garbage, valid_mask=mask)
        h_again, _ = layer(garbage, valid_mask=mask)
    torch.testing.assert_close(h_garbage, h_again, atol=0, rtol=0, equal_nan=True)  # deterministic
    torch.testing.assert_close(h_garbage[valid], h_zeros[valid], atol=0, rtol=0)
    # The padding comes back as it was.
    torch.testing.assert_close(h_garbage[~valid], garbage[~valid], atol=0, rtol=0, equal_nan=True)
    # The mask matters: read unmasked, the garbage would change the valid tokens' outputs.
    assert not torch.allclose(layer(garbage.nan_to_num())[0][valid], h_zeros[valid])


def test_joint_mlp_gradients_reach_every_parameter_and_stay_finite_under_padding():
    layer = joint_mlp().train()
    x = tokens().requires_grad_(True)
    padded = x.detach().clone()
    padded[1, 2:] = float("nan")
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    h, _ = layer(torch.where(mask[:, :, None, None], x, padded), valid_mask=mask)
    h.pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_joint_mlp_refuses_clips_of_another_length():
    with pytest.raises(ValueError, match=r"built for clips of 4 frames x 3 tokens .*got 5 x 3"):
        joint_mlp()(torch.zeros(1, 5, N, D))


def test_the_classifier_gives_joint_mlp_the_backbones_token_count():
    tiny = compose_config("train", ["fusion=joint_mlp", "fusion.after_blocks=[1]"])
    model = build_classifier(tiny.backbone, tiny.fusion, tiny.head, num_classes=3)
    assert model.backbone.num_tokens == 17  # class token + 4 x 4 patches at 64 px
    for layer in (model.fusion, model.block_fusions["1"]):
        assert (layer.num_frames, layer.num_tokens, layer.d_model) == (8, 17, 96)
    assert model(torch.zeros(2, 8, 3, 64, 64)).shape == (2, 3)
    info = model_complexity(model, num_frames=8, img_size=64)
    assert info["params"]["fusion"] == sum(p.numel() for p in model.fusion.parameters()) > 8 * 17 * 16 * 256


# ---------------------------------------------------------------------------------- pixels


def test_pixel_backbone_is_each_frame_area_averaged_into_one_token():
    cfg = compose_config("train", ["backbone=pixels", "fusion=joint_mlp"])
    model = build_classifier(cfg.backbone, cfg.fusion, cfg.head, num_classes=2)
    backbone = model.backbone
    assert isinstance(backbone, PixelFrames) and not list(backbone.parameters())
    assert (backbone.embed_dim, backbone.num_tokens, backbone.num_prefix_tokens) == (192, 1, 0)
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.5, 0.5, 0.5) and backbone.num_blocks is None
    video = torch.randn(2, 8, 3, 64, 64)
    tokens_BTND = backbone(video)
    assert tokens_BTND.shape == (2, 8, 1, 192)
    blocks = video.reshape(2, 8, 3, 8, 8, 8, 8).mean(dim=(4, 6))  # 8 x 8 cells of 8 x 8 pixels
    torch.testing.assert_close(tokens_BTND[:, :, 0], blocks.reshape(2, 8, 192))
    assert model(video).shape == (2, 2) and model.fusion.num_tokens == 1


def test_pixel_backbone_refuses_weights_and_a_grid_finer_than_the_frame():
    with pytest.raises(ValueError, match="backbone=pixels has no weights"):
        PixelFrames(pretrained=True)
    with pytest.raises(ValueError, match=r"backbone.model_kwargs.grid=9 is larger than backbone.img_size=8"):
        PixelFrames(img_size=8, model_kwargs={"grid": 9})
    with pytest.raises(ValueError, match="model_kwargs.grid only"):
        PixelFrames(model_kwargs={"grid": 8, "depth": 2})


def test_the_pixel_control_trains_and_evaluates_on_videos(data_root, tmp_path):
    overrides = [o for o in tiny_overrides(data_root) if not o.startswith(("backbone.model_kwargs", "fusion."))]
    cfg = compose_config("train", [*overrides, "backbone=pixels", "fusion=joint_mlp"])
    summary = Trainer(cfg, tmp_path / "run").fit()
    assert summary["status"] == "finished"
    info = json.loads((tmp_path / "run" / "model_info.json").read_text())
    assert info["params"]["backbone"] == 0 and info["params"]["fusion"] > 0
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    result = run_eval(compose_config("eval", [f"ckpt={ckpt}", "split=test"]), tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["split"] == "test"
    assert 0.0 <= result.top1 <= 100.0


def test_the_pixel_control_is_cached_from_the_eval_views_and_validates_over_all_of_them(data_root, tmp_path):
    """The benchmark's pixel control: the frames' pixels cached like the tokens (the same eval views),
    trained with `trainer.val_views=all`, where best.pt holds the val top-1 eval.py gives on val."""
    overrides = [o for o in tiny_overrides(data_root) if not o.startswith(("backbone.model_kwargs", "fusion."))]
    video_model = [*overrides, "backbone=pixels", "fusion=joint_mlp"]
    train_config = "train_config=[" + ",".join(f'"{o}"' for o in video_model) + "]"
    cache = tmp_path / "cache"
    for split in ("train", "val"):
        common = [f"out={cache}", f"split={split}", "num_workers=0", "device=cpu", "progress=false"]
        run_cache_tokens(compose_config("cache_tokens", [train_config, *common]))
    info = json.loads((cache / "cache.json").read_text())
    assert (info["backbone_name"], info["num_tokens"], info["embed_dim"], info["num_prefix_tokens"]) == (
        "pixels",
        1,
        3 * 8 * 8,
        0,
    )
    assert info["views"] == [2, 3]  # the synthetic dataset's eval views, as the token cache's
    with pytest.raises(
        ValueError, match="tokens=cls keeps each frame's class and register tokens, and backbone pixels"
    ):
        run_cache_tokens(compose_config("cache_tokens", [train_config, f"out={tmp_path / 'cls'}", "tokens=cls"]))

    trainer = [o for o in overrides if o.startswith("trainer.")]
    run = tmp_path / "run"
    cfg = compose_config(
        "train", ["dataset=tokens", f"dataset.root={cache}", "fusion=joint_mlp", *trainer, "trainer.val_views=all"]
    )
    assert Trainer(cfg, run).fit()["status"] == "finished"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r.get("split") == "val_clip"]
    assert len(vals) == 2 and {r["views"] for r in vals} == {"2x3"}
    evaluated = run_eval(compose_config("eval", [f"ckpt={run / 'checkpoints' / 'best.pt'}", "split=val"]), run / "ev")
    best = load_run(run)
    assert best.best_top1 == pytest.approx(evaluated.top1) == pytest.approx(max(r["top1"] for r in vals))
    assert fusion_option(best) == "pixels+JointMLP"  # the report's pixel control (no Hydra choice here: the class)
    with pytest.raises(ValueError, match=r"trainer.val_views must be first or all, got 'centre'"):
        Trainer(compose_config("train", [*overrides, "trainer.val_views=centre"]), tmp_path / "refused")


# ---------------------------------------------------------------------------------- the matrix


def control_run(root: Path, task: str, option: str, seed: int, right: int) -> Path:
    """A finished run of the token control (`joint_mlp`) or the pixel control (`pixels+joint_mlp`)."""
    run = benchmark_run(root / option, task, "none", seed, right)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["fusion"] = {"_target_": "squarefuse.models.fusion.JointMLP", "_partial_": True, "d_token": 16}
    pixels = option.startswith("pixels+")
    target = "squarefuse.models.PixelFrames" if pixels else "squarefuse.models.CachedTokens"
    config["backbone"] = {"_target_": target}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    hydra = yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())
    hydra["hydra"]["runtime"]["choices"].update(fusion="joint_mlp", backbone="pixels" if pixels else "cached_tokens")
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    return run


@pytest.fixture
def gated(tmp_path) -> list[Path]:
    """speed: token control at 95 %; event_order: at 80 %; path_shape: no control ran."""
    runs = []
    for seed in (0, 1):
        for task in ("speed", "event_order", "path_shape"):
            runs.append(benchmark_run(tmp_path, task, "square", seed, 9))
            runs.append(benchmark_run(tmp_path, task, "none", seed, 5 + seed))
        runs.append(control_run(tmp_path, "speed", "joint_mlp", seed, 9 + seed))
        runs.append(control_run(tmp_path, "speed", "pixels+joint_mlp", seed, 10))
        runs.append(control_run(tmp_path, "event_order", "joint_mlp", seed, 8))
        runs.append(control_run(tmp_path, "event_order", "pixels+joint_mlp", seed, 10))
    return runs


def test_a_task_is_informative_only_where_the_token_control_reaches_90(gated, tmp_path):
    matrix = task_fusion_matrix([load_run(p) for p in gated], split="test")
    assert matrix.fusions == ["none", "square", "joint_mlp", "pixels+joint_mlp"]  # the controls last
    assert matrix.token_control_top1("speed") == 95.0 and matrix.informative("speed")
    assert matrix.token_control_top1("event_order") == 80.0 and not matrix.informative("event_order")
    assert matrix.token_control_top1("path_shape") is None and not matrix.informative("path_shape")
    # The pixel control at 100 % does not make event_order informative: the tokens are what the fusions read.
    assert matrix.cells[("event_order", "pixels+joint_mlp")].top1.mean == 100.0
    # The controls are not compared with square, and Holm's family holds only none vs square (three tasks).
    for task in ("speed", "event_order"):
        for control in ("joint_mlp", "pixels+joint_mlp"):
            cell = matrix.cells[(task, control)]
            assert cell.versus_reference is None and cell.refused is None and cell.verdict(0.05) == "control"
    compared = [matrix.cells[(task, "none")].versus_reference for task in ("event_order", "path_shape", "speed")]
    assert [c.p_holm for c in compared] == pytest.approx(holm([c.p_value for c in compared]))

    text = matrix_markdown(matrix)
    assert "| none | square | joint_mlp | pixels+joint_mlp | informative |" in text
    assert "95.0 ± 7.1 (n=2) token control | 100.0 ± 0.0 (n=2) pixel control | yes: token control 95.0 |" in text
    assert "| **no: token control 80.0 < 90** |" in text and "| **no: no token control ran** |" in text
    assert "no fusion verdict is read from them" in text

    report = make_report([tmp_path], tmp_path / "out", matrix=True)
    with open(report.out_dir / "matrix.csv", newline="") as f:
        rows = {(r["task"], r["option"]): r for r in csv.DictReader(f)}
    assert rows[("speed", "none")]["task_informative"] == "yes: token control 95.0"
    assert rows[("event_order", "square")]["task_informative"] == "no: token control 80.0 < 90"
    assert rows[("speed", "pixels+joint_mlp")]["verdict"] == "control"
    assert (report.out_dir / "temporal_matrix.png").stat().st_size > 1000


def test_the_lr_grid_keeps_the_pixel_control_apart_from_the_token_control(tmp_path):
    # Final val top-1 of each grid point: the token control is best at 1e-3, the pixel control at 1e-2
    # (pooled under one key, 1e-2 would win for both: a mean of 80 against 70).
    finals = {("joint_mlp", 1e-3): 80.0, ("joint_mlp", 1e-2): 70.0}
    finals |= {("pixels+joint_mlp", 1e-3): 60.0, ("pixels+joint_mlp", 1e-2): 90.0}
    runs = []
    for (option, lr), final in finals.items():
        run = control_run(tmp_path / str(lr), "speed", option, 0, 5)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["optim"] = {"lr": lr}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        metrics = (run / "metrics.jsonl").read_text().replace('"top1": 60.0', f'"top1": {final}')  # the last val
        (run / "metrics.jsonl").write_text(metrics)
        runs.append(load_run(run))
    chosen, _ = choose_lrs(runs)
    assert chosen == {("speed", "joint_mlp"): 1e-3, ("speed", "pixels+joint_mlp"): 1e-2}


# ---------------------------------------------------------------------------------- the benchmark


def bench_args(tmp_path: Path, *extra: str):
    bench = load_script("temporal_benchmark")
    args = bench.parse_args(
        [str(tmp_path / "bench"), "--tasks", "speed", "--fusions", "none", "square"]
        + ["--lrs", "1e-3", "1e-2", "--seeds", "1", *extra, "--", "trainer.epochs=1"]
    )
    return bench, args


def compose_command(command: list[str]) -> dict:
    """The config a `train.py -m ...` command of single values composes (without its sweep folder)."""
    overrides = [o for o in command[command.index("-m") + 1 :] if not o.startswith("hydra.")]
    return compose_config("train", overrides)


def one_point(command: list[str], *settings: str) -> list[str]:
    """A grid sweep's command at its first point (each swept value's first), then `settings`."""
    return [c.split(",")[0] if "=" in c and "," in c else c for c in command] + list(settings)


def test_the_benchmark_runs_both_controls_with_the_same_protocol(tmp_path):
    bench, args = bench_args(tmp_path)
    out, videos, cache, pixel_cache = tmp_path / "bench", tmp_path / "videos", tmp_path / "cache", tmp_path / "pixels"
    video_data = ["dataset.task=speed", f"dataset.root={videos}"]
    data = ["experiment=temporal_frozen", f"dataset.root={cache}"]
    pixel_data = bench.pixel_control_data(video_data, pixel_cache, end_to_end=False)
    grids = bench.grid_commands(args, data, pixel_data, out, "speed", "attentive")
    options = ("none", "square", "joint_mlp", "pixels+joint_mlp")
    # One sweep of all the fusions (the token control among them) and one of the pixel control, each with
    # its folder and log; they run --jobs at a time, the costliest (most runs) first.
    folders = ("fusions", "pixels+joint_mlp")
    assert [sweep.folder for sweep in grids] == [out / "grid" / "speed" / "attentive" / f for f in folders]
    assert [sweep.log.name for sweep in grids] == [f"grid_speed_attentive_{f}.log" for f in folders]
    assert [sweep.cost for sweep in grids] == [3 * 2 * 2, 2 * 2]  # options x lrs x seeds
    same = ("optim.lr=0.001,0.01", "trainer.seed=0,1", "head=attentive", "trainer.patience=3", "trainer.epochs=1")
    for sweep in grids:  # the same grid, head, patience, val rule and overrides for every option
        assert all(point in sweep.command for point in (*same, "trainer.val_views=all", "-m")), sweep.command
    assert "fusion=none,square,joint_mlp" in grids[0].command
    token_control = compose_command(one_point(grids[0].command, "fusion=joint_mlp"))
    pixel_control = compose_command(one_point(grids[1].command))
    # Both controls read a cache of the same eval views: the backbone's tokens, and the frames' pixels.
    assert token_control.dataset.name == pixel_control.dataset.name == "tokens"
    assert token_control.dataset.root == str(cache) and pixel_control.dataset.root == str(pixel_cache)
    assert OmegaConf.to_container(pixel_control.fusion) == OmegaConf.to_container(token_control.fusion)
    assert token_control.fusion._target_.endswith("JointMLP")
    assert pixel_control.trainer == token_control.trainer and pixel_control.trainer.val_views == "all"
    assert pixel_control.optim == token_control.optim and pixel_control.head == token_control.head

    chosen = {("speed", "none"): 1e-3, ("speed", "square"): 1e-2, ("speed", "joint_mlp"): 1e-2}
    chosen[("speed", "pixels+joint_mlp")] = 1e-3
    finals = bench.final_commands(args, data, pixel_data, out, "speed", "attentive", chosen)
    assert [sweep.folder for sweep in finals] == [out / "final" / "speed" / "attentive" / o for o in options]
    lrs = [compose_command(sweep.command).optim.lr for sweep in finals]
    assert lrs == [1e-3, 1e-2, 1e-2, 1e-3]
    assert all("trainer.seed=1" in sweep.command for sweep in finals)
    # --end-to-end: the pixel control on the videos, as every end-to-end run.
    on_videos = compose_command(["-m", *bench.pixel_control_data(video_data, pixel_cache, end_to_end=True)])
    assert on_videos.dataset.name == "synthetic" and on_videos.backbone._target_.endswith("PixelFrames")


def test_the_benchmark_without_controls_runs_only_the_fusions(tmp_path):
    bench, args = bench_args(tmp_path, "--no-controls")
    grids = bench.grid_commands(args, ["experiment=temporal_frozen"], [], tmp_path, "speed", "mean")
    assert [sweep.folder.name for sweep in grids] == ["fusions"] and "fusion=none,square" in grids[0].command
    chosen = {("speed", "none"): 1e-3, ("speed", "square"): 1e-2}
    assert len(bench.final_commands(args, [], [], tmp_path, "speed", "mean", chosen)) == 2


def test_the_benchmark_names_the_log_of_a_sweep_that_failed(tmp_path):
    bench = load_script("temporal_benchmark")
    fine = bench.Sweep(tmp_path / "fine", [sys.executable, "-c", "print('trained')"], tmp_path / "logs" / "fine.log")
    bench.run_logged(fine)
    assert (tmp_path / "logs" / "fine.log").read_text() == "trained\n"
    broken = [sys.executable, "-c", "import sys; print('the cache is damaged'); sys.exit(3)"]
    ends = r"(?s)broken failed \(exit 3\); its log .*broken.log ends:\nthe cache is damaged"
    with pytest.raises(RuntimeError, match=ends):
        bench.run_logged(bench.Sweep(tmp_path / "broken", broken, tmp_path / "logs" / "broken.log"))
    assert bench.parse_args([str(tmp_path / "b"), "--jobs", "3"]).jobs == 3
    assert bench.parse_args([str(tmp_path / "b")]).jobs == (os.cpu_count() or 1)
    assert bench.parse_args([str(tmp_path / "b"), "--end-to-end"]).jobs == 1  # those runs use the cores
    with pytest.raises(SystemExit):
        bench.parse_args([str(tmp_path / "b"), "--jobs", "0"])
