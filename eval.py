"""Multi-view evaluation of a checkpoint: `python eval.py ckpt=runs/.../checkpoints/best.pt`.

Also under torchrun (`torchrun --nproc_per_node=8 eval.py ckpt=...`): the videos are split across
ranks without padding and only rank 0 writes the result files.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from squarefuse.engine.checkpoint import check_checkpoint_file
from squarefuse.engine.eval_app import default_eval_dir, run_eval
from squarefuse.engine.hydra_resolvers import register_resolvers
from squarefuse.engine.override_types import check_override_types


def _eval_dir(ckpt: str | None) -> str:
    # Hydra resolves this before creating the run dir; raised here, an error would come wrapped
    # in a page of interpolation traceback, so exit with the message alone.
    if ckpt is None:
        sys.exit("error: ckpt is required: python eval.py ckpt=PATH/TO/checkpoint.pt")
    try:
        check_checkpoint_file(ckpt)  # before Hydra makes an eval folder next to a file that is no checkpoint
        return default_eval_dir(ckpt)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


# Before @hydra.main composes the config: configs/eval.yaml names the output folder with them.
register_resolvers()
OmegaConf.register_new_resolver("eval_dir", _eval_dir, use_cache=True, replace=True)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    check_override_types(cfg, "eval")
    run_eval(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
