"""Training-data attribution of fine-tunes: `python attribute.py +experiment=source_digits [key=value ...]`."""

import hydra
from omegaconf import DictConfig

from dsire.attribute import attribute
from dsire.errors import report_user_errors


@hydra.main(config_path="configs", config_name="attribute", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    attribute(cfg)


if __name__ == "__main__":
    main()
