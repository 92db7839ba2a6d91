"""Export a trained model: `python scripts/export.py ckpt=PATH format=onnx|torchscript`.

The file takes a normalised clip [B,T,C,H,W] and returns logits; export.json says the shapes, the
mean/std and the class names. Options in configs/export.yaml.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from squarefuse.apps.checkpoint_dir import register_checkpoint_dir_resolver
from squarefuse.apps.export import run_export
from squarefuse.apps.user_errors import hydra_errors, user_errors
from squarefuse.config.resolvers import register_resolvers

register_resolvers()
register_checkpoint_dir_resolver("python scripts/export.py ckpt=PATH format=onnx|torchscript")


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    with user_errors(run_dir, also=(RuntimeError,)):
        run_export(cfg, run_dir)


if __name__ == "__main__":
    with hydra_errors():
        main()
