"""Figures of the privacy audits: ROC curves (log-log), AUC against rank, noise against theory."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from dsire.privacy.membership import HEADLINE, ConfigurationResult
from dsire.privacy.metrics import roc


def roc_curves(results: list[ConfigurationResult], attack: str = HEADLINE) -> Figure:
    """One ROC curve per configuration on log-log axes, where the low-FPR regime is visible."""
    figure, axis = plt.subplots(figsize=(6, 5))
    for result in results:
        fpr, tpr = roc(result.scores[attack].ravel(), result.members.ravel())
        axis.plot(fpr, tpr, label=f"{result.settings.label} (AUC {result.summary['attacks'][attack]['auc']:.3f})")
    floor = 0.5 / max(1, int((~results[0].members).sum()))
    axis.plot([floor, 1], [floor, 1], "k:", label="chance")
    axis.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate")
    axis.set(xlim=(floor, 1), ylim=(floor, 1), title=f"membership inference ({attack})")
    axis.legend(fontsize=7, loc="lower right")
    return figure


def auc_vs_rank(results: list[ConfigurationResult], attack: str = HEADLINE) -> Figure:
    """AUC with its 95% interval against LoRA rank; methods without a rank as horizontal bands."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for method in ("lora", "lora_fa"):
        rows = sorted(
            (r.summary["rank"], r.summary["attacks"][attack]) for r in results if r.summary["method"] == method
        )
        if rows:
            ranks = np.array([rank for rank, _ in rows])
            aucs = np.array([a["auc"] for _, a in rows])
            low, high = np.array([a["auc_ci"] for _, a in rows]).T
            axis.errorbar(ranks, aucs, yerr=[aucs - low, high - aucs], marker="o", capsize=3, label=method)
    unranked = [r for r in results if r.summary["rank"] is None]
    for colour, result in enumerate(unranked, start=2):
        summary = result.summary["attacks"][attack]
        axis.axhline(summary["auc"], color=f"C{colour}", linestyle="--", linewidth=1, label=result.settings.label)
        axis.axhspan(*summary["auc_ci"], color=f"C{colour}", alpha=0.08)
    axis.axhline(0.5, color="k", linestyle=":", linewidth=1)
    axis.set(xscale="log", xlabel="LoRA rank r", ylabel=f"AUC ({attack})", title="membership leakage by rank")
    ranks = sorted({r.summary["rank"] for r in results if r.summary["rank"] is not None})
    if ranks:
        axis.set_xticks(ranks, [str(rank) for rank in ranks])
    axis.legend(fontsize=7)
    return figure


def noise_vs_rank(rows: list[dict]) -> Figure:
    """Measured/predicted variance and the distance to a Gaussian (with Berry–Esseen's bound) against r."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for init in sorted({r["init"] for r in rows}):
        ranks = sorted({r["rank"] for r in rows if r["init"] == init})
        ratio = [np.mean([r["variance_ratio"] for r in rows if r["init"] == init and r["rank"] == k]) for k in ranks]
        ks = [np.mean([r["ks_distance"] for r in rows if r["init"] == init and r["rank"] == k]) for k in ranks]
        bound = [
            np.mean([r["berry_esseen_bound"] for r in rows if r["init"] == init and r["rank"] == k]) for k in ranks
        ]
        left.plot(ranks, ratio, marker="o", label=init)
        (line,) = right.plot(ranks, ks, marker="o", label=f"{init}: KS distance")
        right.plot(ranks, bound, linestyle="--", color=line.get_color(), label=f"{init}: Berry–Esseen bound")
    left.axhspan(0.95, 1.05, color="green", alpha=0.1, label="±5%")
    left.axhline(1.0, color="k", linewidth=1)
    left.set(xscale="log", xlabel="rank r", ylabel="measured / predicted variance", title="noise variance vs theory")
    right.axhline(rows[0]["ks_floor"], color="k", linestyle=":", label="sampling floor")
    right.set(xscale="log", yscale="log", xlabel="rank r", ylabel="distance to N(0, 1)", title="Gaussianity")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    return figure
