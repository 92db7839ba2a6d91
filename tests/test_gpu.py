"""The CUDA paths: `pytest -m gpu` (scripts/gpu_check.sh runs them with the GPU benchmark).

Skipped, with the reason, where CUDA is absent. Each test is small (a 2-block ViT at 32 px,
a few steps) so that the whole file runs in a minute or two on one GPU.
"""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from helpers.checkpoints import run_evaluate
from helpers.configs import tiny_train_config

from squarefuse.datasets import build_dataset
from squarefuse.datasets.decoding.video_reader import open_video
from squarefuse.models import build_classifier
from squarefuse.runtime import distributed
from squarefuse.training.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"),
]


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_bf16_step_with_fused_adamw_compile_ema_and_device_randaugment(data_root, tmp_path):
    cfg = tiny_train_config(
        data_root,
        "trainer.device=cuda",
        "trainer.precision=bf16",
        "trainer.compile=true",
        "trainer.ema.enabled=true",
        "trainer.val_every=0",
        "dataset.augment_on_device=true",
        "dataset.randaug_n=2",
        "dataset.randaug_m=7",
        "dataset.random_erasing=0.25",
    )
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.device.type == "cuda" and trainer.precision == "bf16"
    assert trainer.optimizer.defaults.get("fused") is True
    assert trainer.device_augment is not None and trainer.ema is not None
    before, ema_before = _params(trainer.model), _params(trainer.ema.module)
    batches = iter(trainer.loader)
    for _ in range(2):
        loss, _ = trainer.train_step(batches)
        assert torch.isfinite(loss), loss
    assert trainer.state.step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, trainer.ema.module.parameters(), strict=True))
    assert all(p.device.type == "cuda" for p in trainer.ema.module.parameters())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_nccl_group():
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "nccl"
        x = torch.arange(4.0, device="cuda")
        assert torch.equal(distributed.all_reduce_sum(x.clone()), x)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_eval_on_cuda_equals_eval_on_cpu(data_root):
    cfg = tiny_train_config(data_root)
    val_set = build_dataset(cfg.dataset, "val", views=True)
    torch.manual_seed(0)
    model = build_classifier(cfg.backbone, cfg.fusion, cfg.head, val_set.num_classes).eval()
    results = {}
    for name in ("cpu", "cuda"):
        device = torch.device(name)
        results[name] = run_evaluate(copy.deepcopy(model).to(device), val_set, device=device, batch_size=4)
    cpu, cuda = results["cpu"], results["cuda"]
    assert cpu.num_videos == cuda.num_videos > 0
    assert torch.allclose(cpu.probs, cuda.probs.cpu(), atol=1e-3), (cpu.probs - cuda.probs.cpu()).abs().max()
    assert cpu.loss == pytest.approx(cuda.loss, abs=1e-3)


@pytest.mark.torchcodec
@pytest.mark.parametrize("ext", [".mp4", ".webm"])
def test_gpu_decoding_equals_cpu_decoding(make_video, tmp_path, ext):
    from torchcodec.decoders import VideoDecoder  # noqa: PLC0415 - optional dependency

    path = make_video(tmp_path / f"v{ext}", num_frames=30, width=128, height=96)
    indices = [0, 7, 8, 15, 29]
    with open_video(path, "decord") as video:
        cpu = video.get_frames(indices).permute(0, 3, 1, 2)
    decoder = VideoDecoder(str(path), device="cuda", seek_mode="exact", dimension_order="NCHW")
    gpu = decoder.get_frames_at(indices).data
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape
    diff = (gpu.cpu().float() - cpu.float()).abs()
    # NVDEC's YUV->RGB conversion rounds differently from swscale's: a few levels, no more.
    assert diff.mean() < 3 and diff.max() < 40, (diff.mean(), diff.max())


@pytest.mark.torchcodec
def test_training_steps_with_gpu_decoding(data_root, tmp_path):
    cfg = tiny_train_config(
        data_root, "trainer.device=cuda", "trainer.val_every=0", "dataset.decode_device=cuda", "dataset.repeated_aug=2"
    )
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.gpu_decoder is not None
    batches = iter(trainer.loader)
    loss, _ = trainer.train_step(batches)
    assert torch.isfinite(loss) and trainer.state.step == 1 and trainer.state.num_replaced == 0
