"""Per-video features of a trained model: `python scripts/extract.py ckpt=PATH [split=val | input=PATH]`.

Also under torchrun (`torchrun --nproc_per_node=8 scripts/extract.py ckpt=...`): every video is
extracted once by one rank, rank 0 writes features.npy + videos.csv. Options in configs/extract.yaml.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from squarefuse.engine import distributed  # noqa: E402
from squarefuse.engine.extract_app import run_extract  # noqa: E402
from squarefuse.engine.inference import register_checkpoint_dir_resolver  # noqa: E402

register_checkpoint_dir_resolver("python scripts/extract.py ckpt=PATH [split=val | input=PATH]")


@hydra.main(version_base="1.3", config_path="../configs", config_name="extract")
def main(cfg: DictConfig) -> None:
    try:
        run_extract(cfg, HydraConfig.get().runtime.output_dir)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    distributed.agree_on_run_stamp()
    sys.argv += distributed.hydra_rank_overrides()
    main()
