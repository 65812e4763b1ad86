"""Every attribution method's scores for one recorded trajectory: {method: [queries, examples]}.

The methods only need, at any checkpoint, the training examples' and the queries' per-example layer
gradients and the EK-FAC curvature of the training loss; a `Problem` supplies those, so the classifier
(`Classification`: cross-entropy, margins) and the diffusion LoRA (`dsire.attribution.diffusion`:
denoising loss) share every method.
"""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from dsire.attribution.curvature import Factors, fit_factors, layer_gradients, negative_margin, tracked_modules
from dsire.attribution.source import Segment, cosine_scores, dot_scores, influence_scores, source_scores
from dsire.attribution.trajectory import Trajectory, model_at
from dsire.errors import UserError
from dsire.lab.data import Examples

METHODS = ("source", "influence", "tracin", "gradient_similarity", "random")
Gradients = dict[str, torch.Tensor]  # {module: [examples, out, in]}


@dataclass
class Attribution:
    scores: dict[str, torch.Tensor]  # method -> [queries, examples]
    notes: list[str]  # curvature entries that had to be damped, per segment and layer


class Problem(Protocol):
    """What the methods read of a trained model: built from a trajectory's tensors, its tracked layers,
    per-example gradients of the training loss and of the queries' measurements, and the curvature."""

    train_size: int
    query_size: int

    def model_at(self, tensors: dict[str, torch.Tensor]) -> nn.Module: ...

    def check(self, final: nn.Module) -> None: ...

    def train_gradients(self, model: nn.Module, modules: list[str]) -> Gradients: ...

    def query_gradients(self, model: nn.Module, modules: list[str]) -> Gradients: ...

    def factors(self, models: list[nn.Module], modules: list[str], seed: int) -> tuple[Factors, list[str]]: ...


@dataclass
class Trained:
    """What every problem holds: the adapted, untrained model and its training and query examples."""

    template: nn.Module
    train: Sized
    queries: Sized

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def query_size(self) -> int:
        return len(self.queries)

    def model_at(self, tensors: dict[str, torch.Tensor]) -> nn.Module:
        return model_at(self.template, tensors)


@dataclass
class Classification(Trained):
    """A classifier fine-tuned on `train`; a query's measurement is its negative margin."""

    train: Examples
    queries: Examples

    def check(self, final: nn.Module) -> None:
        with torch.no_grad():
            logits = final(self.queries.take(torch.arange(len(self.queries))).to(next(final.parameters()).device))
        if not torch.isfinite(logits).all():
            raise UserError("finetune.lr", "the trained model outputs NaN or infinity: lower the lr")

    def train_gradients(self, model: nn.Module, modules: list[str]) -> Gradients:
        return layer_gradients(model, self.train, modules)

    def query_gradients(self, model: nn.Module, modules: list[str]) -> Gradients:
        return layer_gradients(model, self.queries, modules, loss=negative_margin)

    def factors(self, models: list[nn.Module], modules: list[str], seed: int) -> tuple[Factors, list[str]]:
        return fit_factors(models, self.train, modules, seed)


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
    """Scores of `methods` for the classifier `template` (adapted, untrained) trained along `trajectory`
    on `train`, measured on `queries` (their negative margins at the final checkpoint)."""
    if len(queries) == 0:
        raise UserError("attribution.queries", "the query set is empty: give at least one query")
    problem = Classification(template, train, queries)
    return attribute_problem(problem, trajectory, methods, damping, seed, source_damping)


def attribute_problem(
    problem: Problem,
    trajectory: Trajectory,
    methods: tuple[str, ...],
    damping: float | None,
    seed: int,
    source_damping: float = 0.0,
) -> Attribution:
    """Scores of `methods` for `problem` trained along `trajectory`. `damping` is the influence
    function's (None: kronfluence's heuristic); `source_damping` is added to Source's curvature (0:
    Source as derived, whose own damping is 1/(η̄K))."""
    final = problem.model_at(trajectory.final)
    modules = tracked_modules(final)
    if not modules:
        raise UserError("finetune.method", "no linear layer trains in this model: nothing to attribute")
    problem.check(final)
    query_final = problem.query_gradients(final, modules)
    scores, notes = {}, []
    segments, tracin = [], torch.zeros(problem.query_size, problem.train_size, dtype=torch.float64)
    along = bool({"source", "tracin"} & set(methods))  # the methods that read the checkpoints
    for i, (checkpoints, duration) in enumerate(zip(trajectory.checkpoints, trajectory.durations(), strict=True)):
        if not along:
            break
        mean = {m: 0.0 for m in modules}
        models = [problem.model_at(checkpoint) for checkpoint in checkpoints]
        for model in models:  # each checkpoint's gradients serve Source's mean and TracIn's sum
            grads = problem.train_gradients(model, modules)
            mean = {m: mean[m] + grads[m] / len(checkpoints) for m in modules}
            if "tracin" in methods:  # TracIn-CP: η⟨g_q, g_m⟩, each checkpoint standing for its share of steps
                tracin += duration / len(checkpoints) * dot_scores(problem.query_gradients(model, modules), grads)
        if "source" in methods:
            factors, layer_notes = problem.factors(models, modules, seed + i)  # H̄: averaged like ḡ
            notes += [f"segment {i}: {n}" for n in layer_notes]
            segments.append(Segment(duration, trajectory.settings["weight_decay"] + source_damping, factors, mean))
    if "source" in methods:
        scores["source"] = source_scores(query_final, segments, problem.train_size)
    if "tracin" in methods:
        scores["tracin"] = tracin
    train_final = problem.train_gradients(final, modules)
    if "influence" in methods:
        factors, layer_notes = problem.factors([final], modules, seed + len(trajectory.checkpoints))
        notes += [f"final checkpoint: {n}" for n in layer_notes]
        scores["influence"] = influence_scores(query_final, factors, train_final, damping)
    if "gradient_similarity" in methods:
        scores["gradient_similarity"] = cosine_scores(query_final, train_final)
    if "random" in methods:
        generator = torch.Generator().manual_seed(seed)
        scores["random"] = torch.randn(problem.query_size, problem.train_size, generator=generator, dtype=torch.float64)
    return Attribution({m: scores[m].float().cpu() for m in methods}, notes)
