"""Multi-view evaluation of a checkpoint: `python eval.py ckpt=runs/.../checkpoints/best.pt`.

Also under torchrun (`torchrun --nproc_per_node=8 eval.py ckpt=...`): the videos are split across
ranks without padding and only rank 0 writes the result files.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from squarefuse.apps.checkpoint_dir import register_checkpoint_dir_resolver
from squarefuse.apps.evaluate import run_eval
from squarefuse.apps.user_errors import hydra_errors, user_errors
from squarefuse.config.override_types import check_added_keys, check_override_types
from squarefuse.config.resolvers import register_resolvers

# Before @hydra.main composes the config: configs/eval.yaml names the output folder with them.
register_resolvers()
register_checkpoint_dir_resolver("python eval.py ckpt=PATH/TO/checkpoint.pt")


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    with user_errors(run_dir):
        check_override_types(cfg, "eval")
        check_added_keys("eval", app="eval.py")
        run_eval(cfg, run_dir)


if __name__ == "__main__":
    with hydra_errors():
        main()
