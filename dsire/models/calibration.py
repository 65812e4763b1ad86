"""Honest uncertainty from held-out concepts: conformal intervals for N and a recipe-mismatch score.

Both are calibrated by one cross-fitting pass over the zoo's concepts: for each fold, the model is fit
on the other concepts and predicts the held-out ones, exactly as it will predict a LoRA of a concept
it has never seen. That gives, for every zoo LoRA, a held-out error |log N − log N̂| and a held-out
nearest-neighbour distance.

- Interval (in log N so its width scales with N): N̂·exp(±q) around the refit model's estimate, q the
  ⌈(m+1)·coverage⌉-th smallest of the m held-out errors (infinite when m is too small for the target).
  This is K-fold cross-conformal with a refit (Barber et al. 2021's "CV" interval), not split-conformal:
  it has no finite-sample guarantee. The cross-fit's models see (K−1)/K of the concepts, so their
  held-out errors and distances run larger than the refit model's: intervals and mismatch p-values
  are conservative, the more so the fewer the folds.
- Recipe mismatch: a LoRA's mean nearest-neighbour distance over voters, as a conformal p-value
  against the held-out distances of the zoo's own LoRAs: the share of them at least as far. A LoRA
  from the zoo's recipe gets p < `false_alarm` with probability at most about `false_alarm`; a LoRA that sits
  farther from the zoo than the zoo's own unseen concepts do gets a small p and is flagged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dsire.data.splits import kfold

# fit on the first set of LoRAs, then (held-out log N̂, held-out nearest distance) for the second
FitPredict = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class Estimate:
    """Per LoRA: N as a number, its prediction interval, and whether it looks like another recipe."""

    n: np.ndarray
    low: np.ndarray
    high: np.ndarray
    mismatch_p: np.ndarray  # conformal p-value of the nearest distance against held-out zoo LoRAs
    mismatch: np.ndarray  # p < false_alarm: farther from the zoo than its own unseen concepts


@dataclass
class Calibration:
    errors: np.ndarray  # held-out |log N − log N̂| of the zoo's LoRAs, sorted
    distances: np.ndarray  # held-out nearest-neighbour distances of the zoo's LoRAs, sorted
    coverage: float
    false_alarm: float

    @property
    def log_half_width(self) -> float:
        rank = math.ceil((len(self.errors) + 1) * self.coverage)
        return float(self.errors[rank - 1]) if rank <= len(self.errors) else math.inf

    def interval(self, estimate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = self.log_half_width
        return estimate * math.exp(-q) if math.isfinite(q) else np.zeros_like(estimate), estimate * math.exp(q)

    def mismatch_p(self, distance: np.ndarray) -> np.ndarray:
        """Conformal p-value: (1 + zoo LoRAs at least as far) / (1 + zoo LoRAs)."""
        farther = len(self.distances) - np.searchsorted(self.distances, distance, side="left")
        return (1 + farther) / (1 + len(self.distances))

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"calibration.errors": torch.from_numpy(self.errors)}
        tensors["calibration.distances"] = torch.from_numpy(self.distances)
        return tensors, {"coverage": self.coverage, "false_alarm": self.false_alarm}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], settings: dict) -> Calibration:
        errors, distances = tensors["calibration.errors"].double(), tensors["calibration.distances"].double()
        if errors.dim() != 1 or distances.dim() != 1 or not (errors.isfinite().all() and distances.isfinite().all()):
            raise ValueError("calibration tensors must be finite 1-D arrays")
        coverage, false_alarm = float(settings["coverage"]), float(settings["false_alarm"])
        return cls(np.sort(errors.numpy()), np.sort(distances.numpy()), coverage, false_alarm)


def calibrate(
    concepts: list[str],
    n: np.ndarray,
    fit_predict: FitPredict,
    folds: int,
    coverage: float,
    false_alarm: float,
    max_points: int = 2000,
) -> Calibration | None:
    """Cross-fit over concept folds; None when there are fewer than two concepts to hold out.

    At most `max_points` zoo LoRAs (a seeded sample) are predicted: a few thousand calibrate a
    90% or 95% level well, and predicting all of a 10⁵-LoRA zoo against itself would cost O(n²).
    """
    unique = sorted(set(concepts))
    if len(unique) < 2:
        return None
    labels = np.asarray(concepts)
    probe = np.zeros(len(n), bool)
    probe[np.random.default_rng(0).permutation(len(n))[:max_points]] = True
    errors, distances = [], []
    for split in kfold(unique, min(folds, len(unique)), seed=0):
        held = np.isin(labels, split.test) & probe
        if not held.any():
            continue
        log_estimate, distance = fit_predict(np.flatnonzero(~np.isin(labels, split.test)), np.flatnonzero(held))
        errors.append(np.abs(np.log(n[held]) - log_estimate))
        distances.append(distance)
    return Calibration(np.sort(np.concatenate(errors)), np.sort(np.concatenate(distances)), coverage, false_alarm)
