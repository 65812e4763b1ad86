"""`train.py`'s job: featurise a zoo, evaluate DSiRe over concept-grouped splits, save a model.

1. Featurise every LoRA once (`trainer.predict`: spectra on the module's device, cached on disk;
   under `trainer=ddp` each process reads its share of the files and all gather the features).
2. For each split: fit on the training concepts (with `model/select=auto`, model selection by an inner
   concept CV on those concepts only), `trainer.test` on the held-out ones; callbacks log figures, the
   metrics of each split go to every logger.
3. Log mean ± std over splits, write `metrics.json`, fit on all concepts, save the checkpoint; the
   configuration chosen in each split and for the saved model is printed, in `metrics.json` and
   logged as hyperparameters (`selected/...`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import lightning.pytorch as pl
import numpy as np
from omegaconf import DictConfig, OmegaConf
from rich.table import Table
from rich.text import Text

from dsire.atomic import atomic_write_text
from dsire.data.datamodule import LoRAZooDataModule
from dsire.data.splits import Split
from dsire.featurise import featurise
from dsire.loggers import Report, finish_loggers, log_metrics, log_run_settings, prepare_wandb, quiet_library_noise
from dsire.models.checkpoint import save_checkpoint
from dsire.models.features import Features
from dsire.models.module import DSiReModule
from dsire.settings import require_device

SCALARS = ("accuracy", "mae", "mape", "regression_mae", "coverage", "interval_width", "mismatch_rate")
UNSEEN = (  # with data.train_sizes: unseen sizes, those between trained sizes and those beyond their range
    "mae_seen",
    "regression_mae_unseen",
    "regression_mae_between",
    "regression_mae_beyond",
    "coverage_unseen",
)


def build(cfg: DictConfig) -> tuple[LoRAZooDataModule, pl.Trainer]:
    """The data module and trainer; their settings and the model's are checked here, before any work."""
    require_device("trainer.accelerator", cfg.trainer.accelerator)
    datamodule: LoRAZooDataModule = hydra.utils.instantiate(cfg.data)
    hydra.utils.instantiate(cfg.model)  # refuses a bad model.* value now, not after featurisation
    quiet_library_noise()
    prepare_wandb(cfg.paths.output_dir)
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values()]
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    log_run_settings(trainer, {key: resolved[key] for key in ("seed", "data", "model", "trainer")})
    return datamodule, trainer


def new_model(cfg: DictConfig, datamodule: LoRAZooDataModule) -> DSiReModule:
    model: DSiReModule = hydra.utils.instantiate(cfg.model)
    model.cache = datamodule.cache
    return model


def leave_out_copies(features: Features, datamodule: LoRAZooDataModule) -> Features:
    """Keep one of each set of LoRAs with identical spectra (see `Features.copies`); the others
    are reported as skipped and left out of every split."""
    copies = features.copies()
    if not copies:
        return features
    kept = features.select(~np.isin(features.keys, list(copies)))
    kept.errors = features.errors | {
        key: f"the same spectra as {first}: a copy, left out so it cannot sit on both sides of a split"
        for key, first in copies.items()
    }
    datamodule.entries = [e for e in datamodule.entries if e.key not in copies]
    return kept


def summarize(per_split: list[dict]) -> dict[str, float]:
    """Mean and std over splits of every metric the splits report."""
    summary = {}
    for name in SCALARS + UNSEEN:
        values = np.array([r[name] for r in per_split if name in r])
        if len(values):
            summary[f"{name}_mean"], summary[f"{name}_std"] = float(values.mean()), float(values.std())
    return summary


def train(cfg: DictConfig) -> dict:
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, trainer = build(cfg)
    say = Report(quiet=not trainer.is_global_zero)  # every rank holds the same results; one reports
    datamodule.setup("fit")
    model = new_model(cfg, datamodule)
    features, sources = featurise(model, trainer, datamodule.predict_dataloader())
    say(f"spectra: {sources}")
    features = leave_out_copies(features, datamodule)
    for key, problem in features.errors.items():
        say(Text.assemble(("skipped", "red"), f" {key}: {problem}"))
    per_split = []
    for i, split in enumerate(datamodule.splits_of(features.concepts)):
        model = fit_split(new_model(cfg, datamodule), features, split, datamodule.train_sizes)
        trainer.test(model, datamodule.loader(datamodule.entries_of(split.test)), verbose=False)
        results = model.test_results
        if model.selection is not None:
            results["selection"] = model.selection.report()
        per_split.append(results)
        log_metrics(trainer, {f"split/{k}": results[k] for k in SCALARS + UNSEEN if k in results}, step=i)
    summary = summarize(per_split)
    log_metrics(trainer, summary, step=len(per_split))
    _print(summary, per_split, cfg, say)
    report = {"summary": summary, "splits": per_split, "skipped": features.errors}
    if trainer.is_global_zero:  # one rank fits and saves the model (loggers log on this rank only)
        final = _fit_final(cfg, datamodule, features)
        if final.selection is not None:
            report["selection"] = final.selection.report()
            _print_selection([r["selection"] for r in per_split], report["selection"], say)
            log_run_settings(trainer, {"selected": selected_settings(per_split, report["selection"])})
        report["checkpoint"] = str(save_checkpoint(final, Path(cfg.paths.output_dir) / "dsire.safetensors"))
        out = Path(cfg.paths.output_dir)
        atomic_write_text(out / "metrics.json", json.dumps(finite(report), indent=1, allow_nan=False))
        say(f"model: {report['checkpoint']}\nmetrics: {out / 'metrics.json'}")
    finish_loggers(trainer)
    return report


def finite(value):
    """`value` with every NaN or infinite float replaced by None: JSON has no such numbers."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fit_split(model: DSiReModule, features: Features, split: Split, train_sizes: tuple[int, ...] | None) -> DSiReModule:
    """`model` fitted on the split's training concepts (and `train_sizes`, None: all) only: its
    selection never sees the held-out concepts."""
    sizes = np.isin(features.n, train_sizes) if train_sizes else np.ones(len(features.n), bool)
    return model.fit(features.select(np.isin(features.concepts, split.train) & sizes))


def _fit_final(cfg: DictConfig, datamodule: LoRAZooDataModule, features: Features) -> DSiReModule:
    """Fit on every concept: the model the checkpoint saves for `predict.py`."""
    model = new_model(cfg, datamodule).fit(features)
    model.metadata = {
        "source": json.dumps(OmegaConf.to_container(cfg.data.source, resolve=True)),
        "sizes": json.dumps(sorted(set(features.n.tolist()))),
        "loras": str(len(features.keys)),
    }
    return model


def selected_settings(per_split: list[dict], final: dict) -> dict:
    """The chosen configurations as flat hyperparameters: `final/<setting>` and `split<i>/<setting>`."""
    chosen = {"final": final["chosen"]} | {f"split{i}": r["selection"]["chosen"] for i, r in enumerate(per_split)}
    return {f"{where}/{key}": str(value) for where, settings in chosen.items() for key, value in settings.items()}


def _print_selection(per_split: list[dict], final: dict, say: Report) -> None:
    """One line per split and one for the saved model: what the inner CV chose, with its inner scores."""

    def line(selection: dict) -> str:
        c = selection["chosen"]
        vote = f"k={c['k']} {c['weighting']} {c['voter_weights']} weights" if c["answer"] == "vote" else "estimate"
        text = f"voters {c['voters']} num_sv={c['num_sv']} {c['normalisation']} {vote}"
        if selection["inner_mae"] is None:
            return f"{text} ({selection['note']})"
        return f"{text} (inner MAE {selection['inner_mae']:.3f}, accuracy {selection['inner_accuracy']:.3f})"

    for i, selection in enumerate(per_split):
        say(f"selected, split {i}: {line(selection)}")
    say(f"selected, saved model: {line(final)}")


def _print(summary: dict, per_split: list[dict], cfg: DictConfig, say: Report) -> None:
    table = Table(title=f"DSiRe, {len(per_split)} concept-grouped splits ({cfg.data.split.protocol})")
    for column in ("metric", "mean", "std"):
        table.add_column(column)
    for name in SCALARS + UNSEEN:
        if f"{name}_mean" in summary:
            table.add_row(name, f"{summary[f'{name}_mean']:.3f}", f"{summary[f'{name}_std']:.3f}")
    say(table)
    sizes = sorted({s for r in per_split for s in r["per_size_accuracy"]})
    per_size = {
        s: np.mean([r["per_size_accuracy"][s] for r in per_split if s in r["per_size_accuracy"]]) for s in sizes
    }
    say("accuracy per N: " + ", ".join(f"{s}: {a:.2f}" for s, a in per_size.items()))
