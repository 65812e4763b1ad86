"""Per-voter nearest-neighbour retrieval and the vote: the heart of DSiRe.

A *voter* is one (layer, part) feature: e.g. the singular values of ΔW of one layer. Each voter has
its own FAISS index over the training LoRAs (exact `Flat` by default; HNSW or IVF for very large zoos,
see benchmarks/README.md for their recall); a new LoRA gets one vote per voter (its nearest
neighbour's N, or k weighted votes) and the majority wins.

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
Normalisation = Literal["global", "voter"]
WEIGHTINGS, NORMALISATIONS = get_args(Weighting), get_args(Normalisation)


@dataclass
class Prediction:
    n: np.ndarray  # [Q] predicted N
    share: np.ndarray  # [Q] fraction of the vote weight the winner got
    distance: np.ndarray  # [Q] mean distance to the nearest neighbour over voters
    voter_labels: np.ndarray  # [Q, V] each voter's 1-NN label


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
        self.low = np.zeros(0, dtype=np.float32)
        self.high = np.zeros(0, dtype=np.float32)
        self._indices: list[faiss.Index] = []

    def fit(self, features: dict[str, np.ndarray], labels: np.ndarray) -> KNNVote:
        self.voters = list(features)
        raw = [np.asarray(features[v], dtype=np.float32) for v in self.voters]
        if self.normalisation == "global":
            low, high = min(float(x.min()) for x in raw), max(float(x.max()) for x in raw)
            self.low, self.high = np.full(len(raw), low, np.float32), np.full(len(raw), high, np.float32)
        else:
            self.low = np.array([x.min() for x in raw], np.float32)
            self.high = np.array([x.max() for x in raw], np.float32)
        self.vectors = [self._normalise(i, x) for i, x in enumerate(raw)]
        self.labels = np.asarray(labels, dtype=np.int64)
        self._build()
        return self

    def _normalise(self, voter: int, x: np.ndarray) -> np.ndarray:
        span = self.high[voter] - self.low[voter]
        return (x - self.low[voter]) / (span if span > 0 else 1.0)

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
            query = self._normalise(i, np.asarray(features[voter], dtype=np.float32))
            distances, ids = self._indices[i].search(np.ascontiguousarray(query), k)
            yield np.sqrt(np.maximum(distances, 0)), ids

    def predict(self, features: dict[str, np.ndarray]) -> Prediction:
        k = min(self.k, len(self.labels))
        sizes = self.sizes
        queries = len(next(iter(features.values())))
        weight = np.zeros((queries, len(sizes)))
        tie_distance = np.zeros((queries, len(sizes)))
        nearest_labels, nearest_distance = [], []
        for distances, ids in self.neighbours(features, k):
            labels = self.labels[ids]
            votes = np.ones_like(distances) if self.weighting == "uniform" else 1.0 / (distances + 1e-12)
            slots = np.searchsorted(sizes, labels)
            for j in range(k):
                np.add.at(weight, (np.arange(queries), slots[:, j]), votes[:, j])
                np.add.at(tie_distance, (np.arange(queries), slots[:, j]), distances[:, j])
            nearest_labels.append(labels[:, 0])
            nearest_distance.append(distances[:, 0])
        # winner: most weight, then smallest summed distance, then smallest N (lexsort: last key first)
        winners = [np.lexsort((sizes, tie_distance[q], -weight[q]))[0] for q in range(queries)]
        winners = np.array(winners, dtype=np.int64)
        return Prediction(
            n=sizes[winners],
            share=weight[np.arange(queries), winners] / weight.sum(axis=1),
            distance=np.mean(nearest_distance, axis=0),
            voter_labels=np.stack(nearest_labels, axis=1),
        )

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and plain settings that rebuild this model exactly (no pickled objects)."""
        tensors = {f"voter.{i}": torch.from_numpy(v) for i, v in enumerate(self.vectors)}
        tensors |= {
            "labels": torch.from_numpy(self.labels),
            "low": torch.from_numpy(self.low),
            "high": torch.from_numpy(self.high),
        }
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
        model.low, model.high = tensors["low"].numpy(), tensors["high"].numpy()
        model._build()
        return model
