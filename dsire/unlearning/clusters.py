"""Clusters of backbone features: prototypes, and routing of an input to the nearest one.

Prototypes are centroids of an agglomerative clustering (average linkage, as LMEraser) of the frozen
backbone's penultimate features. By default they are fitted on the *public* split: then no private
example shapes a prototype or another example's assignment, and forgetting one example can change
nothing outside its own cluster. Clustering the private features instead (`prototypes_from:
private`, the paper's choice) lets every private example move every cluster boundary, so removing
one would require re-clustering everything: such models can be retrained, not forgotten from.

A cluster with fewer than `min_size` private members is merged into the cluster of the nearest
other public prototype (`merge_small`): its members train with that cluster and its inputs are
routed there. Which clusters merge is a function of the public prototypes and the private members
left, recomputed by `fit` and by every `forget` alike, so a forget still equals a retrain; the price
is that a request which takes a cluster below `min_size` retrains its neighbour as well.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.spatial.distance import pdist
from sklearn.cluster import AgglomerativeClustering
from torch import nn

from dsire.lab.data import Examples
from dsire.settings import require


@dataclass(frozen=True)
class ClusterSettings:
    """`unlearning.clustering.*`: exactly one of `n_clusters`, `distance_threshold`, `adaptive_quantile`.

    `adaptive_quantile` q sets the distance threshold to the q-quantile of all pairwise feature
    distances: the number of clusters then follows the features' diversity, not their scale.
    """

    prototypes_from: Literal["public", "private"] = "public"
    n_clusters: int | None = 10
    distance_threshold: float | None = None
    adaptive_quantile: float | None = None
    min_size: int = 1  # fewer private members: merged into the nearest other cluster (1: only empty ones go)

    def __post_init__(self) -> None:
        chosen = [self.n_clusters, self.distance_threshold, self.adaptive_quantile]
        require(
            sum(v is not None for v in chosen) == 1,
            "n_clusters",
            "set exactly one of n_clusters, distance_threshold, adaptive_quantile (the others null)",
        )
        require(self.n_clusters is None or self.n_clusters >= 1, "n_clusters", f"{self.n_clusters} must be ≥ 1")
        require(self.min_size >= 1, "min_size", f"{self.min_size} must be ≥ 1")
        require(
            self.distance_threshold is None or self.distance_threshold > 0,
            "distance_threshold",
            f"{self.distance_threshold} must be positive",
        )
        require(
            self.adaptive_quantile is None or 0 < self.adaptive_quantile < 1,
            "adaptive_quantile",
            f"{self.adaptive_quantile} is not in (0, 1)",
        )


@torch.no_grad()
def features(backbone: nn.Module, examples: Examples, chunk: int = 512) -> torch.Tensor:
    """[n, d] float64 penultimate features: the backbone's output with its `head` removed."""
    body = copy.deepcopy(backbone)
    body.head = nn.Identity()
    device = next(backbone.parameters()).device
    parts = [
        body(examples.take(torch.arange(s, min(s + chunk, len(examples)))).to(device)).cpu()
        for s in range(0, len(examples), chunk)
    ]
    return torch.cat(parts).double()


def fit_prototypes(points: torch.Tensor, settings: ClusterSettings) -> torch.Tensor:
    """[k, d] centroids of the agglomerative clusters of `points` (average linkage), in label order."""
    data = points.numpy()
    threshold = settings.distance_threshold
    if settings.adaptive_quantile is not None:
        threshold = float(np.quantile(pdist(data), settings.adaptive_quantile))
    clusters = min(settings.n_clusters, len(data)) if settings.n_clusters is not None else None
    labels = AgglomerativeClustering(n_clusters=clusters, distance_threshold=threshold, linkage="average").fit_predict(
        data
    )
    return torch.stack([points[torch.as_tensor(labels == k)].mean(0) for k in range(labels.max() + 1)])


def route(points: torch.Tensor, prototypes: torch.Tensor, alive: list[int]) -> torch.Tensor:
    """[n] index of the nearest prototype among `alive` (ties to the lowest index); -1 if none is alive."""
    if not alive:
        return torch.full((len(points),), -1, dtype=torch.long)
    candidates = torch.as_tensor(sorted(alive))
    distances = torch.cdist(points, prototypes[candidates])
    return candidates[distances.argmin(dim=1)]


def merge_small(nearest: torch.Tensor, prototypes: torch.Tensor, min_size: int) -> list[int]:
    """owner[p]: the cluster that serves prototype p (-1: none) when each example goes to the cluster
    of its `nearest` prototype and clusters with fewer than `min_size` examples are merged, smallest
    first (ties to the lowest index), into the cluster owning the prototype nearest their own."""
    counts = torch.bincount(nearest, minlength=len(prototypes)).tolist()
    owner = [p if counts[p] else -1 for p in range(len(prototypes))]
    while True:
        alive = sorted(set(owner) - {-1})
        small = [c for c in alive if counts[c] < min_size]
        if not small or len(alive) < 2:
            return owner
        cluster = min(small, key=lambda c: (counts[c], c))
        others = [p for p, c in enumerate(owner) if c not in (-1, cluster)]
        target = owner[others[int(torch.cdist(prototypes[cluster : cluster + 1], prototypes[others]).argmin())]]
        counts[target] += counts[cluster]
        owner = [target if c == cluster else c for c in owner]
