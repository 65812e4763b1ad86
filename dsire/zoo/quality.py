"""A lightweight check that a zoo carries the dataset-size signal DSiRe needs.

Measures, on a zoo directory (manifest + files):
- Spearman correlation of mean ‖ΔW‖F with N, across the zoo and within each concept;
- the paper's method under leave-concepts-out: per voter (layer × part) the first r singular values,
  global min-max normalisation fit on the training concepts, one 1-NN FAISS index per voter,
  majority vote (ties go to the smallest N); accuracy and MAE, averaged over concept folds.
The full DSiRe model (Lightning, options, checkpoints) is `dsire.models`; this module only checks zoos.

    python -m dsire.zoo.quality data/zoo [--parts delta,down,up] [--folds 5]
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from scipy.stats import spearmanr

from dsire.lora import load_lora
from dsire.spectra import batch_spectra
from dsire.zoo.sweep import read_manifest

PARTS = ("delta", "down", "up")
SIZE_SETS = {"N = 1..6": None, "N ∈ {1,3,6}": (1, 3, 6), "N ∈ {1,6}": (1, 6)}


@dataclass
class ZooFeatures:
    voters: dict[str, np.ndarray]  # "layer/part" -> [models, r]
    n: np.ndarray
    concepts: np.ndarray
    delta_norm: np.ndarray  # mean ‖ΔW‖F over layers, per model


def zoo_features(zoo_dir: str | Path, parts: tuple[str, ...] = PARTS, batch: int = 16) -> ZooFeatures:
    zoo_dir = Path(zoo_dir)
    rows = read_manifest(zoo_dir)
    voters: dict[str, list[np.ndarray]] = {}
    norms = []
    for start in range(0, len(rows), batch):
        loras = [load_lora(zoo_dir / row["path"]) for row in rows[start : start + batch]]
        for spectra in batch_spectra(loras):
            for layer, s in spectra.items():
                for part in parts:
                    voters.setdefault(f"{layer}/{part}", []).append(getattr(s, part).numpy())
            norms.append(np.mean([float(s.delta_norm) for s in spectra.values()]))
    return ZooFeatures(
        voters={k: np.stack(v).astype(np.float32) for k, v in voters.items()},
        n=np.array([int(r["n"]) for r in rows]),
        concepts=np.array([r["concept"] for r in rows]),
        delta_norm=np.array(norms),
    )


def vote(train: dict[str, np.ndarray], train_n: np.ndarray, test: dict[str, np.ndarray]) -> np.ndarray:
    """The paper's prediction: global min-max from the training features, 1-NN per voter, majority."""
    low = min(float(x.min()) for x in train.values())
    high = max(float(x.max()) for x in train.values())
    scale = (high - low) or 1.0
    votes = []
    for name, x in train.items():
        index = faiss.IndexFlatL2(x.shape[1])
        index.add((x - low) / scale)
        _, nearest = index.search((test[name] - low) / scale, 1)
        votes.append(train_n[nearest[:, 0]])
    votes = np.stack(votes, axis=1)  # [test models, voters]
    return np.array([min(Counter(row).items(), key=lambda kv: (-kv[1], kv[0]))[0] for row in votes])


def leave_concepts_out(
    features: ZooFeatures, sizes: tuple[int, ...] | None, folds: int, seed: int = 0
) -> tuple[float, float]:
    """Mean accuracy and MAE over `folds` groups of held-out concepts."""
    keep = np.isin(features.n, sizes) if sizes else np.ones(len(features.n), bool)
    concepts = np.unique(features.concepts[keep])
    np.random.default_rng(seed).shuffle(concepts)
    accuracies, errors = [], []
    for held_out in np.array_split(concepts, folds):
        test = keep & np.isin(features.concepts, held_out)
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


def report(zoo_dir: str | Path, parts: tuple[str, ...] = PARTS, folds: int = 5) -> dict[str, float]:
    features = zoo_features(zoo_dir, parts)
    across, within = norm_correlations(features)
    result = {"spearman_norm_vs_n": across, "spearman_within_concept": within}
    for label, sizes in SIZE_SETS.items():
        accuracy, mae = leave_concepts_out(features, sizes, folds)
        result[f"accuracy {label}"], result[f"mae {label}"] = accuracy, mae
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Dataset-size signal of a zoo (paper method, leave-concepts-out)")
    parser.add_argument("zoo_dir")
    parser.add_argument("--parts", default=",".join(PARTS), help="spectra used as voters: delta, down, up")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    for key, value in report(args.zoo_dir, tuple(args.parts.split(",")), args.folds).items():
        print(f"{key:32s} {value:+.3f}")


if __name__ == "__main__":
    main()
