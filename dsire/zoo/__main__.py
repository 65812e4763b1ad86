"""`python -m dsire.zoo zoo=tiny`: build (or resume) a zoo from a recipe config."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dsire.errors import report_user_errors
from dsire.zoo.sweep import run_sweep


@hydra.main(config_path="../../configs", config_name="zoo_sweep", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run_sweep(cfg.zoo, workers=cfg.workers)


if __name__ == "__main__":
    main()
