"""Per-cluster adapters: fit every cluster, forget examples by retraining only their clusters.

Exact by construction. A cluster's adapter (a LoRA on the backbone or a pad prompt on its input,
`finetune.method`, plus its own linear head) is trained by the lab's trainer as an ensemble of one:
its seed (LoRA initialisation and data order) is a hash of the recipe, the cluster's index and its
member ids, and it sees only its members. So a cluster's adapter is a function of its members
alone, and `forget`, which retrains the clusters that lost members, gives bit for bit the model
that `fit` gives on the remaining data.

Why an ensemble of one: the lab's ensemble trains each model as it would alone mathematically,
but a batched product may reduce in another order when the batch holds other models (BLAS and
cuBLAS choose kernels by batch size), so a cluster trained beside others is not guaranteed the
same bits as when retrained alone. One fixed arrangement, every cluster alone, rules that out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dsire.errors import UserError
from dsire.hashing import json_hash, tensors_sha256
from dsire.lab.build import Lab
from dsire.lab.data import Examples
from dsire.lab.ensemble import train
from dsire.lab.methods import FinetuneSettings, adapt
from dsire.unlearning.clusters import ClusterSettings, features, fit_prototypes, merge_small, route
from dsire.unlearning.model import UnlearnableModel


@contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic algorithms on inside (forget must equal retrain bit for bit), as before after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


Progress = Callable[[int, int], None]  # (cluster, members) as each cluster starts training


def cluster_module(lab: Lab, seed: int) -> nn.Module:
    """The backbone with the fine-tune's adapter (`adapt`: a LoRA, or a pad prompt on the input)
    and its own trainable linear `head`."""
    if lab.finetune.parameterisation in ("lora", "lora_fa") and "head" in lab.finetune.target_modules:
        raise UserError(
            "finetune.target_modules", "head is each cluster's own linear head, trained whole: adapt the others"
        )
    model = adapt(lab.backbone, lab.finetune, seed, lab.task.input_shape)
    for name, module in model.named_modules():
        if name.split(".")[-1] == "head":
            module.requires_grad_(True)
    return model


def cluster_seed(recipe: str, finetune: FinetuneSettings, cluster: int, members: list[str]) -> int:
    """Seed of a cluster's adapter: from its identity and members only, never from global RNG state."""
    return int(json_hash([recipe, finetune, cluster, members]), 16) % 2**31


def train_cluster(lab: Lab, cluster: int, members: list[str], index: dict[str, int]) -> tuple[int, dict]:
    """(seed, trainable tensors) of cluster `cluster` trained on `members` (ids of private examples)."""
    seed = cluster_seed(lab.recipe, lab.finetune, cluster, members)
    mask = torch.zeros(1, len(lab.task.private), dtype=torch.bool)
    mask[0, [index[i] for i in members]] = True
    ensemble, _ = train([cluster_module(lab, seed)], lab.task.private, mask, [seed], lab.finetune)
    return seed, {name: ensemble.stacked[name][0].detach().cpu().clone() for name in ensemble.trainable}


def prototypes_for(lab: Lab, clustering: ClusterSettings, forgotten: set[str]) -> torch.Tensor:
    if clustering.prototypes_from == "public":
        return fit_prototypes(features(lab.backbone, lab.task.public), clustering)
    keep = [i for i, e in enumerate(lab.task.private.ids) if e not in forgotten]
    if not keep:
        raise UserError("forget", "every private example is forgotten: nothing left to cluster")
    return fit_prototypes(features(lab.backbone, lab.task.private)[keep], clustering)


def partition(
    lab: Lab, prototypes: torch.Tensor, forgotten: set[str], min_size: int
) -> tuple[dict[int, list[str]], list[int]]:
    """(cluster -> ids of its private members, in split order; prototype -> serving cluster): each
    private example not `forgotten` goes to its nearest prototype, then small clusters merge
    (`merge_small`). A function of the public prototypes and the members left only, so `forget`
    recomputes exactly what `fit` on the remaining data computes."""
    nearest = route(features(lab.backbone, lab.task.private), prototypes, list(range(len(prototypes))))
    kept = [(e, p) for e, p in zip(lab.task.private.ids, nearest.tolist(), strict=True) if e not in forgotten]
    owner = merge_small(torch.as_tensor([p for _, p in kept], dtype=torch.long), prototypes, min_size)
    groups: dict[int, list[str]] = {}
    for example, p in kept:
        groups.setdefault(owner[p], []).append(example)
    return dict(sorted(groups.items())), owner


def fit(
    lab: Lab,
    clustering: ClusterSettings,
    config: dict,
    forgotten: set[str] = frozenset(),
    progress: Progress | None = None,
) -> UnlearnableModel:
    """Cluster, assign and train every cluster on its private examples that are not `forgotten`."""
    prototypes = prototypes_for(lab, clustering, forgotten)
    index = {e: i for i, e in enumerate(lab.task.private.ids)}
    members, owner = partition(lab, prototypes, forgotten, clustering.min_size)
    model = UnlearnableModel(
        config=config,
        recipe=lab.recipe,
        backbone_sha256=tensors_sha256(lab.backbone.state_dict()),
        prototypes=prototypes,
        members=members,
        seeds={},
        owner=owner,
        states={},
        forgotten=sorted(forgotten),
    )
    for cluster, ids in members.items():
        if progress:
            progress(cluster, len(ids))
        model.seeds[cluster], model.states[cluster] = train_cluster(lab, cluster, ids, index)
    return model


@dataclass
class ForgetResult:
    model: UnlearnableModel
    forgotten: list[str]  # newly forgotten ids
    already_forgotten: list[str]
    duplicates: int
    retrained: list[int]  # clusters whose adapter was retrained
    removed: list[int]  # clusters that lost all their members or were merged (their inputs go elsewhere)
    examples_reprocessed: int  # members of the retrained clusters (what their training read)


def forget(
    model: UnlearnableModel,
    lab: Lab,
    clustering: ClusterSettings,
    requested: list[str],
    progress: Progress | None = None,
) -> ForgetResult:
    """A new model without the `requested` private examples: only the clusters whose members change
    (theirs, and a neighbour that absorbs one fallen below `min_size`) are retrained."""
    if clustering.prototypes_from != "public":
        raise UserError(
            "unlearning.clustering.prototypes_from",
            "private: every private example shaped the clusters, so no forget is exact; use mode=retrain",
        )
    known = {e: i for i, e in enumerate(lab.task.private.ids)}
    unique, new, already = split_request(model, requested)
    forgotten = set(model.forgotten) | set(new)
    members, owner = partition(lab, model.prototypes, forgotten, clustering.min_size)
    result = dataclasses.replace(model, members=members, seeds={}, owner=owner, states={}, forgotten=sorted(forgotten))
    retrained = []
    for cluster, ids in members.items():
        if model.members.get(cluster) == ids:  # the same members: the same adapter, bit for bit
            result.seeds[cluster], result.states[cluster] = model.seeds[cluster], model.states[cluster]
            continue
        if progress:
            progress(cluster, len(ids))
        result.seeds[cluster], result.states[cluster] = train_cluster(lab, cluster, ids, known)
        retrained.append(cluster)
    removed = sorted(set(model.alive) - set(members))
    reprocessed = sum(len(members[c]) for c in retrained)
    return ForgetResult(result, new, already, len(requested) - len(unique), retrained, removed, reprocessed)


def retrain(
    model: UnlearnableModel,
    lab: Lab,
    clustering: ClusterSettings,
    requested: list[str],
    progress: Progress | None = None,
) -> ForgetResult:
    """Forget by retraining every cluster from scratch on the remaining data, with the same recipe."""
    unique, new, already = split_request(model, requested)
    fresh = fit(lab, clustering, model.config, set(model.forgotten) | set(unique), progress)
    removed = sorted(set(model.alive) - set(fresh.alive))
    reprocessed = sum(len(ids) for ids in fresh.members.values())
    return ForgetResult(fresh, new, already, len(requested) - len(unique), fresh.alive, removed, reprocessed)


def split_request(model: UnlearnableModel, requested: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(unique ids in request order, those not forgotten before, those forgotten before)."""
    unique = list(dict.fromkeys(requested))
    return unique, [e for e in unique if e not in model.forgotten], [e for e in unique if e in model.forgotten]


@torch.no_grad()
def predict_logits(model: UnlearnableModel, lab: Lab, examples: Examples, chunk: int = 512) -> torch.Tensor:
    """[n, classes]: each input through the adapter of its nearest living cluster; the public
    backbone alone when every cluster has been forgotten. Inputs are read `chunk` at a time (a
    folder of images need not fit in memory)."""
    routed = model.route(features(lab.backbone, examples))
    device = next(lab.backbone.parameters()).device
    logits = torch.empty(len(examples), lab.task.classes)
    for cluster in routed.unique().tolist():
        chosen = torch.nonzero(routed == cluster).flatten()
        module = lab.backbone if cluster < 0 else trained_module(lab, model.seeds[cluster], model.states[cluster])
        for start in range(0, len(chosen), chunk):
            index = chosen[start : start + chunk]
            logits[index] = module(examples.take(index).to(device)).cpu()
    return logits


def trained_module(lab: Lab, seed: int, state: dict[str, torch.Tensor]) -> nn.Module:
    """A trained adapter (its seed and trainable tensors) on the backbone, as an ordinary module."""
    module = cluster_module(lab, seed)
    module.load_state_dict(state, strict=False)
    return module.eval()
