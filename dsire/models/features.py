"""Feature sets: which spectra become voters (`FeatureSpec`), and the vectors of a set of LoRAs (`Features`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import torch

from dsire.distributed import gather
from dsire.spectra import Spectra

Part = Literal["delta", "down", "up", "norms"]
PARTS = get_args(Part)


@dataclass(frozen=True)
class FeatureSpec:
    """`parts`: per layer, which voters: σ(ΔW) `delta`, σ(down) `down`, σ(up) `up`, and `norms`
    (‖ΔW‖F, ‖down‖F, ‖up‖F). `num_sv`: singular values kept (None: all r, as in the paper).
    `concat`: the parts of a layer concatenated into one voter (`layer/delta+down+up`) instead of one
    voter each."""

    parts: tuple[str, ...] = ("delta", "down", "up")
    num_sv: int | None = None
    concat: bool = False

    def __post_init__(self):
        unknown = set(self.parts) - set(PARTS)
        if unknown or not self.parts:
            raise ValueError(f"unknown feature parts {sorted(unknown)}; choose from {PARTS}")

    def vectors(self, spectra: dict[str, Spectra]) -> dict[str, torch.Tensor]:
        """{"layer/part": 1-D feature vector} for one LoRA (one voter per part: see `derive`)."""
        out = {}
        for layer, s in spectra.items():
            for part in self.parts:
                if part == "norms":
                    out[f"{layer}/norms"] = torch.stack([s.delta_norm, s.down_norm, s.up_norm]).float()
                else:
                    out[f"{layer}/{part}"] = getattr(s, part)[: self.num_sv].float()
        return out

    def derive(self, vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This spec's voters from the vectors of a wider one (every part, all values: see `ALL`), so
        that model selection tries voter sets on features computed once."""
        layers = dict.fromkeys(voter.rsplit("/", 1)[0] for voter in vectors)
        out = {}
        for layer in layers:
            pieces = [vectors[f"{layer}/{p}"][..., : None if p == "norms" else self.num_sv] for p in self.parts]
            if self.concat:
                out[f"{layer}/{'+'.join(self.parts)}"] = np.concatenate(pieces, axis=-1)
            else:
                out |= {f"{layer}/{p}": x for p, x in zip(self.parts, pieces, strict=True)}
        return out


ALL = FeatureSpec(PARTS)  # every part, all values: the features model selection starts from


def stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Feature dicts of several LoRAs (same voters) -> {voter: [LoRAs, d]} arrays."""
    return {voter: torch.stack([row[voter] for row in rows]).numpy() for voter in rows[0]}


@dataclass
class Features:
    """Feature vectors of a set of LoRAs, with their labels and the items that failed."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    n: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    keys: list[str] = field(default_factory=list)
    concepts: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # every LoRA's layer (out, in): one base

    def select(self, keep: np.ndarray) -> Features:
        """The LoRAs picked by `keep` (a boolean mask or indices, in that order); errors are not kept."""
        rows = np.arange(len(self.keys))[keep]
        return Features(
            vectors={v: x[rows] for v, x in self.vectors.items()},
            n=self.n[rows],
            keys=[self.keys[i] for i in rows],
            concepts=[self.concepts[i] for i in rows],
            shapes=self.shapes,
        )

    def copies(self) -> dict[str, str]:
        """{key: the first key with exactly the same feature vectors} for every later copy.

        The same LoRA under two names (a copy, a re-upload, another format) is one data point; twice
        in a zoo, it can sit on both sides of a split and inflate the test scores.
        """
        if not self.keys:
            return {}
        rows = np.concatenate([self.vectors[v] for v in sorted(self.vectors)], axis=1)
        _, first, group = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        group = group.ravel()
        return {key: self.keys[first[group[i]]] for i, key in enumerate(self.keys) if first[group[i]] != i}

    @classmethod
    def concat(cls, parts: list[Features]) -> Features:
        errors = {k: v for p in parts for k, v in p.errors.items()}
        parts = [p for p in parts if p.keys]
        if not parts:
            return cls(errors=errors)
        return cls(
            vectors={v: np.concatenate([p.vectors[v] for p in parts]) for v in parts[0].vectors},
            n=np.concatenate([p.n for p in parts]),
            keys=[k for p in parts for k in p.keys],
            concepts=[c for p in parts for c in p.concepts],
            errors=errors,
            shapes=parts[0].shapes,
        )


def gather_features(features: Features) -> Features:
    """Every rank's features (under DDP; else just these), ordered by key so sharding cannot change results."""
    merged = Features.concat(gather(features))
    ordered = merged.select(np.argsort(np.array(merged.keys, dtype=str), kind="stable"))
    ordered.errors = merged.errors
    return ordered


def voter_mismatch(got: dict[str, int], expected: dict[str, int]) -> str | None:
    """Why a LoRA's voters (names and feature sizes) differ from the expected ones, or None."""

    def show(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "") if names else "none"

    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or extra:
        return f"layers do not match the model: missing {show(missing)}; extra {show(extra)}"
    resized = sorted(v for v in got if got[v] != expected[v])
    if resized:
        v = resized[0]
        return f"feature sizes do not match the model (another rank?): {v} has {got[v]}, expected {expected[v]}"
    return None


def shape_mismatch(got: dict[str, tuple[int, int]], expected: dict[str, tuple[int, int]]) -> str | None:
    """The first layer whose (out, in) differs from the model's: a LoRA of another base model, or None."""
    for layer, shape in expected.items():
        if layer in got and tuple(got[layer]) != tuple(shape):
            return (
                f"layer {layer} has shape {tuple(got[layer])}, the model's has {tuple(shape)} (out, in): "
                "a LoRA of another base model, refused"
            )
    return None
