"""`unlearn.py`'s job: fit a model of per-cluster adapters, or forget private examples from one.

Without `ckpt`: fit on the task's private split and write `<run>/model.safetensors` and `fit.json`.
With `ckpt=MODEL forget=IDS.csv`: `mode=forget` retrains only the clusters that lose examples,
`mode=retrain` trains every cluster from scratch on the remaining data with the same recipe; both
write the new model (to `out`, default `<run>/model.safetensors`, atomically, so `out=MODEL`
replaces the old one only once the new one is whole) and `receipt.json` beside it.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import matplotlib.pyplot as plt
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from dsire.atomic import atomic_write_text
from dsire.errors import UserError
from dsire.hashing import file_sha256, tensors_sha256
from dsire.lab.build import Lab, build_lab
from dsire.loggers import Report, finish_loggers, job_loggers, log_figure, log_metrics, quiet_library_noise
from dsire.settings import from_config
from dsire.unlearning.adapters import deterministic, fit, forget, predict_logits, retrain
from dsire.unlearning.clusters import ClusterSettings
from dsire.unlearning.evaluation import EvaluationSettings, evaluate
from dsire.unlearning.figures import METHODS, accuracy_vs_forgotten, cost_per_request, membership_before_after
from dsire.unlearning.membership import ATTACKS, GROUPS, MembershipSettings, audit_forget
from dsire.unlearning.model import UnlearnableModel, load_model, save_model

MODES = ("forget", "retrain")
PIPED_WIDTH = None if sys.stdout.isatty() else 160  # piped output: whole tables, never cropped columns
log = logging.getLogger(__name__)


def unlearn(cfg: DictConfig) -> dict:
    if cfg.get("mode") not in MODES:
        raise UserError("mode", f"{cfg.get('mode')!r} is not one of {', '.join(MODES)}")
    quiet_library_noise()
    if cfg.get("ckpt") is None and cfg.get("forget") is not None:
        raise UserError("forget", "needs ckpt=MODEL, the model to forget from")
    with deterministic():
        return _fit(cfg) if cfg.get("ckpt") is None else _forget(cfg)


def _progress(cluster: int, members: int) -> None:
    log.info(f"training cluster {cluster} on {members} examples")


def fit_inputs(cfg: DictConfig) -> tuple[Lab, ClusterSettings, dict]:
    """What `fit` takes from an unlearn config: the lab, the clustering settings and the recipe (the
    settings a model records, so that `forget` retrains with them)."""
    clustering = from_config(ClusterSettings, cfg.unlearning.clustering, "unlearning.clustering")
    lab = build_lab(cfg)
    recipe = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("task", "finetune", "unlearning")}
    return lab, clustering, recipe


def _fit(cfg: DictConfig) -> dict:
    evaluation = (
        None if cfg.get("evaluation") is None else from_config(EvaluationSettings, cfg.evaluation, "evaluation")
    )
    membership = (
        None if cfg.get("membership") is None else from_config(MembershipSettings, cfg.membership, "membership")
    )
    lab, clustering, recipe = fit_inputs(cfg)
    started = time.perf_counter()
    model = fit(lab, clustering, recipe, progress=_progress)
    seconds = time.perf_counter() - started
    out = Path(cfg.paths.output_dir)
    save_model(model, _model_path(cfg))
    report = {
        "test_accuracy": accuracy(model, lab),
        "clusters": len(model.prototypes),
        "clusters_with_members": len(model.alive),
        "members": {str(c): len(ids) for c, ids in model.members.items()},
        "parameters_per_cluster": model.adapter_parameters(model.alive[0]),
        "parameters_backbone": sum(p.numel() for p in lab.backbone.parameters()),
        "seconds": seconds,
    }
    atomic_write_text(out / "fit.json", json.dumps(report, indent=1))
    trainer = job_loggers(cfg, out)
    log_metrics(trainer, {k: v for k, v in report.items() if isinstance(v, int | float)})
    results = {} if evaluation is None else evaluate(lab, model, clustering, evaluation)
    if membership is not None:
        results["membership"] = audit_forget(lab, clustering, recipe, membership)
    if results:
        _write_evaluation(results, out, trainer)
    finish_loggers(trainer)
    Report(quiet=False, width=PIPED_WIDTH)(
        f"{len(model.alive)} clusters with private members of {len(model.prototypes)}; test accuracy "
        f"{report['test_accuracy']:.4f}; model: {_model_path(cfg)}"
    )
    return report


def _forget(cfg: DictConfig) -> dict:
    if cfg.get("forget") is None and cfg.mode == "forget":
        raise UserError("forget", "missing; give the CSV of examples to forget (forget=IDS.csv, column `example`)")
    ckpt = Path(cfg.ckpt)
    old_hash = file_sha256(ckpt) if ckpt.is_file() else None
    old = load_model(ckpt)
    lab = lab_of(old, cfg)
    clustering = from_config(ClusterSettings, old.config["unlearning"]["clustering"], "unlearning.clustering")
    requested = [] if cfg.get("forget") is None else read_ids(Path(cfg.forget), lab.task.private.ids)
    started = time.perf_counter()
    result = (forget if cfg.mode == "forget" else retrain)(old, lab, clustering, requested, progress=_progress)
    seconds = time.perf_counter() - started
    path = _model_path(cfg)
    new = result.model
    save_model(new, path)
    receipt = {
        "mode": cfg.mode,
        "request": str(cfg.get("forget")),
        "examples_forgotten": result.forgotten,
        "already_forgotten": result.already_forgotten,
        "duplicates_ignored": result.duplicates,
        "clusters_retrained": result.retrained,
        "clusters_removed": result.removed,
        "parameters_retrained": sum(new.adapter_parameters(c) for c in result.retrained),
        "parameters_total": sum(new.adapter_parameters(c) for c in new.alive)
        + sum(p.numel() for p in lab.backbone.parameters()),
        "examples_reprocessed": result.examples_reprocessed,
        "seconds": seconds,
        "old_model": str(ckpt),
        "old_model_sha256": old_hash,
        "new_model": str(path),
        "new_model_sha256": file_sha256(path),
        "test_accuracy": accuracy(new, lab),
    }
    atomic_write_text(path.parent / "receipt.json", json.dumps(receipt, indent=1))
    Report(quiet=False, width=PIPED_WIDTH)(
        f"forgot {len(result.forgotten)} examples: retrained clusters {result.retrained} "
        f"({receipt['parameters_retrained']} of {receipt['parameters_total']} parameters) in {seconds:.2f} s; "
        f"removed clusters {result.removed}; "
        f"receipt: {path.parent / 'receipt.json'}"
    )
    return receipt


def _write_evaluation(report: dict, out: Path, trainer: pl.Trainer) -> None:
    atomic_write_text(out / "unlearning.json", json.dumps(report, indent=1))
    figures = (
        ("unlearning/accuracy", accuracy_vs_forgotten, "deletions"),
        ("unlearning/cost", cost_per_request, "cost_per_request"),
        ("unlearning/membership", membership_before_after, "membership"),
    )
    for key, draw, needs in figures:
        if needs in report:
            figure = draw(report)
            log_figure(trainer, key, figure, out)
            plt.close(figure)
    say = Report(quiet=False, width=PIPED_WIDTH)
    if "deletions" in report:
        log_metrics(trainer, {f"unlearning/{k}": v for k, v in report["goals"].items()})
        say(_accuracy_table(report))
        say(_cost_table(report))
    if "membership" in report:
        say(_membership_table(report["membership"]))
    say(f"results: {out / 'unlearning.json'}, {out / 'figures'}")


def _accuracy_table(report: dict) -> Table:
    table = Table(title="accuracy before and after forgetting (test split)")
    for column in ("deletion", "examples", *METHODS):
        table.add_column(column)
    table.add_row("none", "0", *(f"{report['accuracy_before'][m]:.4f}" for m in METHODS))
    for row in report["deletions"]:
        cells = (f"{row['accuracy'][m]:.4f}" for m in METHODS)
        table.add_row(f"{row['kind']} {row['fraction']:.2f}", str(row["examples"]), *cells)
    return table


def _cost_table(report: dict) -> Table:
    costs = Table(title="cost of forgetting one example (median over requests)")
    keys = ("parameters_retrained", "seconds", "cpu_seconds", "examples_reprocessed")
    for column in ("method", *keys):
        costs.add_column(column.replace("_", " "))
    for name, cost in report["cost_per_request"].items():
        costs.add_row(name, *(f"{cost[k]:.3f}" if "seconds" in k else f"{cost[k]:.0f}" for k in keys))
    return costs


def _membership_table(membership: dict) -> Table:
    table = Table(title="membership AUC against never-seen private examples [95% CI]")
    for column in ("attack", "group", "before forget", "after forget"):
        table.add_column(column)
    for attack in ATTACKS:
        for group in GROUPS:
            cells = (membership[f"{attack}/{group}/{moment}"] for moment in ("before", "after"))
            table.add_row(
                attack, group, *(f"{c['auc']:.3f} [{c['auc_ci'][0]:.3f}, {c['auc_ci'][1]:.3f}]" for c in cells)
            )
    return table


def lab_of(model: UnlearnableModel, cfg: DictConfig) -> Lab:
    """The lab the model was fitted in (its stored task and fine-tune settings, this run's paths),
    refused unless its backbone is the very one the model's adapters were trained on."""
    settings = {"task": model.config["task"], "finetune": model.config["finetune"], "paths": cfg.paths}
    lab = build_lab(OmegaConf.create(settings))
    if lab.recipe != model.recipe or tensors_sha256(lab.backbone.state_dict()) != model.backbone_sha256:
        raise UserError("ckpt", f"{cfg.ckpt}: its public backbone cannot be rebuilt here (another recipe or code)")
    return lab


def read_ids(path: Path, private_ids: list[str]) -> list[str]:
    """The private ids listed in the CSV's `example` column, each an id (`digits/17`) or the file name
    of exactly one private example; in file order, duplicates kept (the caller counts them)."""
    if not path.is_file():
        raise UserError("forget", f"{path} is not a file (a CSV with an `example` column)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if "example" not in (reader.fieldnames or []):
            raise UserError(str(path), f"no `example` column (columns: {reader.fieldnames or 'none'})")
        listed = [(line, row["example"]) for line, row in enumerate(reader, start=2)]
    known = set(private_ids)
    by_name: dict[str, list[str]] = {}
    for example in private_ids:
        by_name.setdefault(Path(example).name, []).append(example)
    ids = []
    for line, value in listed:
        if value in known:
            ids.append(value)
        elif len(by_name.get(value, [])) == 1:
            ids.append(by_name[value][0])
        elif value in by_name:
            raise UserError(
                str(path), f"line {line}: {value!r} names {len(by_name[value])} private examples; give its id"
            )
        else:
            raise UserError(str(path), f"line {line}: {value!r} is not a private example of the model's task")
    return ids


def accuracy(model: UnlearnableModel, lab: Lab) -> float:
    return float((predict_logits(model, lab, lab.task.test).argmax(1) == lab.task.test.labels).float().mean())


def _model_path(cfg: DictConfig) -> Path:
    return Path(cfg.out) if cfg.get("out") else Path(cfg.paths.output_dir) / "model.safetensors"
