#!/usr/bin/env bash
# The GPU check, one short run on a CUDA machine (about 10 minutes on one H200):
#   1. pytest -m gpu: bf16 step with fused AdamW + compile + EMA + device RandAugment, a 1-process
#      NCCL group, eval on CUDA == eval on CPU, NVDEC decoding == CPU decoding, steps with GPU decoding;
#   2. scripts/benchmark_step.py --preset gpu (ViT-B/16 16x224 bf16): fusion share, loader, clips/s and MFU
#      with a batch in memory and with the real loader (decord), then the train part again with
#      torchcodec on the CPU and with torchcodec NVDEC (dataset.decode_device=cuda).
# Usage: scripts/gpu_check.sh [OUT_DIR]   (JSON results and logs go to OUT_DIR, default gpu_check/)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
workers="${WORKERS:-$(( $(nproc) - 1 ))}"
status=0
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1

timeout 240 python -m pytest -m gpu -n 0 -rs -q -p no:cacheprovider 2>&1 | tee "$out/pytest_gpu.log" || status=1

timeout 180 python scripts/benchmark_step.py --preset gpu --workers "$workers" --steps 8 \
    --json "$out/bench_decord.json" 2>&1 | tee "$out/bench_decord.log" || status=1
timeout 75 python scripts/benchmark_step.py --preset gpu --workers "$workers" --steps 8 --skip fusion loader \
    --override dataset.decoder=torchcodec --json "$out/bench_torchcodec_cpu.json" 2>&1 \
    | tee "$out/bench_torchcodec_cpu.log" || status=1
timeout 75 python scripts/benchmark_step.py --preset gpu --workers "$workers" --steps 8 --skip fusion loader \
    --override dataset.decoder=torchcodec --override dataset.decode_device=cuda \
    --json "$out/bench_torchcodec_nvdec.json" 2>&1 | tee "$out/bench_torchcodec_nvdec.log" || status=1
exit $status
