"""The project root (where `configs/`, `data/` and `logs/` are), for configs as `${dsire_root:}`.

Paths in the configs resolve from it, not from the current directory, so `python /path/to/train.py`
works from anywhere and leaves nothing behind where it was started. `DSIRE_ROOT` overrides it.
"""

from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]

OmegaConf.register_new_resolver("dsire_root", lambda: str(ROOT), replace=True)
