"""Top-k classes of your own videos: `python scripts/predict.py ckpt=PATH input=VIDEO|FOLDER|LIST_FILE`.

Options in configs/predict.yaml (`views=1x1` for speed, `topk=3`, `device=cuda`...); results in
<run>/predict/<stamp>/predictions.csv and predictions.json (or hydra.run.dir=...).
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from squarefuse.apps.checkpoint_dir import register_checkpoint_dir_resolver
from squarefuse.apps.predict import run_predict
from squarefuse.apps.user_errors import hydra_errors, user_errors
from squarefuse.config.override_types import check_added_keys
from squarefuse.config.resolvers import register_resolvers

register_resolvers()
register_checkpoint_dir_resolver("python scripts/predict.py ckpt=PATH input=VIDEO|FOLDER|LIST_FILE")


@hydra.main(version_base="1.3", config_path="../configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    with user_errors(run_dir):
        check_added_keys("predict", app="predict.py")
        run_predict(cfg, run_dir)


if __name__ == "__main__":
    with hydra_errors():
        main()
