"""Exact unlearning with per-cluster adapters: `python unlearn.py +experiment=unlearn_digits` fits a
model, `python unlearn.py ckpt=MODEL forget=IDS.csv [mode=retrain]` forgets examples from it."""

import hydra
from omegaconf import DictConfig

from dsire.errors import report_user_errors
from dsire.unlearn import unlearn


@hydra.main(config_path="configs", config_name="unlearn", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    unlearn(cfg)


if __name__ == "__main__":
    main()
