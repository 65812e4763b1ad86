"""Experiment loggers that never prompt or hang: W&B runs offline unless the user is logged in.

All W&B state (run files, cache, artifacts, settings) goes under the run's output directory,
never the user's home, so runs are self-contained and work on machines without network.
"""

from __future__ import annotations

import io
import logging
import netrc
import os
import warnings
from pathlib import Path

import hydra
import lightning.pytorch as pl
from lightning.pytorch import loggers
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from dsire.atomic import atomic_write_text, csv_text

log = logging.getLogger(__name__)


class WandbLogger(loggers.WandbLogger):
    """Lightning's W&B logger, without the `anonymous=None` it always passes to `wandb.init` (W&B warns
    that the setting has no effect, on every run)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud logging" not in record.getMessage()


def quiet_library_noise() -> None:
    """Silence, where they are emitted, two library messages every run printed that say nothing about it:
    Lightning's litlogger advert, and the FutureWarning torch raises each time Lightning builds a
    `LeafSpec` (once per `trainer.predict`/`test` call)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )


def log_run_settings(trainer: pl.Trainer, settings: dict) -> None:
    """Every setting that shapes the results (data source, sizes, split, seed, model), not only `model.*`:
    runs on other data must not look identical in W&B."""
    for logger in trainer.loggers:
        logger.log_hyperparams(settings)


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
        if isinstance(logger, loggers.WandbLogger):
            logger.log_image(key, [str(path)])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(key, figure)
    return path


def log_table(trainer: pl.Trainer, key: str, columns: list[str], rows: list[list], output_dir: str | Path) -> Path:
    """Write the table as CSV in the output dir; W&B also gets it as a table."""
    path = Path(output_dir) / "tables" / f"{key.replace('/', '_')}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = csv_text(columns, rows)
    atomic_write_text(path, text)
    for logger in trainer.loggers:
        if isinstance(logger, loggers.WandbLogger):
            logger.log_table(key, columns=columns, data=rows)
        elif isinstance(logger, CSVLogger):
            atomic_write_text(Path(logger.log_dir) / path.name, text)
    return path


def finish_loggers(trainer: pl.Trainer) -> None:
    """Flush every logger; W&B runs are finished so their summary is written (also offline)."""
    for logger in trainer.loggers:
        logger.finalize("success")
        if isinstance(logger, loggers.WandbLogger):
            logger.experiment.finish()


class Report:
    """What a run says: printed on the terminal (rank 0) and logged as text into the run's train.log."""

    def __init__(self, quiet: bool, width: int | None = None):
        self.console = Console(quiet=quiet, width=width)

    def __call__(self, renderable) -> None:
        if self.console.quiet:
            return
        self.console.print(renderable)
        text = Console(file=io.StringIO(), width=200, color_system=None)
        text.print(renderable)
        for line in text.file.getvalue().rstrip().splitlines():
            log.info(line)


def job_loggers(cfg: DictConfig, out: Path) -> pl.Trainer:
    """For analysis jobs that train outside Lightning: a trainer that only holds the configured loggers
    (`cfg.logger`: W&B offline unless logged in, CSV, TensorBoard), every setting of `cfg` logged."""
    prepare_wandb(out)
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = pl.Trainer(logger=loggers or False, accelerator="cpu", devices=1, enable_progress_bar=False)
    log_run_settings(trainer, OmegaConf.to_container(cfg, resolve=True))
    return trainer
