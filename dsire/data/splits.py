"""Splits grouped by concept: no concept is ever on both sides.

- `kfold`: concepts shuffled once, cut into k folds; each fold is held out once.
- `paper`: the DSiRe protocol, `n_train` random training concepts and the rest evaluated,
  repeated `repeats` times with different seeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dsire.data.config import SplitConfig
from dsire.errors import UserError


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    test: tuple[str, ...]


def kfold(concepts: list[str], folds: int, seed: int = 0) -> list[Split]:
    if not 2 <= folds <= len(concepts):
        raise ValueError(f"{folds} folds need between 2 and {len(concepts)} concepts")
    order = sorted(concepts)
    random.Random(seed).shuffle(order)
    held = [order[i::folds] for i in range(folds)]
    return [Split(tuple(sorted(set(order) - set(h))), tuple(sorted(h))) for h in held]


def paper(concepts: list[str], n_train: int, repeats: int, seed: int = 0) -> list[Split]:
    if not 1 <= n_train < len(concepts):
        raise ValueError(f"n_train={n_train} must leave test concepts out of {len(concepts)}")
    rng = random.Random(seed)
    splits = []
    for _ in range(repeats):
        train = set(rng.sample(sorted(concepts), n_train))
        splits.append(Split(tuple(sorted(train)), tuple(sorted(set(concepts) - train))))
    return splits


def make_splits(concepts: list[str], config: SplitConfig) -> list[Split]:
    """The splits `config` asks for; too few concepts for them is an error naming the key."""
    if config.protocol == "kfold":
        if config.folds > len(concepts):
            raise UserError(
                "data.split.folds", f"{config.folds} folds need {config.folds} concepts; the zoo has {len(concepts)}"
            )
        return kfold(concepts, config.folds, config.seed)
    if config.n_train >= len(concepts):
        raise UserError("data.split.n_train", f"{config.n_train} leaves no test concept out of {len(concepts)}")
    return paper(concepts, config.n_train, config.repeats, config.seed)
