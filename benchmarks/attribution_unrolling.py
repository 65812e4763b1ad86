"""Source against exact unrolled differentiation on a tiny MLP: autograd through every SGD step
(momentum included, the lab's own batches) gives each training example's exact effect on each
query's margin; Source (the real pipeline: lab trajectory, kronfluence EK-FAC per segment) should
approach it as the number of segments L grows. Writes benchmarks/README.md and a figure.

    python -m benchmarks.attribution_unrolling [--examples 64] [--steps 300] [--segments 1 2 3 6 12]
        [--fit-seeds 0 100] [--fisher-draws 32]

`--fit-seeds` refits the curvature with other true-Fisher label draws (the exact effects do not change);
`--fisher-draws` fits it with each example repeated, i.e. that many label draws per example and checkpoint.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr
from torch.func import functional_call

from benchmarks.report import command_line, write_section
from dsire.attribution.curvature import Factors, fit_factors, negative_margin
from dsire.attribution.scores import Classification, attribute_problem
from dsire.attribution.trajectory import checkpoint_plan, train_trajectory
from dsire.lab.backbones import BackboneSettings, build_backbone
from dsire.lab.data import Examples, TaskSettings, load_task
from dsire.lab.ensemble import batch_indices
from dsire.lab.methods import FinetuneSettings, adapt
from dsire.project import ROOT


def exact_effects(
    model: torch.nn.Module, train: Examples, queries: Examples, settings: FinetuneSettings, seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """d margin_q / d w_m [queries, examples] where example m's loss is weighted (1 + w_m) in every batch
    (Source's sign: positive raises the margin), by autograd through the whole momentum-SGD run."""
    weights = torch.zeros(len(train), dtype=torch.float64, requires_grad=True)
    params = {n: p.detach().double().requires_grad_(True) for n, p in model.named_parameters()}
    velocity = {n: torch.zeros_like(p) for n, p in params.items()}
    x, y = train.take(torch.arange(len(train))).double(), train.labels
    indices = batch_indices(torch.ones(len(train), dtype=torch.bool), seed, settings.steps, settings.batch_size)
    for idx in indices:
        logits = functional_call(model, params, (x[idx],))
        loss = (F.cross_entropy(logits, y[idx], reduction="none") * (1 + weights[idx])).mean()
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        for (n, p), g in zip(list(params.items()), grads, strict=True):
            velocity[n] = settings.momentum * velocity[n] + g
            params[n] = p - settings.lr * velocity[n]
    qx = queries.take(torch.arange(len(queries))).double()
    logits = functional_call(model, params, (qx,))
    rows = [
        torch.autograd.grad(negative_margin(logits[i : i + 1], queries.labels[i : i + 1]), weights, retain_graph=True)[
            0
        ]
        for i in range(len(queries))
    ]
    return -torch.stack(rows), {n: p.detach().float() for n, p in params.items()}


@dataclass
class RepeatedFisher(Classification):
    """The classifier problem with its curvature fitted on `draws` copies of every training example:
    as many sampled labels per example (one copy is `Classification` itself)."""

    draws: int = 1

    def factors(self, models: list[torch.nn.Module], modules: list[str], seed: int) -> tuple[Factors, list[str]]:
        n = len(self.train)
        copies = Examples(
            self.train.labels.repeat(self.draws), self.train.ids * self.draws, lambda idx: self.train.take(idx % n)
        )
        return fit_factors(models, copies, modules, seed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--segments", type=int, nargs="+", default=[1, 2, 3, 6, 12])
    parser.add_argument("--fit-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--fisher-draws", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    task = load_task(TaskSettings(private_limit=args.examples))
    backbone = build_backbone(BackboneSettings(hidden=16, layers=1), task.input_shape, task.classes)
    settings = FinetuneSettings(method="full", steps=args.steps, batch_size=16, lr=0.05, momentum=0.9)
    template = adapt(backbone.requires_grad_(False), settings, 0)
    train, queries = task.private, task.test.subset(np.arange(args.queries))
    exact, final = exact_effects(template, train, queries, settings, seed=0)
    problem = RepeatedFisher(template, train, queries, args.fisher_draws)
    rows, errors, correlations = [], {s: [] for s in args.fit_seeds}, {s: [] for s in args.fit_seeds}
    for segments in args.segments:
        trajectory = train_trajectory(template, train, settings, 0, checkpoint_plan(args.steps, segments, 2), "bench")
        drift = max(float((trajectory.final[n] - final[n]).abs().max()) for n in final)
        for fit_seed in args.fit_seeds:
            scores = attribute_problem(problem, trajectory, ("source", "influence"), None, fit_seed).scores
            source = scores["source"].double()
            error = float((source - exact).norm() / exact.norm())
            correlation = float(np.mean([pearsonr(source[q], exact[q])[0] for q in range(len(queries))]))
            influence = float(np.mean([pearsonr(scores["influence"][q], exact[q])[0] for q in range(len(queries))]))
            errors[fit_seed].append(error)
            correlations[fit_seed].append(correlation)
            row = f"| {segments} | {fit_seed} | {error:.3f} | {correlation:.3f} | {influence:.3f} | {drift:.1e} |"
            rows.append(row)
    figure, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    for fit_seed in args.fit_seeds:
        left.plot(args.segments, errors[fit_seed], "o-", label=f"Fisher seed {fit_seed}")
        right.plot(args.segments, correlations[fit_seed], "o-", label=f"Fisher seed {fit_seed}")
    left.set(xlabel="segments L", ylabel="‖Source − exact‖ / ‖exact‖", xscale="log")
    right.set(xlabel="segments L", ylabel="mean Pearson r with exact", xscale="log")
    left.legend(fontsize=7)
    figure.suptitle(f"{args.fisher_draws} Fisher label draw(s) per example", fontsize=8)
    figure.tight_layout()
    suffix = "" if args.fisher_draws == 1 else f"_draws{args.fisher_draws}"
    path = ROOT / "benchmarks" / "figures" / f"attribution_unrolling{suffix}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    markdown = f"""## Attribution: Source against exact unrolled differentiation, {args.fisher_draws} Fisher draw(s)

`{command_line()}`: MLP 64 → 16 → 10 from a random initialisation, {len(train)} private digits,
{args.steps} SGD steps (batch 16, lr 0.05, momentum 0.9); exact effects by autograd through every step
(float64), Source by the real pipeline (lab trajectory, kronfluence EK-FAC averaged over each segment's two
checkpoints, true Fisher with {args.fisher_draws} label draw(s) per example, fitted with each "Fisher seed")
on {len(queries)} queries; r is Pearson's, per query. The influence function does not depend on L: its
spread is the Fisher's sampling noise. "drift": the largest difference between the unrolled run's final
weights and the lab's (the same run twice). Figure: `benchmarks/figures/attribution_unrolling{suffix}.png`.

| L | Fisher seed | relative error of Source | mean r (Source, exact) | mean r (EK-FAC IF, exact) | drift |
| ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(rows)}
"""
    write_section(f"attribution_unrolling{suffix}", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
