"""Every attribution method's scores for one recorded trajectory: {method: [queries, examples]}."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsire.attribution.curvature import fit_factors, layer_gradients, negative_margin, tracked_modules
from dsire.attribution.source import Segment, cosine_scores, dot_scores, influence_scores, source_scores
from dsire.attribution.trajectory import Trajectory, model_at
from dsire.errors import UserError
from dsire.lab.data import Examples

METHODS = ("source", "influence", "tracin", "gradient_similarity", "random")


@dataclass
class Attribution:
    scores: dict[str, torch.Tensor]  # method -> [queries, examples]
    notes: list[str]  # curvature entries that had to be damped, per segment and layer


def attribute(
    template: nn.Module,
    trajectory: Trajectory,
    train: Examples,
    queries: Examples,
    methods: tuple[str, ...],
    damping: float | None,
    seed: int,
    source_damping: float = 0.0,
) -> Attribution:
    """Scores of `methods` for the model `template` (adapted, untrained) trained along `trajectory`
    on `train`, measured on `queries` (their negative margins at the final checkpoint). `damping` is the
    influence function's (None: kronfluence's heuristic); `source_damping` is added to Source's
    curvature (0: Source as derived, whose own damping is 1/(η̄K))."""
    if len(queries) == 0:
        raise UserError("attribution.queries", "the query set is empty: give at least one query")
    final = model_at(template, trajectory.final)
    modules = tracked_modules(final)
    if not modules:
        raise UserError("finetune.method", "no linear layer trains in this model: nothing to attribute")
    with torch.no_grad():
        logits = final(queries.take(torch.arange(len(queries))).to(next(final.parameters()).device))
    if not torch.isfinite(logits).all():
        raise UserError("finetune.lr", "the trained model outputs NaN or infinity: lower the lr")
    query_final = layer_gradients(final, queries, modules, loss=negative_margin)
    scores, notes = {}, []
    segments, tracin = [], torch.zeros(len(queries), len(train), dtype=torch.float64)
    along = bool({"source", "tracin"} & set(methods))  # the methods that read the checkpoints
    for i, (checkpoints, duration) in enumerate(zip(trajectory.checkpoints, trajectory.durations(), strict=True)):
        if not along:
            break
        mean = {m: 0.0 for m in modules}
        models = [model_at(template, checkpoint) for checkpoint in checkpoints]
        for model in models:  # each checkpoint's gradients serve Source's mean and TracIn's sum
            grads = layer_gradients(model, train, modules)
            mean = {m: mean[m] + grads[m] / len(checkpoints) for m in modules}
            if "tracin" in methods:  # TracIn-CP: η⟨g_q, g_m⟩, each checkpoint standing for its share of steps
                q = layer_gradients(model, queries, modules, loss=negative_margin)
                tracin += duration / len(checkpoints) * dot_scores(q, grads)
        if "source" in methods:
            factors, layer_notes = fit_factors(models, train, modules, seed + i)  # H̄: averaged like ḡ
            notes += [f"segment {i}: {n}" for n in layer_notes]
            segments.append(Segment(duration, trajectory.settings["weight_decay"] + source_damping, factors, mean))
    if "source" in methods:
        scores["source"] = source_scores(query_final, segments, len(train))
    if "tracin" in methods:
        scores["tracin"] = tracin
    train_final = layer_gradients(final, train, modules)
    if "influence" in methods:
        factors, layer_notes = fit_factors([final], train, modules, seed + len(trajectory.checkpoints))
        notes += [f"final checkpoint: {n}" for n in layer_notes]
        scores["influence"] = influence_scores(query_final, factors, train_final, damping)
    if "gradient_similarity" in methods:
        scores["gradient_similarity"] = cosine_scores(query_final, train_final)
    if "random" in methods:
        generator = torch.Generator().manual_seed(seed)
        scores["random"] = torch.randn(len(queries), len(train), generator=generator, dtype=torch.float64)
    return Attribution({m: scores[m].float().cpu() for m in methods}, notes)
