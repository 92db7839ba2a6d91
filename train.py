"""Train a video classifier: `python train.py [group=option ...] [key=value ...]` (see README).

Also `torchrun --nproc_per_node=N train.py ...` and `python train.py -m hydra/launcher=slurm ...`.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from squarefuse.apps.user_errors import hydra_errors, user_errors
from squarefuse.config.override_types import check_override_types
from squarefuse.config.resolvers import register_resolvers
from squarefuse.training.trainer import check_train_config, train

# Before @hydra.main composes the config: configs/train.yaml names the run folder with them.
register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    with user_errors(run_dir):
        check_override_types(cfg, "train")
        check_train_config(cfg)  # before the data is generated or anything is written
        summary = train(cfg, run_dir)
    if summary["status"] == "interrupted" and not HydraConfig.get().mode.name == "MULTIRUN":
        sys.exit(128 + summary["signal"])


if __name__ == "__main__":
    with hydra_errors():
        main()
