"""Fit and evaluate DSiRe on a zoo: `python train.py [+experiment=NAME] [key=value ...]`."""

import hydra
from omegaconf import DictConfig

from dsire.errors import exit_on_user_error
from dsire.train import train


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
