"""Membership audit of a forget request: LiRA with shadow models, the loss attack and the white-box score.

The private split is divided at random (seeded) into never-seen examples N, examples to forget F
(as many as N) and the rest R. The target is the per-cluster model fitted without N; the forget
request then removes F. Before it, F are members and should score like R; after it, the model is
bit for bit one that never saw F, so F should score like N: the AUC of F against N ≈ 0.5, while R
keeps its AUC against N. The never-seen examples come from the private split, not the test split,
because LiRA online needs shadow models that trained on each scored example: each shadow is a
per-cluster model fitted on a random half of the private split (`half_masks`: every example IN
for half of them), its (shadow, cluster) adapters trained together in one lab ensemble (shadows
need not be bit-exact, only the same recipe), and an example's φ is taken from the cluster it is
routed to, as the target computes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dsire.lab.build import Lab
from dsire.lab.data import Examples
from dsire.lab.ensemble import train
from dsire.lab.gradients import flat_gradient_chunks
from dsire.lab.methods import weight_change
from dsire.lab.subsets import half_masks
from dsire.privacy.attacks import gradient_alignment, lira_online, logit_confidence, loss_attack
from dsire.privacy.metrics import summarise
from dsire.settings import require
from dsire.unlearning.adapters import (
    cluster_module,
    cluster_seed,
    fit,
    forget,
    partition,
    predict_logits,
    trained_module,
)
from dsire.unlearning.clusters import ClusterSettings, features
from dsire.unlearning.model import UnlearnableModel

ATTACKS = ("lira_online", "loss", "white_box")
GROUPS = ("forgotten", "remaining")  # each scored against the never-seen examples


@dataclass(frozen=True)
class MembershipSettings:
    """`membership.*`: the audit's shadow models and the share of the private split forgotten."""

    shadow_models: int = 16
    fraction: float = 0.1  # forgotten; as many private examples are held out as never-seen
    seed: int = 0
    resamples: int = 1000  # bootstrap resamples of the AUC intervals
    ensemble_size: int = 64  # shadow adapters trained at once

    def __post_init__(self) -> None:
        require(
            self.shadow_models >= 4 and self.shadow_models % 2 == 0,
            "shadow_models",
            f"{self.shadow_models}: LiRA needs an even number ≥ 4 (≥ 2 IN and 2 OUT models per example)",
        )
        require(0 < self.fraction <= 1 / 3, "fraction", f"{self.fraction} is not in (0, 1/3]")
        require(self.resamples >= 100, "resamples", f"{self.resamples}: at least 100 bootstrap resamples")
        require(self.ensemble_size >= 1, "ensemble_size", f"{self.ensemble_size} must be at least 1")


def audit_forget(lab: Lab, clustering: ClusterSettings, config: dict, settings: MembershipSettings) -> dict:
    """unlearning.json's `membership`: AUC [95% CI] of the forgotten and the remaining examples against
    the never-seen ones, per attack, before and after the forget request."""
    ids = lab.task.private.ids
    order = np.random.default_rng(settings.seed).permutation(len(ids))
    count = round(settings.fraction * len(ids))
    never = {ids[i] for i in order[:count]}
    gone = {ids[i] for i in order[count : 2 * count]}
    before = fit(lab, clustering, config, never)
    request = forget(before, lab, clustering, sorted(gone))
    after = request.model
    shadows, shadow_in = shadow_phis(lab, clustering, before, settings)
    role = np.array(["never_seen" if e in never else "forgotten" if e in gone else "remaining" for e in ids])
    report: dict = {"examples": {r: int((role == r).sum()) for r in ("never_seen", *GROUPS)}}
    report |= {"shadow_models": settings.shadow_models, "clusters_retrained": len(request.retrained)}
    for moment, model in (("before", before), ("after", after)):
        scores = attack_scores(lab, model, shadows, shadow_in)
        for attack, values in scores.items():
            for group in GROUPS:
                chosen = (role == group) | (role == "never_seen")
                summary = summarise(values[chosen], role[chosen] == group, resamples=settings.resamples)
                report[f"{attack}/{group}/{moment}"] = {"auc": summary["auc"], "auc_ci": summary["auc_ci"]}
    return report


def shadow_phis(
    lab: Lab, clustering: ClusterSettings, target: UnlearnableModel, settings: MembershipSettings
) -> tuple[np.ndarray, np.ndarray]:
    """([K, n] φ of every private example under K shadow per-cluster models, [K, n] whether it was IN)."""
    private = lab.task.private
    shadow_in = half_masks(settings.shadow_models, len(private), settings.seed + 1)
    index = {e: i for i, e in enumerate(private.ids)}
    plans = []  # (shadow, its members, its owner) per shadow
    for k in range(settings.shadow_models):
        out = {e for e, inside in zip(private.ids, shadow_in[k], strict=True) if not inside}
        plans.append(partition(lab, target.prototypes, out, clustering.min_size))
    jobs = [(k, c, ids) for k, (members, _) in enumerate(plans) for c, ids in members.items()]
    states: dict[tuple[int, int], tuple[int, dict]] = {}
    for start in range(0, len(jobs), settings.ensemble_size):
        chunk = jobs[start : start + settings.ensemble_size]
        seeds = [cluster_seed(lab.recipe, lab.finetune, c, ids) for _, c, ids in chunk]
        masks = torch.zeros(len(chunk), len(private), dtype=torch.bool)
        for row, (_, _, ids) in enumerate(chunk):
            masks[row, [index[e] for e in ids]] = True
        models = [cluster_module(lab, seed) for seed in seeds]
        ensemble, _ = train(models, private, masks, seeds, lab.finetune)
        for row, ((k, c, _), seed) in enumerate(zip(chunk, seeds, strict=True)):
            states[k, c] = seed, {n: ensemble.stacked[n][row].detach().cpu().clone() for n in ensemble.trainable}
    phis = []
    for k, (members, owner) in enumerate(plans):
        shadow = dataclasses.replace(
            target,
            members=members,
            owner=owner,
            seeds={c: states[k, c][0] for c in members},
            states={c: states[k, c][1] for c in members},
        )
        phis.append(logit_confidence(predict_logits(shadow, lab, private), private.labels).double().numpy())
    return np.stack(phis), shadow_in


def attack_scores(
    lab: Lab, model: UnlearnableModel, shadows: np.ndarray, shadow_in: np.ndarray
) -> dict[str, np.ndarray]:
    """{attack: [n]} membership scores of every private example under `model` (higher = member)."""
    private = lab.task.private
    logits = predict_logits(model, lab, private)
    phi = logit_confidence(logits, private.labels).double().numpy()
    losses = F.cross_entropy(logits, private.labels, reduction="none").double().numpy()
    return {
        "lira_online": lira_online(phi, shadows, shadow_in),
        "loss": loss_attack(losses),
        "white_box": white_box(lab, model, private),
    }


def white_box(lab: Lab, model: UnlearnableModel, examples: Examples) -> np.ndarray:
    """cos(−g, ΔW) of each example with the merged weight change of the cluster it is routed to
    (g its gradient at the public backbone); 0 where no cluster serves it."""
    routed = model.route(features(lab.backbone, examples))
    base = dict(lab.backbone.state_dict())
    deltas = {c: weight_change(trained_module(lab, model.seeds[c], model.states[c]), base) for c in model.alive}
    names = sorted({n for delta in deltas.values() for n, d in delta.items() if d.any()})
    scores = np.zeros(len(examples))
    if names:
        changes = {c: torch.cat([delta[n].flatten() for n in names]) for c, delta in deltas.items()}
        for index, flat in flat_gradient_chunks(lab.backbone, examples, names):
            for cluster, change in changes.items():
                chosen = routed[index] == cluster
                if chosen.any():
                    scores[index[chosen].numpy()] = gradient_alignment(flat[chosen], change).double().cpu().numpy()
    return scores
