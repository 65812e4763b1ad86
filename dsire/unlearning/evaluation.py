"""How good and how cheap the per-cluster model is, against the ways to forget without it.

On one task: test accuracy before and after forgetting fractions of the private split (random
examples, and whole classes), and the cost of one single-example forget request (parameters
retrained, seconds, examples reprocessed), beside
- one global adapter (the same LoRA + head) on all private data: the accuracy ceiling; forgetting
  means retraining it;
- full fine-tuning of the backbone on all private data: forgetting means retraining it;
- SISA: as many hash shards as clusters, the same adapter per shard, predictions averaged over
  shards; forgetting retrains the shards that held the examples;
- retraining the whole private stage from scratch (every cluster).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from dsire.lab.build import Lab
from dsire.lab.ensemble import train, train_on_all
from dsire.lab.methods import FinetuneSettings, adapt
from dsire.settings import require
from dsire.unlearning.adapters import (
    cluster_module,
    cluster_seed,
    fit,
    forget,
    predict_logits,
    train_cluster,
    trained_module,
)
from dsire.unlearning.clusters import ClusterSettings
from dsire.unlearning.model import UnlearnableModel

COSTED = ("per_cluster", "sisa", "retrain_private_stage", "global_adapter", "full_finetune")
T = TypeVar("T")
GLOBAL = -1  # the cluster index of the global adapter (its seed is then not any cluster's)


@dataclass(frozen=True)
class EvaluationSettings:
    """`evaluation.*`: which deletions to measure, and how many single-example requests to time."""

    fractions: tuple[float, ...] = (0.1, 0.25, 0.5)
    requests: int = 5  # single-example forget requests timed for the cost table
    seed: int = 0

    def __post_init__(self) -> None:
        require(all(0 < f < 1 for f in self.fractions), "fractions", f"{list(self.fractions)}: each in (0, 1)")
        require(self.requests >= 1, "requests", f"{self.requests} must be at least 1")


def evaluate(lab: Lab, model: UnlearnableModel, clustering: ClusterSettings, settings: EvaluationSettings) -> dict:
    """unlearning.json's tables for `model`, fitted on all private data."""
    ids = lab.task.private.ids
    index = {e: i for i, e in enumerate(ids)}
    shards = len(model.prototypes)
    baselines = Baselines(lab, index, shards)
    private_clusters = dataclasses.replace(clustering, prototypes_from="private")
    before = {
        "per_cluster": accuracy_of(predict_logits(model, lab, lab.task.test), lab),
        "per_cluster_private_prototypes": accuracy_of(
            predict_logits(fit(lab, private_clusters, model.config), lab, lab.task.test), lab
        ),
        **baselines.accuracies(set()),
        "public_backbone": accuracy_of(logits_of(lab.backbone, lab), lab),
    }
    deletions = []
    for kind, chosen in deletion_sets(lab, settings):
        result, (seconds, _) = timed(lambda c=chosen: forget(model, lab, clustering, c))
        row = {"kind": kind, "fraction": len(chosen) / len(ids), "examples": len(chosen)}
        row["accuracy"] = {"per_cluster": accuracy_of(predict_logits(result.model, lab, lab.task.test), lab)}
        row["accuracy"] |= baselines.accuracies(set(chosen))
        row |= {"clusters_retrained": len(result.retrained), "clusters_removed": len(result.removed)}
        row |= {"seconds": seconds}
        deletions.append(row)
    costs = request_costs(lab, model, clustering, baselines, settings)
    gap = before["global_adapter"] - before["per_cluster"]
    return {
        "settings": dataclasses.asdict(settings),
        "clusters": len(model.prototypes),
        "clusters_with_members": len(model.alive),
        "members": {str(c): len(m) for c, m in model.members.items()},
        "accuracy_before": before,
        "deletions": deletions,
        "cost_per_request": costs,
        "goals": {
            "parameters_full_finetune_over_per_cluster": costs["full_finetune"]["parameters_retrained"]
            / costs["per_cluster"]["parameters_retrained"],
            "seconds_retrain_private_stage_over_per_cluster": costs["retrain_private_stage"]["seconds"]
            / costs["per_cluster"]["seconds"],
            "cpu_seconds_retrain_private_stage_over_per_cluster": costs["retrain_private_stage"]["cpu_seconds"]
            / costs["per_cluster"]["cpu_seconds"],
            "accuracy_gap_to_global_adapter": gap,
        },
    }


def deletion_sets(lab: Lab, settings: EvaluationSettings) -> list[tuple[str, list[str]]]:
    """(kind, ids) per fraction: a seeded random sample, and whole classes (round(f · classes) of
    them, at least one, in a seeded order)."""
    ids = lab.task.private.ids
    labels = lab.task.private.labels.numpy()
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(len(ids))
    classes = rng.permutation(lab.task.classes)
    sets = []
    for fraction in settings.fractions:
        sets.append(("random", [ids[i] for i in sorted(order[: round(fraction * len(ids))])]))
        gone = set(classes[: max(1, round(fraction * lab.task.classes))].tolist())
        sets.append(("class", [e for e, y in zip(ids, labels, strict=True) if y in gone]))
    return sets


class Baselines:
    """The global adapter, full fine-tuning and SISA, each trained on the private data left."""

    def __init__(self, lab: Lab, index: dict[str, int], shards: int):
        self.lab, self.index, self.shards = lab, index, shards
        self.full = FinetuneSettings(**{**dataclasses.asdict(lab.finetune), "method": "full"})

    def shard_of(self, example: str) -> int:
        return int(hashlib.sha256(example.encode()).hexdigest(), 16) % self.shards

    def remaining(self, forgotten: set[str]) -> list[str]:
        return [e for e in self.lab.task.private.ids if e not in forgotten]

    def global_adapter(self, forgotten: set[str]) -> nn.Module:
        return self._adapter(GLOBAL, self.remaining(forgotten))

    def full_finetune(self, forgotten: set[str]) -> nn.Module:
        kept = self.remaining(forgotten)
        examples = self.lab.task.private.subset(np.array([self.index[e] for e in kept]))
        return train_on_all(adapt(self.lab.backbone, self.full, seed=0), examples, self.full, seed=0)

    def sisa_shard(self, shard: int, forgotten: set[str]) -> nn.Module | None:
        members = [e for e in self.remaining(forgotten) if self.shard_of(e) == shard]
        return self._adapter(shard, members) if members else None

    def sisa_logits(self, forgotten: set[str]) -> torch.Tensor:
        """Mean softmax over the shards that still hold examples (SISA's aggregation). The shards
        train together in one lab ensemble: each its own seed and members, only faster."""
        kept = self.remaining(forgotten)
        shards = {s: [e for e in kept if self.shard_of(e) == s] for s in range(self.shards)}
        shards = {s: members for s, members in shards.items() if members}
        seeds = [cluster_seed(self.lab.recipe, self.lab.finetune, s, m) for s, m in shards.items()]
        masks = torch.zeros(len(shards), len(self.lab.task.private), dtype=torch.bool)
        for row, members in enumerate(shards.values()):
            masks[row, [self.index[e] for e in members]] = True
        models = [cluster_module(self.lab, seed) for seed in seeds]
        ensemble, _ = train(models, self.lab.task.private, masks, seeds, self.lab.finetune)
        return ensemble.logits(self.lab.task.test).softmax(-1).mean(0)

    def accuracies(self, forgotten: set[str]) -> dict[str, float]:
        return {
            "global_adapter": accuracy_of(logits_of(self.global_adapter(forgotten), self.lab), self.lab),
            "full_finetune": accuracy_of(logits_of(self.full_finetune(forgotten), self.lab), self.lab),
            "sisa": accuracy_of(self.sisa_logits(forgotten), self.lab),
        }

    def _adapter(self, cluster: int, members: list[str]) -> nn.Module:
        return trained_module(self.lab, *train_cluster(self.lab, cluster, members, self.index))


def request_costs(
    lab: Lab, model: UnlearnableModel, clustering: ClusterSettings, baselines: Baselines, settings: EvaluationSettings
) -> dict[str, dict[str, float]]:
    """Median cost of forgetting one example over `settings.requests` seeded single-example requests
    (the retrains of everything, whose cost does not depend on the example, once): parameters
    retrained, wall-clock and CPU seconds (the latter less disturbed by other processes on a shared
    machine), examples reprocessed."""
    ids = lab.task.private.ids
    rng = np.random.default_rng(settings.seed + 1)
    picks = [ids[i] for i in rng.choice(len(ids), size=settings.requests, replace=False)]
    rows: dict[str, list[tuple[float, ...]]] = {name: [] for name in COSTED}
    everyone = len(ids) - 1
    for example in picks:
        result, seconds = timed(lambda e=example: forget(model, lab, clustering, [e]))
        retrained = sum(result.model.adapter_parameters(c) for c in result.retrained)
        rows["per_cluster"].append((retrained, *seconds, result.examples_reprocessed))
        shard = baselines.shard_of(example)
        module, seconds = timed(lambda e=example, s=shard: baselines.sisa_shard(s, {e}))
        members = sum(1 for e in ids if e != example and baselines.shard_of(e) == shard)
        rows["sisa"].append((trainable(module) if module is not None else 0, *seconds, members))
    once = {picks[0]}  # what does not depend on which example goes: retrained once
    again, seconds = timed(lambda: fit(lab, clustering, model.config, once))
    rows["retrain_private_stage"].append((sum(again.adapter_parameters(c) for c in again.alive), *seconds, everyone))
    module, seconds = timed(lambda: baselines.global_adapter(once))
    rows["global_adapter"].append((trainable(module), *seconds, everyone))
    module, seconds = timed(lambda: baselines.full_finetune(once))
    rows["full_finetune"].append((trainable(module), *seconds, everyone))
    keys = ("parameters_retrained", "seconds", "cpu_seconds", "examples_reprocessed")
    return {name: dict(zip(keys, np.median(np.array(r), axis=0).tolist(), strict=True)) for name, r in rows.items()}


def timed(job: Callable[[], T]) -> tuple[T, tuple[float, float]]:
    """job()'s result and its (wall-clock, process CPU) seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = job()
    return result, (time.perf_counter() - wall, time.process_time() - cpu)


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def logits_of(module: nn.Module, lab: Lab) -> torch.Tensor:
    return module(lab.task.test.take(torch.arange(len(lab.task.test))))


def accuracy_of(logits: torch.Tensor, lab: Lab) -> float:
    return float((logits.argmax(-1) == lab.task.test.labels).float().mean())
