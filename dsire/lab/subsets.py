"""Which private examples each model trains on."""

from __future__ import annotations

import numpy as np


def half_masks(models: int, examples: int, seed: int) -> np.ndarray:
    """[models, examples] bool: every example is in exactly half of the models (LiRA's design: each
    example gets as many IN as OUT models); which half is a seeded draw per example."""
    if models < 2 or models % 2:
        raise ValueError(f"{models} models: an even number ≥ 2 is needed so every example is IN for half")
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((examples, models)), axis=1)  # a random permutation of models per example
    return (order < models // 2).T
