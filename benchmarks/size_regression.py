"""Which size regression: held-out-concept MAE of candidate estimators of N on the bundled zoo.

`python -m benchmarks.size_regression [--zoo data/zoo] [--shuffles 5]` features the zoo once (spectra
cache under .cache/), then for 5-fold leave-concepts-out splits, repeated over shuffles, fits each
candidate on some sizes and measures MAE on the held-out concepts' other sizes. The candidates:
- `ridge (dsire)`: `dsire.models.regression.SizeRegressor`, ridge of log N on log spectra;
- `k-NN log N`: each voter's 3 nearest zoo LoRAs' mean log N, median over voters;
- `isotonic`: a monotone fit of log N on the mean log ‖ΔW‖F of the layers;
- `classifier`: the DSiRe vote (it can only answer trained sizes), as the reference.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.isotonic import IsotonicRegression

from benchmarks.report import command_line, write_section
from dsire.data.splits import kfold
from dsire.featurise import zoo_features
from dsire.models.features import Features, FeatureSpec
from dsire.models.knn import KNNVote
from dsire.models.regression import SizeRegressor

SETTINGS = (((1, 3, 5), (2, 4, 6)), ((2, 4, 6), (1, 3, 5)), ((1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 5, 6)))


def default_voters(zoo: Path, cache: Path) -> Features:
    """The zoo's features with the model's default voters (σ of ΔW, down and up per layer)."""
    source = {"kind": "manifest", "path": str(zoo)}
    features = zoo_features(source, cache_dir=str(cache))
    return replace(features, vectors=FeatureSpec().derive(features.vectors))


def knn_log_n(train: Features, test: Features) -> np.ndarray:
    knn = KNNVote(k=3).fit(train.vectors, train.n)
    per_voter = [np.log(knn.labels[ids]).mean(axis=1) for _, ids in knn.neighbours(test.vectors, 3)]
    return np.exp(np.median(per_voter, axis=0))


def mean_log_norm(features: Features) -> np.ndarray:
    return np.mean([np.log(np.linalg.norm(x, axis=1)) for v, x in features.vectors.items() if v.endswith("/delta")], 0)


def isotonic(train: Features, test: Features) -> np.ndarray:
    fit = IsotonicRegression(increasing=False, out_of_bounds="clip").fit(mean_log_norm(train), np.log(train.n))
    return np.exp(fit.predict(mean_log_norm(test)))


CANDIDATES = {
    "ridge (dsire)": lambda train, test: SizeRegressor().fit(train.vectors, train.n).predict(test.vectors),
    "k-NN log N": knn_log_n,
    "isotonic": isotonic,
    "classifier": lambda train, test: KNNVote().fit(train.vectors, train.n).predict(test.vectors).n,
}


def measure(features: Features, train_sizes: tuple, test_sizes: tuple, shuffles: int) -> dict[str, float]:
    concepts = np.array(features.concepts)
    errors: dict[str, list] = {name: [] for name in CANDIDATES}
    for seed in range(shuffles):
        for split in kfold(sorted(set(features.concepts)), folds=5, seed=seed):
            train = features.select(np.isin(concepts, split.train) & np.isin(features.n, train_sizes))
            test = features.select(np.isin(concepts, split.test) & np.isin(features.n, test_sizes))
            for name, predict in CANDIDATES.items():
                errors[name].append(np.abs(predict(train, test) - test.n))
    return {name: float(np.concatenate(e).mean()) for name, e in errors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("data/zoo"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/spectra"))
    parser.add_argument("--shuffles", type=int, default=5)
    args = parser.parse_args()
    features = default_voters(args.zoo, args.cache)
    lines = [
        f"Held-out-concept MAE (images) on `{args.zoo}`, 5 folds × {args.shuffles} shuffles. "
        f"Command: `{command_line()}`.",
        "",
        "| fit on N | tested on N | " + " | ".join(CANDIDATES) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in CANDIDATES) + " |",
    ]
    for train_sizes, test_sizes in SETTINGS:
        mae = measure(features, train_sizes, test_sizes, args.shuffles)
        cells = " | ".join(f"{mae[name]:.3f}" for name in CANDIDATES)
        lines.append(f"| {','.join(map(str, train_sizes))} | {','.join(map(str, test_sizes))} | {cells} |")
    table = "\n".join(lines)
    print(table)
    write_section("size_regression", "## Size regression: which estimator\n\n" + table)


if __name__ == "__main__":
    main()
