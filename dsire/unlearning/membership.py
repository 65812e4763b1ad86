"""Membership audit of forgotten examples, with the privacy analysis's attacks.

Before `forget`, the forgotten examples are members; after it, the model is the one a retrain
without them gives, so they should score like examples it never saw (the test split): AUC ≈ 0.5.
Remaining members should keep their scores. Each example is scored by the cluster it is routed to:
the loss attack on that cluster's prediction, and the white-box cos(−g, ΔW) with ΔW that cluster's
merged weight change (g the example's gradient at the public backbone). LiRA is not run here: it
needs shadow models, that is, many whole per-cluster fits on random halves of the private data.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dsire.lab.build import Lab
from dsire.lab.data import Examples
from dsire.lab.gradients import example_gradients
from dsire.lab.methods import weight_change
from dsire.privacy.attacks import gradient_alignment, loss_attack
from dsire.privacy.metrics import summarise
from dsire.unlearning.adapters import predict_logits, trained_module
from dsire.unlearning.clusters import features
from dsire.unlearning.model import UnlearnableModel


def audit_forgotten(
    lab: Lab, before: UnlearnableModel, after: UnlearnableModel, forgotten: list[str], resamples: int
) -> dict:
    """AUC [95% CI] of forgotten and of remaining members against the test split, before and after."""
    gone = set(forgotten)
    private = lab.task.private
    groups = {
        "forgotten": private.subset(np.array([i for i, e in enumerate(private.ids) if e in gone])),
        "remaining": private.subset(np.array([i for i, e in enumerate(private.ids) if e not in gone])),
    }
    report: dict = {}
    for moment, model in (("before", before), ("after", after)):
        outsiders = scores(lab, model, lab.task.test)
        for group, examples in groups.items():
            inside = scores(lab, model, examples)
            for attack in inside:
                values = np.concatenate([inside[attack], outsiders[attack]])
                members = np.concatenate([np.ones(len(examples), bool), np.zeros(len(lab.task.test), bool)])
                summary = summarise(values, members, resamples=resamples)
                report[f"{attack}/{group}/{moment}"] = {"auc": summary["auc"], "auc_ci": summary["auc_ci"]}
    return report


def scores(lab: Lab, model: UnlearnableModel, examples: Examples) -> dict[str, np.ndarray]:
    """{attack: [examples]} membership scores of `examples` under `model` (higher = more likely a member)."""
    losses = F.cross_entropy(predict_logits(model, lab, examples), examples.labels, reduction="none")
    routed = model.route(features(lab.backbone, examples))
    base = dict(lab.backbone.state_dict())
    deltas = {c: weight_change(trained_module(lab, model.seeds[c], model.states[c]), base) for c in model.alive}
    names = sorted({n for delta in deltas.values() for n, d in delta.items() if d.any()})
    white_box = np.zeros(len(examples))
    if names:
        grads = example_gradients(lab.backbone, examples, names)
        flat = torch.cat([grads[n].flatten(1) for n in names], dim=1)
        for cluster, delta in deltas.items():
            chosen = (routed == cluster).numpy()
            if chosen.any():
                change = torch.cat([delta[n].flatten() for n in names])
                white_box[chosen] = gradient_alignment(flat[chosen], change).double().numpy()
    return {"loss": loss_attack(losses.double().numpy()), "white_box": white_box}
