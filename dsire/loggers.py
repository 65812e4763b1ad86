"""Experiment loggers that never prompt or hang: W&B runs offline unless the user is logged in.

All W&B state (run files, cache, artifacts, settings) goes under the run's output directory,
never the user's home, so runs are self-contained and work on machines without network.
"""

from __future__ import annotations

import io
import netrc
import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure
from omegaconf import OmegaConf


def wandb_logged_in() -> bool:
    """True when an API key is available without asking: WANDB_API_KEY or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def prepare_wandb(output_dir: str | Path) -> None:
    """Point every W&B directory into the run and forbid prompts; offline without a key."""
    root = Path(output_dir) / "wandb"
    for variable, sub in (
        ("WANDB_DIR", ""),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        os.environ.setdefault(variable, str(root / sub))
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_CODE", "true")
    if not wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"


OmegaConf.register_new_resolver("wandb_offline", lambda: not wandb_logged_in(), replace=True)


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def log_figure(trainer: pl.Trainer, key: str, figure: Figure, output_dir: str | Path) -> Path:
    """Save `figure` as PNG in the output dir and hand it to every logger that shows images."""
    path = Path(output_dir) / "figures" / f"{key.replace('/', '_')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [str(path)])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(key, figure)
    return path


def log_table(trainer: pl.Trainer, key: str, columns: list[str], rows: list[list], output_dir: str | Path) -> Path:
    """Write the table as CSV in the output dir; W&B also gets it as a table."""
    path = Path(output_dir) / "tables" / f"{key.replace('/', '_')}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    buffer.write(",".join(columns) + "\n")
    buffer.writelines(",".join(map(str, row)) + "\n" for row in rows)
    path.write_text(buffer.getvalue())
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key, columns=columns, data=rows)
        elif isinstance(logger, CSVLogger):
            (Path(logger.log_dir) / path.name).write_text(buffer.getvalue())
    return path


def finish_loggers(trainer: pl.Trainer) -> None:
    """Flush every logger; W&B runs are finished so their summary is written (also offline)."""
    for logger in trainer.loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
