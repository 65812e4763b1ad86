"""The subset-removal check: retrain without each query's most helpful training examples and count
how often its prediction changes, against removing as many random examples.

A method whose top-scored examples really hold the prediction up flips it more often than random
removal does. Only queries the attributed model classifies correctly count; each retrained model
uses a fresh seed, so random removal also measures how often retraining alone changes a prediction.
"""

from __future__ import annotations

import numpy as np
import torch


def without_top(scores: torch.Tensor, count: int) -> np.ndarray:
    """Keep-masks [queries, examples] without each query's `count` highest positive scores (fewer when
    fewer are positive)."""
    keep = np.ones(tuple(scores.shape), dtype=bool)
    order = torch.argsort(scores, dim=1, descending=True)[:, :count]
    for q, chosen in enumerate(order):
        keep[q, chosen[scores[q, chosen] > 0].numpy()] = False
    return keep


def without_random(queries: int, examples: int, count: int, seed: int) -> np.ndarray:
    """Keep-masks [queries, examples] without `count` seeded random examples per query."""
    rng = np.random.default_rng(seed)
    keep = np.ones((queries, examples), dtype=bool)
    for row in keep:
        row[rng.choice(examples, count, replace=False)] = False
    return keep


def predictions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The predicted class (a measure for `measured_outputs`)."""
    return logits.argmax(dim=-1)


def flip_rate(predicted: torch.Tensor, original: torch.Tensor, labels: torch.Tensor) -> float:
    """Among queries the original model gets right, the fraction of (query, seed) retrainings whose
    prediction differs: `predicted` [queries, seeds] (query q's own retrained models)."""
    correct = original == labels
    if not correct.any():
        return float("nan")
    return float((predicted[correct] != original[correct, None]).float().mean())
