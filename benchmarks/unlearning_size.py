"""Size recovery after a forget: does a cluster's LoRA after forgetting look like one trained on fewer examples?

dsire's premise is that a LoRA's spectra carry the size of its fine-tuning set. Exact unlearning
gives a direct check: after `forget` removes k of a cluster's N members, the cluster's adapter is bit
for bit one trained on the N − k left, so it should sit among adapters trained on N − k, not among
those trained on N, if the spectra carry the size at all.

Fits the per-cluster model of an unlearn experiment (default `unlearn_digits`) and takes its largest
cluster (N members). References: the cluster's adapter trained with the same recipe on `--repeats`
random subsets of each size in `--sizes` (fractions of N; at N the references differ only in seed),
all in one lab ensemble (as the audit's shadows: the recipe, not the bits). Queries: the fitted
adapter ("before", N members) and, for each size in `--forget-to`, the adapters after `--requests`
seeded forget requests that leave that many members (each retrains the cluster alone, as `forget`
always does). Features: the singular values of each LoRA layer's ΔW = s·B·A
(`dsire.spectra.lowrank_spectra`). Statistics: ‖ΔW‖_F and σ₁ (summed over layers) and the head's
change ‖Δhead‖_F; Spearman ρ with the size over the references; a query's implied size is the
reference size whose median statistic is nearest, and for the spectra as a whole the mean size of
its `--repeats` nearest references (standardised singular values). Deterministic.

    python -m benchmarks.unlearning_size [--experiment unlearn_digits] [--sizes 0.25 0.5 0.75 1]
        [--forget-to 0.5 0.75] [--repeats 8] [--requests 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from scipy.stats import spearmanr

from benchmarks.report import command_line, write_section
from dsire.lab.build import Lab
from dsire.lab.ensemble import train
from dsire.project import ROOT
from dsire.spectra import lowrank_spectra
from dsire.unlearn import fit_inputs
from dsire.unlearning.adapters import cluster_module, cluster_seed, deterministic, fit, forget

REFERENCE = 1000  # reference r's cluster index in its seed: apart from every real cluster's
STATISTICS = ("‖ΔW‖_F", "σ₁(ΔW)", "‖Δhead‖_F")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="unlearn_digits")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--forget-to", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("unlearn", overrides=[f"+experiment={args.experiment}", f"paths.root_dir={ROOT}"])
    lab, clustering, recipe = fit_inputs(cfg)
    rng = np.random.default_rng(0)
    with deterministic():
        model = fit(lab, clustering, recipe)
        cluster = max(model.alive, key=lambda c: (len(model.members[c]), -c))
        members = model.members[cluster]
        sizes = sorted({round(f * len(members)) for f in args.sizes})
        subsets = [[pick(members, n, rng) for _ in range(args.repeats)] for n in sizes]
        references = train_references(lab, [s for row in subsets for s in row])
        queries = [("before", len(members), model.states[cluster])]
        for target in sorted({round(f * len(members)) for f in args.forget_to}):
            for _ in range(args.requests):
                gone = [e for e in members if e not in set(pick(members, target, rng))]
                queries.append(("after", target, forget(model, lab, clustering, gone).model.states[cluster]))
    write_section(f"unlearning_size_{args.experiment}", report(args, lab, len(members), sizes, references, queries))


def pick(members: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """n of `members`, at random, in their split order."""
    return [members[i] for i in sorted(rng.choice(len(members), size=n, replace=False))]


def train_references(lab: Lab, subsets: list[list[str]]) -> list[dict[str, torch.Tensor]]:
    """The trainable tensors of one adapter per subset, trained together with the cluster's recipe."""
    index = {e: i for i, e in enumerate(lab.task.private.ids)}
    seeds = [cluster_seed(lab.recipe, lab.finetune, REFERENCE + r, s) for r, s in enumerate(subsets)]
    masks = torch.zeros(len(subsets), len(lab.task.private), dtype=torch.bool)
    for row, subset in enumerate(subsets):
        masks[row, [index[e] for e in subset]] = True
    ensemble, _ = train([cluster_module(lab, s) for s in seeds], lab.task.private, masks, seeds, lab.finetune)
    return [{n: ensemble.stacked[n][m].detach().cpu() for n in ensemble.trainable} for m in range(len(subsets))]


def features(lab: Lab, state: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(singular values of every LoRA layer's ΔW, concatenated; the statistics of STATISTICS)."""
    scale = (lab.finetune.alpha or lab.finetune.rank) / lab.finetune.rank
    names = sorted(n for n in state if "lora_A" in n)
    sigma = torch.stack(
        [lowrank_spectra(state[n.replace("lora_A", "lora_B")], state[n], scale, torch.float64).delta for n in names]
    )
    public = lab.backbone.head
    head = [state[n] - (public.weight if n.endswith("weight") else public.bias) for n in state if ".head." in n]
    stats = [sigma.square().sum(-1).sqrt().sum(), sigma[:, 0].sum(), torch.cat([h.flatten() for h in head]).norm()]
    return sigma.flatten().numpy(), np.array([float(v) for v in stats])


def report(
    args: argparse.Namespace,
    lab: Lab,
    members: int,
    sizes: list[int],
    references: list[dict[str, torch.Tensor]],
    queries: list[tuple[str, int, dict[str, torch.Tensor]]],
) -> str:
    """benchmarks/README.md's section: how each statistic follows the size, and where the queries sit."""
    size = np.repeat(sizes, args.repeats)
    spectra, stats = map(np.array, zip(*(features(lab, state) for state in references), strict=True))
    spread = spectra.std(0) + 1e-12  # standardised: layers and ranks weigh alike
    medians = np.array([np.median(stats[size == n], axis=0) for n in sizes])  # [sizes, statistics]
    rows = []
    for j, name in enumerate(STATISTICS):
        rho = spearmanr(size, stats[:, j]).statistic
        cells = " | ".join(f"{m:.4g}" for m in medians[:, j])
        rows.append(f"| {name} | {rho:+.2f} | {cells} |")
    verdicts, placed = [], {}
    for kind, truth, state in queries:
        point, stat = features(lab, state)
        implied = [sizes[int(np.abs(medians[:, j] - stat[j]).argmin())] for j in range(len(STATISTICS))]
        distance = np.linalg.norm((spectra - point) / spread, axis=1)
        nearest = float(size[np.argsort(distance)[: args.repeats]].mean())
        cells = " | ".join(str(n) for n in implied)
        verdicts.append(f"| {kind} | {truth} | {cells} | {nearest:.1f} |")
        if kind == "after":  # (k-NN mean n, nearer its own size than the size before the forget?)
            placed.setdefault(truth, []).append((nearest, abs(nearest - truth) < abs(nearest - members)))
    summary = "; ".join(
        f"left with {n}: k-NN mean n {np.mean([m for m, _ in v]):.1f} on average, "
        f"{sum(near for _, near in v)} of {len(v)} nearer {n} than {members}"
        for n, v in sorted(placed.items())
    )
    size_header = " | ".join(f"n = {n}" for n in sizes)
    return f"""
## Exact unlearning: does a forgotten cluster's LoRA look like one trained on fewer examples?

`{command_line()}` (`{args.experiment}`, LoRA {lab.finetune.label} on {", ".join(lab.finetune.target_modules)}, the
largest cluster: {members} private members). References: {args.repeats} adapters of that cluster per
size n, each on a random subset of n members (same recipe, own seed). Spearman ρ of each statistic
with n over the {len(size)} references, and its median per size:

| statistic | Spearman ρ with n | {size_header} |
| --- | ---: | {" | ".join(["---:"] * len(sizes))} |
{chr(10).join(rows)}

Where the fitted adapter (before, {members} members) and the adapters after forget requests sit:
the size each statistic implies (the n whose median is nearest), and the mean n of the
{args.repeats} nearest references in standardised singular values (k-NN):

| adapter | members | {" | ".join(f"implied by {n}" for n in STATISTICS)} | k-NN mean n |
| --- | ---: | {" | ".join(["---:"] * len(STATISTICS))} | ---: |
{chr(10).join(verdicts)}

After the forget requests ({members} before): {summary}.
"""


if __name__ == "__main__":
    main()
