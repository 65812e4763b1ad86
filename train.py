"""Fit and evaluate DSiRe on a zoo: `python train.py [+experiment=NAME] [key=value ...]`."""

import hydra
from omegaconf import DictConfig

from dsire.errors import report_user_errors
from dsire.train import train


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
