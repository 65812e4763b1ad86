"""Figures of unlearning.json: accuracy against the fraction forgotten, the cost of one request, and the
membership AUCs before and after a forget."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

METHODS = ("per_cluster", "global_adapter", "sisa", "full_finetune")


def accuracy_vs_forgotten(report: dict) -> Figure:
    """Test accuracy against the fraction of private data forgotten, one panel per deletion kind."""
    kinds = sorted({row["kind"] for row in report["deletions"]})
    figure, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), sharey=True, squeeze=False)
    for axis, kind in zip(axes[0], kinds, strict=True):
        rows = sorted((r for r in report["deletions"] if r["kind"] == kind), key=lambda r: r["fraction"])
        for method in METHODS:
            xs = [0.0] + [r["fraction"] for r in rows]
            ys = [report["accuracy_before"][method]] + [r["accuracy"][method] for r in rows]
            axis.plot(xs, ys, marker="o", label=method)
        axis.axhline(report["accuracy_before"]["public_backbone"], color="k", linestyle=":", label="public backbone")
        axis.set(xlabel="fraction of private data forgotten", title=f"{kind} deletions")
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7)
    return figure


def cost_per_request(report: dict) -> Figure:
    """Parameters retrained, seconds and examples reprocessed per single-example request (log scale)."""
    costs = report["cost_per_request"]
    names = list(costs)
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for axis, key in zip(axes, ("parameters_retrained", "seconds", "examples_reprocessed"), strict=True):
        axis.bar(names, [costs[n][key] for n in names])
        axis.set(yscale="log", title=key.replace("_", " "))
        axis.tick_params(axis="x", rotation=30, labelsize=7)
    return figure


def membership_before_after(report: dict) -> Figure:
    """AUC [95% CI] against never-seen examples, per attack: forgotten and remaining, before and after."""
    membership = report["membership"]
    attacks = sorted({key.split("/")[0] for key in membership if key.count("/") == 2})
    figure, axes = plt.subplots(1, len(attacks), figsize=(4.5 * len(attacks), 4), sharey=True, squeeze=False)
    for axis, attack in zip(axes[0], attacks, strict=True):
        for offset, group in ((-0.15, "forgotten"), (0.15, "remaining")):
            cells = [membership[f"{attack}/{group}/{moment}"] for moment in ("before", "after")]
            aucs = [c["auc"] for c in cells]
            errors = [[c["auc"] - c["auc_ci"][0] for c in cells], [c["auc_ci"][1] - c["auc"] for c in cells]]
            axis.errorbar([offset, 1 + offset], aucs, yerr=errors, fmt="o", capsize=4, label=group)
        axis.axhline(0.5, color="k", linestyle=":")
        axis.set(xticks=[0, 1], xticklabels=["before forget", "after forget"], title=attack, xlim=(-0.6, 1.6))
    axes[0][0].set_ylabel("AUC against never-seen examples (95% CI)")
    axes[0][-1].legend(fontsize=7)
    return figure
