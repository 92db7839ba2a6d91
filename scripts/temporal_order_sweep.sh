#!/usr/bin/env bash
# The README's temporal-order table, from scratch: every temporal fusion option x seeds 0, 1, 2
# trained on the built-in synthetic videos, each best.pt evaluated with its frames in order and
# reversed, then scripts/report.py over the sweep (tables and plots in SWEEP_DIR/report/).
#
#   bash scripts/temporal_order_sweep.sh [SWEEP_DIR] [train.py overrides ...]
#   bash scripts/temporal_order_sweep.sh multirun/quick trainer.epochs=2    # a smoke run
#
# About 50 minutes on 2 CPU cores (measured 50 min 51 s, README). Prints the time of each phase.
set -euo pipefail
cd "$(dirname "$0")/.."

sweep_dir=${1:-multirun/temporal_order_$(date +%Y-%m-%d_%H-%M-%S)}
shift $(($# > 0 ? 1 : 0))
if [[ -e $sweep_dir ]]; then
    echo "error: $sweep_dir exists; give a new sweep folder (runs are never overwritten)" >&2
    exit 2
fi

start=$SECONDS
python train.py -m fusion=square,none,temporal_attn,temporal_shift,temporal_conv trainer.seed=0,1,2 \
    hydra.sweep.dir="$sweep_dir" "$@"
trained=$SECONDS

shopt -s nullglob
checkpoints=("$sweep_dir"/*/checkpoints/best.pt)
if ((${#checkpoints[@]} == 0)); then
    echo "error: no best.pt under $sweep_dir/*/checkpoints/ (did validation run?)" >&2
    exit 1
fi
for ckpt in "${checkpoints[@]}"; do
    python eval.py ckpt="$ckpt" progress=false
    python eval.py ckpt="$ckpt" frame_order=reversed progress=false
done
evaluated=$SECONDS

python scripts/report.py "$sweep_dir"
echo "sweep $sweep_dir: training $((trained - start)) s, evaluation $((evaluated - trained)) s," \
    "report $((SECONDS - evaluated)) s, total $((SECONDS - start)) s"
