"""Privacy audits of fine-tunes: `python audit.py +experiment=mia_rank|lora_noise [key=value ...]`."""

import hydra
from omegaconf import DictConfig

from dsire.audit import audit
from dsire.errors import report_user_errors


@hydra.main(config_path="configs", config_name="audit", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    audit(cfg)


if __name__ == "__main__":
    main()
