"""`audit.py`'s job: the privacy analyses of fine-tunes made in the lab.

`analysis=mia`: membership-inference audit by method and rank, writing `mia.json`,
`mia_scores.csv` (every score of every attack, so the figures can be recomputed) and figures.
`analysis=noise`: LoRA's implicit noise against the theory, writing `noise.json` and figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import matplotlib.pyplot as plt
from lightning.fabric import Fabric
from omegaconf import DictConfig
from rich.progress import Progress
from rich.table import Table

from dsire.atomic import atomic_write_csv, atomic_write_text
from dsire.errors import UserError
from dsire.lab.build import Lab, build_lab
from dsire.loggers import (
    Report,
    finish_loggers,
    log_figure,
    log_metrics,
    logging_trainer,
    quiet_library_noise,
)
from dsire.privacy.figures import auc_vs_rank, noise_vs_rank, roc_curves
from dsire.privacy.membership import ATTACKS, ConfigurationResult, MembershipSettings, run_membership
from dsire.privacy.noise_study import NoiseSettings, run_noise
from dsire.settings import from_config

ANALYSES = ("mia", "noise")
PIPED_WIDTH = None if sys.stdout.isatty() else 160  # piped output: whole tables, never cropped columns


def audit(cfg: DictConfig) -> dict:
    if cfg.get("analysis") not in ANALYSES:
        raise UserError("analysis", f"{cfg.get('analysis')!r} is not one of {', '.join(ANALYSES)}")
    settings = (
        from_config(MembershipSettings, cfg.get("mia"), "mia")
        if cfg.analysis == "mia"
        else from_config(NoiseSettings, cfg.get("noise"), "noise")
    )
    quiet_library_noise()
    fabric = launch(cfg.lab)
    lab = build_lab(cfg, fabric.device)
    if isinstance(settings, MembershipSettings):
        return _membership(cfg, lab, settings, fabric.is_global_zero)
    return _noise(cfg, lab, settings) if fabric.is_global_zero else {}  # the noise study is one process's work


def _membership(cfg: DictConfig, lab: Lab, settings: MembershipSettings, reporter: bool) -> dict:
    """Every rank trains its share of the models; the reporting rank attacks them and writes the results."""
    say = Report(quiet=not reporter, width=PIPED_WIDTH)
    with Progress(console=say.console, transient=True, disable=not reporter) as progress:
        results = run_membership(lab, settings, progress)
    if not reporter:
        return {}
    out = Path(cfg.paths.output_dir)
    trainer = logging_trainer(cfg, out)
    report = _write_membership(results, lab.task.private.ids, out, trainer, say)
    finish_loggers(trainer)
    return report


def _noise(cfg: DictConfig, lab: Lab, settings: NoiseSettings) -> dict:
    report = run_noise(lab, settings)
    out = Path(cfg.paths.output_dir)
    trainer = logging_trainer(cfg, out)
    _write_noise(report, out, trainer, Report(quiet=False, width=PIPED_WIDTH))
    finish_loggers(trainer)
    return report


def launch(cfg: DictConfig) -> Fabric:
    """`lab.devices` × `lab.num_nodes` processes (Lightning DDP) that share out the models to train."""
    processes = cfg.devices * cfg.num_nodes
    if cfg.devices < 1 or cfg.num_nodes < 1:
        raise UserError("lab.devices", f"{cfg.devices} devices × {cfg.num_nodes} nodes: both must be ≥ 1")
    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy="ddp" if processes > 1 else "auto",
    )
    fabric.launch()
    return fabric


def _write_membership(
    results: list[ConfigurationResult], ids: list[str], out: Path, trainer: pl.Trainer, say: Report
) -> dict:
    report = {r.settings.label: r.summary for r in results}
    atomic_write_text(out / "mia.json", json.dumps(report, indent=1))
    rows = (
        [r.settings.label, attack, target, ids[e], int(r.members[target, e]), float(r.scores[attack][target, e])]
        for r in results
        for attack in ATTACKS
        for target in range(len(r.members))
        for e in range(len(ids))
    )
    atomic_write_csv(out / "mia_scores.csv", ["config", "attack", "target", "example", "member", "score"], rows)
    for step, r in enumerate(results):
        metrics = {f"{r.settings.label}/{a}/auc": s["auc"] for a, s in r.summary["attacks"].items()}
        log_metrics(trainer, {**metrics, f"{r.settings.label}/test_accuracy": r.summary["test_accuracy"]}, step)
    for key, figure in (("mia/roc", roc_curves(results)), ("mia/auc_vs_rank", auc_vs_rank(results))):
        log_figure(trainer, key, figure, out)
        plt.close(figure)
    table = Table(title="membership inference (pooled over target models; 95% bootstrap intervals)")
    for column in (
        "configuration",
        "test acc",
        "AUC (LiRA)",
        "TPR@1%",
        "TPR@0.1%",
        "ε lower bound",
        "AUC loss",
        "AUC white-box",
    ):
        table.add_column(column)
    for r in results:
        s, attacks = r.summary, r.summary["attacks"]
        eps = f"{s['eps_lower_bound']:.2f}" + (f" (DP-SGD ε {s['dpsgd_epsilon']:.3g})" if "dpsgd_epsilon" in s else "")
        table.add_row(
            r.settings.label,
            f"{s['test_accuracy']:.3f}",
            f"{s['auc']:.3f} [{s['auc_ci'][0]:.3f}, {s['auc_ci'][1]:.3f}]",
            f"{s['tpr_at_1pct_fpr']:.3f}",
            f"{s['tpr_at_0.1pct_fpr']:.3f}",
            eps,
            f"{attacks['loss']['auc']:.3f}",
            f"{attacks['white_box']['auc']:.3f}",
        )
    say(table)
    say(f"results: {out / 'mia.json'}, {out / 'mia_scores.csv'}, {out / 'figures'}")
    return report


def _write_noise(report: dict, out: Path, trainer: pl.Trainer, say: Report) -> None:
    atomic_write_text(out / "noise.json", json.dumps(report, indent=1))
    rows = report["per_rank"]
    columns = list(rows[0])
    atomic_write_csv(out / "noise.csv", columns, rows)
    for step, row in enumerate(rows):  # one logged point per (layer, step, init, rank) measurement
        tag = f"noise/{row['layer']}/step{row['step']}/{row['init']}"
        log_metrics(
            trainer, {f"{tag}/{k}": row[k] for k in ("variance_ratio", "ks_distance")} | {"rank": row["rank"]}, step
        )
    figure = noise_vs_rank(rows)
    log_figure(trainer, "noise/vs_rank", figure, out)
    plt.close(figure)
    table = Table(title="LoRA-FA noise: measured / predicted variance (mean over layers and steps)")
    inits = sorted({r["init"] for r in rows})
    for column in ("rank", *(f"{i} ratio" for i in inits), *(f"{i} KS (BE bound)" for i in inits)):
        table.add_column(column)
    for rank in sorted({r["rank"] for r in rows}):
        ratios, distances = [], []
        for init in inits:
            chosen = [r for r in rows if r["rank"] == rank and r["init"] == init]
            ratios.append(f"{sum(r['variance_ratio'] for r in chosen) / len(chosen):.3f}")
            ks = sum(r["ks_distance"] for r in chosen) / len(chosen)
            bound = sum(r["berry_esseen_bound"] for r in chosen) / len(chosen)
            distances.append(f"{ks:.3f} ({bound:.2f})")
        table.add_row(str(rank), *ratios, *distances)
    say(table)
    for layer, comparison in report["whole_run"].items():
        say(
            f"whole LoRA-FA fine-tune vs full, {layer}: cosine {comparison['cosine']:.3f} "
            f"(one-step theory {comparison['predicted_cosine']:.3f}), noise ratio {comparison['noise_ratio']:.2f}"
        )
    say(f"results: {out / 'noise.json'}, {out / 'noise.csv'}, {out / 'figures'}")
