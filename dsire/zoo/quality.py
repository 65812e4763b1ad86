"""A lightweight check that a zoo carries the dataset-size signal DSiRe needs.

This is a zoo check, not the DSiRe model (that is a Lightning module of its own). On a zoo
directory (manifest + files) it measures:
- Spearman correlation of mean ‖ΔW‖F with N, across the zoo and within each concept;
- the paper's method under leave-concepts-out: per layer, the first r singular values of ΔW
  (optionally concatenated with those of A = down and B = up), one global min-max normalisation fit
  on the training concepts, one 1-NN FAISS index per layer, majority vote over layers (the voter of
  `dsire.models.knn`, with its tie rule); accuracy and MAE averaged over concept folds and shuffles.

    python -m dsire.zoo.quality data/zoo [--parts delta,down,up] [--folds 5] [--repeats 5] [--group 'd[0-9]'] [--step S]
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from dsire.data.splits import kfold
from dsire.errors import report_user_errors
from dsire.featurise import zoo_features as featurised
from dsire.loggers import quiet_library_noise
from dsire.models.features import FeatureSpec
from dsire.models.knn import KNNVote

PARTS = ("delta",)
SIZE_SETS = {"N = 1..6": None, "N ∈ {1,3,6}": (1, 3, 6), "N ∈ {1,6}": (1, 6)}


@dataclass
class ZooFeatures:
    voters: dict[str, np.ndarray]  # layer -> [models, r × parts]
    n: np.ndarray
    concepts: np.ndarray
    delta_norm: np.ndarray  # mean ‖ΔW‖F over layers, per model


def zoo_features(zoo_dir: str | Path, parts: tuple[str, ...] = PARTS, step: int | None = None) -> ZooFeatures:
    """Per-layer spectra (fp32, whatever the storage dtype) of the manifest's checkpoints at one snapshot
    `step` (default: the last), featurised as `train.py` does; unreadable LoRAs are reported and left out."""
    features = featurised({"kind": "manifest", "path": str(zoo_dir), "step": step})
    for key, problem in features.errors.items():
        print(f"skipped {key}: {problem}")
    layers = dict.fromkeys(voter.rsplit("/", 1)[0] for voter in features.vectors)
    return ZooFeatures(
        voters=FeatureSpec(parts, concat=True).derive(features.vectors),
        n=features.n,
        concepts=np.array(features.concepts),
        delta_norm=np.mean([features.vectors[f"{layer}/norms"][:, 0] for layer in layers], axis=0),
    )


def vote(train: dict[str, np.ndarray], train_n: np.ndarray, test: dict[str, np.ndarray]) -> np.ndarray:
    """The paper's prediction by the DSiRe model's own voter: global min-max, 1-NN per layer, majority."""
    return KNNVote().fit(train, train_n).predict(test).n


def leave_concepts_out(
    features: ZooFeatures, sizes: tuple[int, ...] | None, folds: int, repeats: int = 1
) -> tuple[float, float]:
    """Mean accuracy and MAE over `folds` groups of held-out concepts, for `repeats` shuffles."""
    keep = np.isin(features.n, sizes) if sizes else np.ones(len(features.n), bool)
    accuracies, errors = [], []
    concepts = sorted(set(features.concepts[keep].tolist()))
    for seed in range(repeats):
        for split in kfold(concepts, folds, seed):  # the folds train.py uses (seed 0 there)
            test = keep & np.isin(features.concepts, split.test)
            train = keep & ~test
            predicted = vote(
                {k: v[train] for k, v in features.voters.items()},
                features.n[train],
                {k: v[test] for k, v in features.voters.items()},
            )
            accuracies.append(float(np.mean(predicted == features.n[test])))
            errors.append(float(np.mean(np.abs(predicted - features.n[test]))))
    return float(np.mean(accuracies)), float(np.mean(errors))


def norm_correlations(features: ZooFeatures) -> tuple[float, float]:
    """Spearman ρ of mean ‖ΔW‖F with N across the zoo, and its mean within concepts."""
    across = spearmanr(features.delta_norm, features.n).statistic
    within = [
        spearmanr(features.delta_norm[features.concepts == c], features.n[features.concepts == c]).statistic
        for c in np.unique(features.concepts)
    ]
    return float(across), float(np.mean(within))


def grouped(features: ZooFeatures, pattern: str) -> ZooFeatures:
    """Concepts replaced by their group, the part of the name `pattern` matches (e.g. `d[0-9]`: the digit
    class): holding out whole groups is a stricter split, with no sibling concept left in training."""
    return replace(features, concepts=np.array([re.match(pattern, c).group(0) for c in features.concepts]))


def report(
    zoo_dir: str | Path,
    parts: tuple[str, ...] = PARTS,
    folds: int = 5,
    repeats: int = 5,
    group: str | None = None,
    step: int | None = None,
) -> dict[str, float]:
    """All the zoo's figures, keyed by name (what the README records)."""
    features = zoo_features(zoo_dir, parts, step)
    across, within = norm_correlations(features)
    result = {"spearman_norm_vs_n": across, "spearman_within_concept": within}
    folded = grouped(features, group) if group else features
    for label, sizes in SIZE_SETS.items():
        accuracy, mae = leave_concepts_out(folded, sizes, folds, repeats)
        result[f"accuracy {label}"], result[f"mae {label}"] = accuracy, mae
    return result


@report_user_errors
def main() -> None:
    quiet_library_noise()
    parser = argparse.ArgumentParser(description="Dataset-size signal of a zoo (paper method, leave-concepts-out)")
    parser.add_argument("zoo_dir")
    parser.add_argument("--parts", default=",".join(PARTS), help="spectra concatenated per layer: delta, down, up")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="shuffles of the concepts into folds")
    parser.add_argument("--group", help="regex: hold out whole groups of concepts, e.g. 'd[0-9]' (digit class)")
    parser.add_argument("--step", type=int, help="snapshot step to measure (default: the last)")
    args = parser.parse_args()
    figures = report(args.zoo_dir, tuple(args.parts.split(",")), args.folds, args.repeats, args.group, args.step)
    for key, value in figures.items():
        print(f"{key:32s} {value:+.3f}")


if __name__ == "__main__":
    main()
