"""Cache a frozen backbone's per-frame tokens: `python scripts/cache_tokens.py ckpt=PATH split=train out=CACHE`.

Also under torchrun (`torchrun --nproc_per_node=8 scripts/cache_tokens.py ...`): every video is
cached once by one rank. Train on the cache with `python train.py dataset=tokens dataset.root=CACHE`.
Options in configs/cache_tokens.yaml.
"""

import sys

import hydra
from omegaconf import DictConfig

from squarefuse.apps.cache_tokens import run_cache_tokens
from squarefuse.apps.user_errors import EXIT_CODE, hydra_errors
from squarefuse.config.resolvers import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="cache_tokens")
def main(cfg: DictConfig) -> None:
    try:
        run_cache_tokens(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CODE)


if __name__ == "__main__":
    with hydra_errors():
        main()
