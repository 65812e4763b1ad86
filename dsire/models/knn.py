"""Per-voter nearest-neighbour retrieval and the vote: the heart of DSiRe.

A *voter* is one (layer, part) feature: e.g. the singular values of ΔW of one layer. Each voter has
its own FAISS index over the training LoRAs (exact `Flat` by default; HNSW or IVF for very large zoos,
see benchmarks/README.md for their recall); a new LoRA gets one vote per voter (its nearest
neighbour's N, or k weighted votes), each voter's votes count `voter_weights` times (equal by default;
learned from held-out reliability by `dsire.models.select`), and the majority wins.

Normalisation, fitted on the training LoRAs: `global` min-max over every voter (the paper's), `voter`
min-max per voter (one scalar each: it scales a voter's distances but never changes its neighbours),
and per dimension `dimension` (min-max) or `standard` (mean 0, std 1), which do change neighbours.

Tie rule (deterministic): among tied N, the one whose supporting votes have the smallest summed
distance wins; if still tied, the smallest N.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import faiss
import numpy as np
import torch

Weighting = Literal["uniform", "distance"]
Normalisation = Literal["global", "voter", "dimension", "standard"]
WEIGHTINGS, NORMALISATIONS = get_args(Weighting), get_args(Normalisation)


@dataclass
class Prediction:
    n: np.ndarray  # [Q] predicted N
    share: np.ndarray  # [Q] fraction of the vote weight the winner got
    distance: np.ndarray  # [Q] mean distance to the nearest neighbour over voters
    voter_labels: np.ndarray  # [Q, V] each voter's 1-NN label


def bounds(raw: list[np.ndarray], normalisation: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per voter, `low` and `high` of shape [d]: x ↦ (x − low) / (high − low) normalises it."""
    if normalisation == "global":
        low, high = min(float(x.min()) for x in raw), max(float(x.max()) for x in raw)
        lows = [np.full(x.shape[1], low, np.float32) for x in raw]
        highs = [np.full(x.shape[1], high, np.float32) for x in raw]
    elif normalisation == "voter":
        lows = [np.full(x.shape[1], x.min(), np.float32) for x in raw]
        highs = [np.full(x.shape[1], x.max(), np.float32) for x in raw]
    elif normalisation == "dimension":
        lows, highs = [x.min(axis=0) for x in raw], [x.max(axis=0) for x in raw]
    else:  # standard: low = mean, high = mean + std
        lows = [x.mean(axis=0, dtype=np.float64).astype(np.float32) for x in raw]
        highs = [low + x.std(axis=0, dtype=np.float64).astype(np.float32) for low, x in zip(lows, raw, strict=True)]
    return lows, highs


def normalise(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(x − low) / (high − low), a zero span counting as 1 (a constant dimension stays constant)."""
    span = high - low
    return (x - low) / np.where(span > 0, span, np.float32(1.0))


def tally(
    labels: np.ndarray, distances: np.ndarray, sizes: np.ndarray, weighting: str, voter_weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The vote: labels and distances [voters, queries, k] of each voter's neighbours -> (winning N, its share).

    Each neighbour's vote counts 1 (`uniform`) or 1/distance, times its voter's weight; the winner has
    the most weight, then the smallest summed distance of its votes, then the smallest N.
    """
    queries = labels.shape[1]
    votes = np.ones_like(distances, dtype=np.float64) if weighting == "uniform" else 1.0 / (distances + 1e-12)
    votes = votes * np.asarray(voter_weights, np.float64)[:, None, None]
    # bins in the order of the per-voter loop this replaced (voter, then neighbour): the same float sums
    order = (0, 2, 1)
    bins = (np.arange(queries)[None, None, :] * len(sizes) + np.searchsorted(sizes, labels).transpose(order)).ravel()
    weight = np.bincount(bins, votes.transpose(order).ravel(), queries * len(sizes)).reshape(queries, len(sizes))
    spread = np.bincount(bins, distances.transpose(order).ravel(), queries * len(sizes))
    spread = spread.reshape(queries, len(sizes))
    best = weight == weight.max(axis=1, keepdims=True)
    spread = np.where(best, spread, np.inf)
    winners = np.argmax(best & (spread == spread.min(axis=1, keepdims=True)), axis=1)
    rows = np.arange(queries)
    return sizes[winners], weight[rows, winners] / weight.sum(axis=1)


def _index(vectors: np.ndarray, factory: str, search: str, use_gpu: bool) -> faiss.Index:
    """A FAISS index from its factory string ("Flat": exact; "HNSW32", "IVF256,Flat": approximate)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.index_factory(vectors.shape[1], factory)
    on_gpu = (
        use_gpu
        and not factory.startswith("HNSW")  # FAISS has no GPU HNSW
        and hasattr(faiss, "StandardGpuResources")
        and faiss.get_num_gpus() > 0
    )
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    if search:  # ParameterSpace does not reach GPU indices (IVF's nprobe): they have their own
        space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
        space.set_index_parameters(index, search)
    return index


class KNNVote:
    """Fit: normalise (min-max, global or per voter) and index; predict: k-NN votes per voter, majority."""

    def __init__(
        self,
        k: int = 1,
        weighting: str = "uniform",
        normalisation: str = "global",
        use_gpu: bool = False,
        index: str = "Flat",
        search: str = "",
    ):
        if k < 1:
            raise ValueError(f"k={k}: need k >= 1")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}: one of {WEIGHTINGS}")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation={normalisation!r}: one of {NORMALISATIONS}")
        self.k, self.weighting, self.normalisation, self.use_gpu = k, weighting, normalisation, use_gpu
        self.index, self.search = index, search  # FAISS factory string and search parameters
        self.voters: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.labels = np.zeros(0, dtype=np.int64)
        self.low: list[np.ndarray] = []  # per voter: [d] (constant across d for global and voter)
        self.high: list[np.ndarray] = []
        self.voter_weights = np.ones(0)  # how many votes each voter's vote counts
        self._indices: list[faiss.Index] = []

    def fit(self, features: dict[str, np.ndarray], labels: np.ndarray) -> KNNVote:
        self.voters = list(features)
        raw = [np.asarray(features[v], dtype=np.float32) for v in self.voters]
        self.low, self.high = bounds(raw, self.normalisation)
        self.voter_weights = np.ones(len(raw))  # learned weights are set after fitting (dsire.models.select)
        self.vectors = [normalise(x, low, high) for x, low, high in zip(raw, self.low, self.high, strict=True)]
        self.labels = np.asarray(labels, dtype=np.int64)
        self._build()
        return self

    def _build(self) -> None:
        self._indices = [_index(v, self.index, self.search, self.use_gpu) for v in self.vectors]

    def dims(self) -> dict[str, int]:
        """{voter: feature size} of a fitted model; empty before `fit`."""
        return {v: x.shape[1] for v, x in zip(self.voters, self.vectors, strict=True)}

    @property
    def sizes(self) -> np.ndarray:
        return np.unique(self.labels)

    def neighbours(self, features: dict[str, np.ndarray], k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per voter, in order: (distances, zoo indices), each [queries, k], of the k nearest zoo LoRAs."""
        missing = [v for v in self.voters if v not in features]
        if missing:
            raise KeyError(f"features lack {len(missing)} voters, e.g. {missing[0]}")
        for i, voter in enumerate(self.voters):
            query = normalise(np.asarray(features[voter], dtype=np.float32), self.low[i], self.high[i])
            distances, ids = self._indices[i].search(np.ascontiguousarray(query), k)
            yield np.sqrt(np.maximum(distances, 0)), ids

    def predict(self, features: dict[str, np.ndarray]) -> Prediction:
        k = min(self.k, len(self.labels))
        found = list(self.neighbours(features, k))
        distances = np.stack([d for d, _ in found])  # [V, queries, k]
        labels = self.labels[np.stack([i for _, i in found])]
        n, share = tally(labels, distances, self.sizes, self.weighting, self.voter_weights)
        return Prediction(n, share, distances[:, :, 0].mean(axis=0), labels[:, :, 0].T)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and plain settings that rebuild this model exactly (no pickled objects)."""
        tensors = {f"voter.{i}": torch.from_numpy(v) for i, v in enumerate(self.vectors)}
        tensors |= {f"low.{i}": torch.from_numpy(v) for i, v in enumerate(self.low)}
        tensors |= {f"high.{i}": torch.from_numpy(v) for i, v in enumerate(self.high)}
        tensors |= {"labels": torch.from_numpy(self.labels), "voter_weights": torch.from_numpy(self.voter_weights)}
        settings = {
            "k": self.k,
            "weighting": self.weighting,
            "normalisation": self.normalisation,
            "index": self.index,
            "search": self.search,
            "voters": self.voters,
        }
        return tensors, settings

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], settings: dict, use_gpu: bool = False) -> KNNVote:
        options = [settings[key] for key in ("k", "weighting", "normalisation")]
        model = cls(*options, use_gpu=use_gpu, index=settings["index"], search=settings["search"])
        model.voters = list(settings["voters"])
        model.vectors = [tensors[f"voter.{i}"].numpy() for i in range(len(model.voters))]
        model.labels = tensors["labels"].numpy()
        model.low = [tensors[f"low.{i}"].numpy() for i in range(len(model.voters))]
        model.high = [tensors[f"high.{i}"].numpy() for i in range(len(model.voters))]
        model.voter_weights = tensors["voter_weights"].double().numpy()
        model._build()
        return model
