"""Per-video features of a trained model: `python scripts/extract.py ckpt=PATH [split=val | input=PATH]`.

Also under torchrun (`torchrun --nproc_per_node=8 scripts/extract.py ckpt=...`): every video is
extracted once by one rank, rank 0 writes features.npy + videos.csv. Options in configs/extract.yaml.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from squarefuse.apps.checkpoint_dir import register_checkpoint_dir_resolver
from squarefuse.apps.extract import run_extract
from squarefuse.apps.user_errors import hydra_errors, user_errors
from squarefuse.config.resolvers import register_resolvers

register_resolvers()
register_checkpoint_dir_resolver("python scripts/extract.py ckpt=PATH [split=val | input=PATH]")


@hydra.main(version_base="1.3", config_path="../configs", config_name="extract")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    with user_errors(run_dir):
        run_extract(cfg, run_dir)


if __name__ == "__main__":
    with hydra_errors():
        main()
