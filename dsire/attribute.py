"""`attribute.py`'s job: which private training examples made a lab fine-tune behave as it does on
test queries, by every attribution method, judged by the linear datamodeling score.

Writes `scores.safetensors` (method → [queries, training examples]), `lds.json` ({method: {lds,
ci_low, ci_high}}), `lds_ground_truth.safetensors` (subset masks and per-subset, per-seed query
margins, from which anyone can recompute LDS), `attribution.json` (settings, notes) and top-k
figures under `figures/`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress
from rich.table import Table
from safetensors.torch import save_file

from dsire.atomic import atomic_path, atomic_write_text
from dsire.attribution.diffusion import (
    DiffusionLoRA,
    DiffusionSettings,
    check_trajectory,
    denoising_data,
    denoising_outputs,
    diffusion_trajectory,
    lora_unet,
)
from dsire.attribution.figures import top_k_grid
from dsire.attribution.lds import lds_per_query, mean_interval, measured_outputs, subset_masks
from dsire.attribution.removal import flip_rate, predictions, without_random, without_top
from dsire.attribution.scores import METHODS, Attribution, attribute_problem
from dsire.attribution.scores import attribute as attribute_scores
from dsire.attribution.trajectory import (
    Trajectory,
    check_matches,
    checkpoint_plan,
    flip_labels,
    labels_hash,
    load_trajectory,
    model_at,
    save_trajectory,
    train_trajectory,
)
from dsire.errors import UserError
from dsire.hashing import json_hash, tensors_sha256
from dsire.lab.build import Lab, build_lab, launch
from dsire.lab.data import Examples
from dsire.lab.methods import adapt
from dsire.loggers import (
    Report,
    finish_loggers,
    job_loggers,
    log_figure,
    log_metrics,
    log_table,
    quiet_library_noise,
)
from dsire.settings import from_config, require
from dsire.zoo.recipes import load_base

PIPED_WIDTH = None if sys.stdout.isatty() else 160


@dataclass(frozen=True)
class AttributionSettings:
    """`attribution.*`: the attributed run, the queries and the methods."""

    trajectory: str | None = None
    seed: int = 0
    segments: int = 3
    checkpoints_per_segment: int = 2
    queries: int = 50
    methods: tuple[str, ...] = METHODS
    influence_damping: float | None = None
    source_damping: float = 0.0
    label_noise: float = 0.0
    top_k: int = 6
    figure_queries: int = 4

    def __post_init__(self) -> None:
        require(self.segments >= 1, "segments", f"{self.segments} must be at least 1")
        require(self.checkpoints_per_segment >= 1, "checkpoints_per_segment", "must be at least 1")
        require(self.queries >= 1, "queries", f"{self.queries}: the query set is empty; give at least 1")
        unknown = [m for m in self.methods if m not in METHODS]
        require(not unknown and bool(self.methods), "methods", f"{unknown or 'none'}; allowed: {', '.join(METHODS)}")
        require(self.influence_damping is None or self.influence_damping > 0, "influence_damping", "must be positive")
        require(self.source_damping >= 0, "source_damping", f"{self.source_damping} must be ≥ 0")
        require(0 <= self.label_noise < 1, "label_noise", f"{self.label_noise} is not in [0, 1)")
        require(self.top_k >= 1, "top_k", f"{self.top_k} must be at least 1")


@dataclass(frozen=True)
class LDSSettings:
    """`lds.*`: the retraining that measures the methods."""

    subsets: int = 100
    seeds: int = 2
    alpha: float = 0.5
    ensemble_size: int = 50
    resamples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.subsets >= 3, "subsets", f"{self.subsets}: a rank correlation needs at least 3 subsets")
        require(self.seeds >= 1, "seeds", f"{self.seeds} must be at least 1")
        require(0 < self.alpha < 1, "alpha", f"{self.alpha} is not in (0, 1)")
        require(self.ensemble_size >= 1, "ensemble_size", f"{self.ensemble_size} must be at least 1")
        require(self.resamples >= 1, "resamples", f"{self.resamples} must be at least 1")


@dataclass(frozen=True)
class RemovalSettings:
    """`removal.*`: the subset-removal check (retrain without each query's top-scored examples)."""

    fractions: tuple[float, ...] = (0.01, 0.05)  # of the training set, removed per query; () skips the check
    methods: tuple[str, ...] = ("source", "influence")
    seeds: int = 1

    def __post_init__(self) -> None:
        require(all(0 < f < 1 for f in self.fractions), "fractions", f"{self.fractions}: each must be in (0, 1)")
        unknown = [m for m in self.methods if m not in METHODS]
        require(not unknown, "methods", f"{unknown}; allowed: {', '.join(METHODS)}")
        require(self.seeds >= 1, "seeds", f"{self.seeds} must be at least 1")


@dataclass
class Measured:
    """What either kind of attributed model hands to the report: the scores, the training examples and
    queries, the LDS retraining, and the kind's own summary entries."""

    result: Attribution
    train: Examples
    queries: Examples
    masks: np.ndarray
    outputs: torch.Tensor  # [subsets, seeds, queries]
    summary: dict
    removed: dict


def attribute(cfg: DictConfig) -> dict:
    settings = from_config(AttributionSettings, cfg.get("attribution"), "attribution")
    lds = from_config(LDSSettings, cfg.get("lds"), "lds")
    removal = from_config(RemovalSettings, cfg.get("removal"), "removal")
    missing = [m for m in removal.methods if m not in settings.methods]
    if missing:
        raise UserError("removal.methods", f"{missing} are not in attribution.methods {list(settings.methods)}")
    if cfg.lab.devices * cfg.lab.num_nodes != 1:
        raise UserError("lab.devices", "attribution runs in one process: lab.devices=1 lab.num_nodes=1")
    quiet_library_noise()
    say = Report(quiet=False, width=PIPED_WIDTH)
    cache = Path(cfg.paths.cache_dir) / "attribution"
    with Progress(console=say.console, transient=True) as progress:
        if cfg.get("diffusion") is not None:
            measured = _diffusion(cfg, settings, lds, removal, cache, say, progress)
        else:
            measured = _classification(cfg, settings, lds, removal, cache, say, progress)
    return _report(cfg, settings, lds, removal, measured, say)


def _classification(
    cfg: DictConfig,
    settings: AttributionSettings,
    lds: LDSSettings,
    removal: RemovalSettings,
    cache: Path,
    say: Report,
    progress: Progress,
) -> Measured:
    """A lab classifier: margins measured, the removal check run."""
    fabric = launch(cfg.lab)
    lab = build_lab(cfg, fabric.device)
    train, flipped = _private(lab, settings)
    queries = _queries(lab.task.test, settings)
    template = adapt(lab.backbone, lab.finetune, settings.seed)
    trajectory = _trajectory(lab, settings, train, cache)
    say(f"trajectory: segments at steps {trajectory.boundaries}, η/(1−β) = {trajectory.learning_rate:.3g}")
    result = attribute_scores(
        template,
        trajectory,
        train,
        queries,
        settings.methods,
        settings.influence_damping,
        settings.seed,
        settings.source_damping,
    )
    for note in result.notes:
        say(f"[yellow]curvature: {note}[/yellow]")
    masks = subset_masks(lds.subsets, len(train), lds.alpha, lds.seed)
    key = json_hash([lab.recipe, trajectory.settings, labels_hash(train), queries.ids, lds.subsets, lds.seeds])
    task_id = progress.add_task("LDS retraining", total=lds.subsets * lds.seeds)
    outputs = measured_outputs(
        lambda seed: adapt(lab.backbone, lab.finetune, seed),
        train,
        queries,
        lab.finetune,
        masks,
        lds.seeds,
        lds.ensemble_size,
        cache / f"lds_{key}_a{lds.alpha}_s{lds.seed}",
        lambda n: progress.advance(task_id, n),
    )
    original = _predictions(template, trajectory, queries)
    directory = cache / f"removal_{key}"
    removed = _removal(lab, removal, result.scores, train, queries, original, lds, directory, progress)
    summary = {
        "trajectory": {"boundaries": trajectory.boundaries, "checkpoints": trajectory.checkpoint_steps},
        "learning_rate": trajectory.learning_rate,
        "flipped": [train.ids[i] for i in flipped],
    }
    return Measured(result, train, queries, masks, outputs, summary, removed)


def _diffusion(
    cfg: DictConfig,
    settings: AttributionSettings,
    lds: LDSSettings,
    removal: RemovalSettings,
    cache: Path,
    say: Report,
    progress: Progress,
) -> Measured:
    """A tiny-recipe diffusion LoRA (`zoo` recipe, `diffusion.*`): negative query losses measured."""
    if removal.fractions:
        raise UserError("removal.fractions", "the removal check counts flipped predictions: [] for a diffusion LoRA")
    diffusion = from_config(DiffusionSettings, cfg.diffusion, "diffusion")
    base = load_base(cfg.zoo)
    train, queries = denoising_data(base, diffusion, settings.queries)
    lora = OmegaConf.to_container(cfg.zoo.lora)
    plan = [settings.seed, settings.segments, settings.checkpoints_per_segment]
    key = json_hash([base.fingerprint, lora, dataclasses.asdict(diffusion), train.examples.ids])
    path = cache / f"trajectory_diffusion_{json_hash([key, plan])}.safetensors"
    if settings.trajectory is not None:
        path = Path(settings.trajectory)
    if path.is_file() or settings.trajectory is not None:
        trajectory = load_trajectory(path)
        check_trajectory(trajectory, base, train, diffusion)
    else:
        trajectory = diffusion_trajectory(base, cfg.zoo.lora, train, diffusion, settings.seed, *plan[1:])
        save_trajectory(trajectory, path)
    say(f"trajectory: segments at steps {trajectory.boundaries}, η/(1−β) = {trajectory.learning_rate:.3g}")
    problem = DiffusionLoRA(lora_unet(base, cfg.zoo.lora, settings.seed), train, queries, base.scheduler)
    result = attribute_problem(
        problem, trajectory, settings.methods, settings.influence_damping, settings.seed, settings.source_damping
    )
    for note in result.notes:
        say(f"[yellow]curvature: {note}[/yellow]")
    masks = subset_masks(lds.subsets, len(train), lds.alpha, lds.seed)
    task_id = progress.add_task("LDS retraining", total=lds.subsets * lds.seeds)
    retrains = json_hash([key, queries.examples.ids, lds.subsets, lds.seeds])
    directory = cache / f"lds_diffusion_{retrains}_a{lds.alpha}_s{lds.seed}"
    outputs = denoising_outputs(
        base,
        cfg.zoo.lora,
        train,
        queries,
        diffusion,
        masks,
        lds.seeds,
        directory,
        lambda n: progress.advance(task_id, n),
    )
    summary = {
        "trajectory": {"boundaries": trajectory.boundaries, "checkpoints": trajectory.checkpoint_steps},
        "learning_rate": trajectory.learning_rate,
        "measurement": f"negative denoising loss at {diffusion.draws} fixed (timestep, noise) draws per query",
    }
    return Measured(result, train.examples, queries.examples, masks, outputs, summary, {})


def _report(
    cfg: DictConfig,
    settings: AttributionSettings,
    lds: LDSSettings,
    removal: RemovalSettings,
    measured: Measured,
    say: Report,
) -> dict:
    """LDS per method, the files, the loggers and the terminal table."""
    result, train, queries, masks = measured.result, measured.train, measured.queries, measured.masks
    mean_outputs = measured.outputs.mean(1).numpy()
    per_query = {m: lds_per_query(s.numpy(), masks, mean_outputs) for m, s in result.scores.items()}
    report = {m: _interval(v, lds) for m, v in per_query.items()}
    out = Path(cfg.paths.output_dir)
    _write(out, result.scores, masks, measured.outputs, per_query, train, queries, report)
    summary = measured.summary | {
        "notes": result.notes,
        "lds": report,
        "source_minus": _paired(per_query, lds),
        "removal": measured.removed,
    }
    atomic_write_text(out / "attribution.json", json.dumps(summary, indent=1))
    trainer = job_loggers(cfg, out)
    log_metrics(trainer, {f"lds/{m}": r["lds"] for m, r in report.items()})
    flips = {
        f"removal/{m}/{f}": r for m, rates in measured.removed.get("flip_rate", {}).items() for f, r in rates.items()
    }
    if flips:
        log_metrics(trainer, flips)
    rows = [[m, r["lds"], r["ci_low"], r["ci_high"]] for m, r in report.items()]
    log_table(trainer, "lds", ["method", "lds", "ci_low", "ci_high"], rows, out)
    for method in [m for m in ("source", "influence") if m in result.scores]:
        title = f"{method}: helpful | harmful"
        figure = top_k_grid(result.scores[method], train, queries, settings.top_k, settings.figure_queries, title)
        log_figure(trainer, f"attribution/top_k_{method}", figure, out)
        plt.close(figure)
    finish_loggers(trainer)
    table = Table(title=f"LDS over {len(queries)} queries, {lds.subsets} subsets × {lds.seeds} seeds (95% bootstrap)")
    for column in ("method", "LDS", "95% interval"):
        table.add_column(column)
    for m, r in report.items():
        table.add_row(m, f"{r['lds']:.3f}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    say(table)
    for method, rates in measured.removed["flip_rate"].items() if removal.fractions else ():
        say(f"removal check, {method}: flip rate " + ", ".join(f"{r:.3f} at {f}" for f, r in rates.items()))
    say(f"results: {out / 'lds.json'}, {out / 'scores.safetensors'}, {out / 'figures'}")
    return report


def _paired(per_query: dict[str, np.ndarray], lds: LDSSettings) -> dict[str, dict[str, float]]:
    """Source's LDS minus each other method's, query by query, with its bootstrap interval: the paired
    comparison is sharper than two overlapping intervals."""
    if "source" not in per_query:
        return {}
    return {m: _interval(per_query["source"] - v, lds) for m, v in per_query.items() if m != "source"}


def _predictions(template, trajectory: Trajectory, queries: Examples) -> torch.Tensor:
    model = model_at(template, trajectory.final)
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(queries.take(torch.arange(len(queries))).to(device)).argmax(-1).cpu()


def _removal(
    lab: Lab,
    removal: RemovalSettings,
    scores: dict[str, torch.Tensor],
    train: Examples,
    queries: Examples,
    original: torch.Tensor,
    lds: LDSSettings,
    directory: Path,
    progress: Progress,
) -> dict:
    """Flip rates after removing each query's top-scored examples (per method) or random ones."""
    report: dict = {"removed": {}, "flip_rate": {m: {} for m in (*removal.methods, "random")}}
    for fraction in removal.fractions:
        count = max(1, round(fraction * len(train)))
        report["removed"][str(fraction)] = count
        masks = {m: without_top(scores[m], count) for m in removal.methods}
        masks["random"] = without_random(len(queries), len(train), count, lds.seed)
        for method, keep in masks.items():
            task_id = progress.add_task(f"removal {method} {fraction}", total=len(queries) * removal.seeds)
            predicted = measured_outputs(
                lambda seed: adapt(lab.backbone, lab.finetune, seed),
                train,
                queries,
                lab.finetune,
                keep,
                removal.seeds,
                lds.ensemble_size,
                directory / tensors_sha256({"keep": torch.from_numpy(keep)})[:16],
                lambda n, t=task_id: progress.advance(t, n),
                measure=predictions,
            )
            own = predicted[torch.arange(len(queries)), :, torch.arange(len(queries))]  # query q's own models
            report["flip_rate"][method][str(fraction)] = flip_rate(own.long(), original, queries.labels)
    return report


def _interval(per_query: np.ndarray, lds: LDSSettings) -> dict[str, float]:
    mean, low, high = mean_interval(per_query, lds.resamples, lds.seed)
    return {"lds": mean, "ci_low": low, "ci_high": high}


def _private(lab: Lab, settings: AttributionSettings) -> tuple[Examples, np.ndarray]:
    if settings.label_noise == 0:
        return lab.task.private, np.zeros(0, dtype=int)
    return flip_labels(lab.task.private, settings.label_noise, lab.task.classes, settings.seed)


def _queries(test: Examples, settings: AttributionSettings) -> Examples:
    """A seeded draw of `queries` test examples (all of them if there are fewer)."""
    order = np.random.default_rng(settings.seed).permutation(len(test))
    return test.subset(np.sort(order[: settings.queries]))


def _trajectory(lab: Lab, settings: AttributionSettings, train: Examples, cache: Path) -> Trajectory:
    """The attributed run: a given trajectory file (checked against this task and config), else the
    cached one, else trained now and cached."""
    if settings.trajectory is not None:
        trajectory = load_trajectory(Path(settings.trajectory))
        check_matches(trajectory, lab.recipe, train, lab.finetune, "attribution.trajectory")
        return trajectory
    plan = checkpoint_plan(lab.finetune.steps, settings.segments, settings.checkpoints_per_segment)
    key = json_hash([lab.recipe, lab.finetune, settings.seed, plan, labels_hash(train)])
    path = cache / f"trajectory_{key}.safetensors"
    if path.is_file():
        return load_trajectory(path)
    trajectory = train_trajectory(
        adapt(lab.backbone, lab.finetune, settings.seed), train, lab.finetune, settings.seed, plan, lab.recipe
    )
    save_trajectory(trajectory, path)
    return trajectory


def _write(
    out: Path,
    scores: dict[str, torch.Tensor],
    masks: np.ndarray,
    outputs: torch.Tensor,
    per_query: dict[str, np.ndarray],
    train: Examples,
    queries: Examples,
    report: dict,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ids = {"queries": json.dumps(queries.ids), "examples": json.dumps(train.ids)}
    with atomic_path(out / "scores.safetensors") as tmp:
        save_file({m: s.contiguous() for m, s in scores.items()}, str(tmp), metadata=ids)
    truth = {
        "masks": torch.from_numpy(masks.astype(np.uint8)),
        "margins": outputs.contiguous(),  # [subsets, seeds, queries]
        "query_labels": queries.labels.contiguous(),
        **{f"lds_per_query/{m}": torch.from_numpy(v).float() for m, v in per_query.items()},
    }
    with atomic_path(out / "lds_ground_truth.safetensors") as tmp:
        save_file(truth, str(tmp), metadata=ids)
    atomic_write_text(out / "lds.json", json.dumps(report, indent=1))
