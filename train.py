"""Train a linear RNN with rollout validation: `python train.py model=lru generation.cuda_graph=true`.

Configs live in conf/ (see conf/train.yaml); `python train.py --help` lists the groups.
Multirun: `python train.py -m generation.horizon=64,256 model=lru,s5` (one W&B run per job).
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lrnn_lightning.utils.training import train

    _, objective = train(cfg)
    return objective  # read by sweepers (Optuna) when `optimized_metric` is set


if __name__ == "__main__":
    main()
