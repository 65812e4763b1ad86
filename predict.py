"""How many images was this LoRA trained on? `python predict.py ckpt=PATH lora=FILE_OR_DIR`."""

import sys

import hydra
from omegaconf import DictConfig

from dsire.errors import report_user_errors
from dsire.predict import run


@hydra.main(config_path="configs", config_name="predict", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


if __name__ == "__main__":
    main()
