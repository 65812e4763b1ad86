"""`DSiReModule`: dataset-size recovery as a LightningModule (no gradient training).

Lightning runs the featurisation: `predict_step` turns a batch of zoo items into per-voter
feature vectors, computing spectra on the module's device (GPU when present) for items the
cache did not have. Fitting is `fit(features)`: normalisation + one FAISS index per voter.
`test_step` featurises; at the end of a test run the held-out set (gathered from every rank under
DDP) is predicted at once, and `test_features` and `test_results` (metrics via torchmetrics) hold
what callbacks and the runner report, computed once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lightning.pytorch as pl
import numpy as np
import torch
from torchmetrics import MeanAbsoluteError, MeanAbsolutePercentageError
from torchmetrics.functional.classification import multiclass_confusion_matrix

from dsire.data.cache import SpectraCache
from dsire.distributed import gather
from dsire.models.calibration import Calibration, FitPredict, calibrate
from dsire.models.config import ModelConfig
from dsire.models.features import FeatureSpec, stack
from dsire.models.knn import KNNVote, Prediction
from dsire.models.regression import SizeRegressor
from dsire.spectra import batch_spectra


@dataclass
class Features:
    """Feature vectors of a set of LoRAs, with their labels and the items that failed."""

    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    n: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    keys: list[str] = field(default_factory=list)
    concepts: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def select(self, keep: np.ndarray) -> Features:
        """The LoRAs picked by `keep` (a boolean mask or indices, in that order); errors are not kept."""
        rows = np.arange(len(self.keys))[keep]
        return Features(
            vectors={v: x[rows] for v, x in self.vectors.items()},
            n=self.n[rows],
            keys=[self.keys[i] for i in rows],
            concepts=[self.concepts[i] for i in rows],
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
        )


def gather_features(features: Features) -> Features:
    """Every rank's features (under DDP; else just these), ordered by key so sharding cannot change results."""
    merged = Features.concat(gather(features))
    ordered = merged.select(np.argsort(np.array(merged.keys, dtype=str), kind="stable"))
    ordered.errors = merged.errors
    return ordered


@dataclass
class Estimate:
    """Per LoRA: N as a number, its prediction interval, and whether it looks like another recipe."""

    n: np.ndarray
    low: np.ndarray
    high: np.ndarray
    mismatch_p: np.ndarray  # conformal p-value of the nearest distance against held-out zoo LoRAs
    mismatch: np.ndarray  # p < false_alarm: farther from the zoo than its own unseen concepts


class DSiReModule(pl.LightningModule):
    _test: list[Features]

    def __init__(
        self,
        parts: tuple[str, ...] = ("delta", "down", "up"),
        num_sv: int | None = None,
        k: int = 1,
        weighting: str = "uniform",
        normalisation: str = "global",
        spectra_dtype: str = "float32",
        use_faiss_gpu: bool = True,
        index: str = "Flat",
        index_search: str = "",
        coverage: float = 0.9,
        false_alarm: float = 0.05,
        calibration_folds: int = 5,
        calibration_points: int = 2000,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.config = ModelConfig(**self.hparams)  # refuses a bad value, naming its key
        self.spec = FeatureSpec(self.config.parts, num_sv)
        self.knn = self._new_knn()
        self.regressor = SizeRegressor()
        self.calibration: Calibration | None = None  # intervals and mismatch p-values; None below 2 concepts
        self.spectra_dtype = getattr(torch, spectra_dtype)
        self.cache: SpectraCache | None = None  # set by the runner to fill the cache on misses
        self.metadata: dict[str, str] = {}  # recipe facts saved with the checkpoint
        self.computed = 0  # LoRAs whose spectra this module computed from their weights
        self.cached = 0  # LoRAs whose spectra came from the cache
        self._test = []

    # --- featurisation -------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch: list[dict], device: torch.device, dataloader_idx: int) -> list[dict]:
        """Items stay on the CPU as they are; `featurise` moves stacked factors to the device."""
        return batch

    def featurise(self, batch: list[dict]) -> Features:
        errors = {item["key"]: item["error"] for item in batch if "error" in item}
        good = [item for item in batch if "error" not in item]
        todo = [item for item in good if "spectra" not in item]
        self.computed += len(todo)
        self.cached += len(good) - len(todo)
        for item, spectra in zip(
            todo, batch_spectra([i["lora"] for i in todo], self.device, self.spectra_dtype), strict=True
        ):
            item["spectra"] = spectra
            if self.cache is not None:
                self.cache.put(item["entry"], spectra)
        rows = [self.spec.vectors(item["spectra"]) for item in good]
        # a fitted model's voters and sizes, else the first LoRA's: every LoRA must match them
        expected = self.knn.dims() or ({v: len(x) for v, x in rows[0].items()} if rows else {})
        matching = []
        for item, row in zip(good, rows, strict=True):
            problem = _mismatch({v: len(x) for v, x in row.items()}, expected)
            if problem:
                errors[item["key"]] = problem
            else:
                matching.append((item, row))
        good, rows = [item for item, _ in matching], [row for _, row in matching]
        if not good:
            return Features(errors=errors)
        return Features(
            vectors=stack(rows),
            n=np.array([item["n"] for item in good], np.int64),
            keys=[item["key"] for item in good],
            concepts=[item["concept"] for item in good],
            errors=errors,
        )

    def predict_step(self, batch: list[dict], batch_idx: int) -> Features:
        return self.featurise(batch)

    # --- fitting and prediction ---------------------------------------------------------------
    def _new_knn(self) -> KNNVote:
        h = self.hparams
        return KNNVote(h.k, h.weighting, h.normalisation, h.use_faiss_gpu, h.index, h.index_search)

    def fit(self, features: Features) -> DSiReModule:
        """The vote's indices, the size regression, and their calibration on held-out concepts."""
        if not features.keys:
            raise ValueError("no readable LoRAs to fit on")
        self.knn.fit(features.vectors, features.n)
        self.regressor.fit(features.vectors, features.n)
        h = self.hparams
        self.calibration = calibrate(
            features.concepts,
            features.n,
            self._held_out(features),
            h.calibration_folds,
            h.coverage,
            h.false_alarm,
            h.calibration_points,
        )
        return self

    def _held_out(self, features: Features) -> FitPredict:
        """Fit on some of `features`, predict the others: log N̂ and nearest distance, as for a new LoRA."""

        def fit_predict(train: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            fit, test = features.select(train), features.select(held)
            distance = self._new_knn().fit(fit.vectors, fit.n).predict(test.vectors).distance
            return SizeRegressor().fit(fit.vectors, fit.n).predict_log(test.vectors), distance

        return fit_predict

    def check_voters(self, features: Features) -> None:
        """A clear error when the LoRAs' layers are not the ones the model was fitted on."""
        problem = _mismatch({v: x.shape[1] for v, x in features.vectors.items()}, self.knn.dims())
        if features.keys and problem:
            raise ValueError(problem)

    def predict_features(self, features: Features) -> Prediction:
        self.check_voters(features)
        return self.knn.predict(features.vectors)

    def estimate(self, features: Features, prediction: Prediction) -> Estimate:
        """The regression estimate of N, its conformal interval, and the recipe-mismatch p-value."""
        n = self.regressor.predict(features.vectors)
        if self.calibration is None:
            unknown = np.full_like(n, np.nan)
            return Estimate(n, unknown, unknown, unknown, np.zeros(len(n), bool))
        low, high = self.calibration.interval(n)
        p = self.calibration.mismatch_p(prediction.distance)
        return Estimate(n, low, high, p, p < self.calibration.false_alarm)

    # --- evaluation ---------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._test = []

    def test_step(self, batch: list[dict], batch_idx: int) -> None:
        self._test.append(self.featurise(batch))

    def on_test_epoch_end(self) -> None:
        """Predict the whole held-out set at once, after gathering it from every rank."""
        self.test_features = gather_features(Features.concat(self._test))
        self.test_results = self._results(self.test_features)

    def _results(self, features: Features) -> dict:
        """Metrics over a test set: accuracy, MAE, MAPE, per-size accuracy, confusion, per-voter; regression."""
        if not features.keys:
            return {"errors": features.errors}
        prediction = self.predict_features(features)
        predicted, truth = prediction.n, features.n
        y, yhat = torch.from_numpy(truth).double(), torch.from_numpy(predicted).double()
        sizes = sorted(set(self.knn.sizes.tolist()) | set(truth.tolist()))
        confusion = multiclass_confusion_matrix(
            torch.from_numpy(np.searchsorted(sizes, predicted)),
            torch.from_numpy(np.searchsorted(sizes, truth)),
            num_classes=len(sizes),
        )  # rows: true N, columns: predicted N
        per_size = confusion.diag() / confusion.sum(dim=1).clamp(min=1)
        return {
            "accuracy": float(confusion.diag().sum() / confusion.sum()),
            "mae": float(MeanAbsoluteError()(yhat, y)),
            "mape": float(MeanAbsolutePercentageError()(yhat, y)),
            "per_size_accuracy": {int(s): float(per_size[sizes.index(s)]) for s in np.unique(truth)},
            "confusion": {"sizes": sizes, "counts": confusion.tolist()},
            "per_voter_accuracy": dict(
                zip(self.knn.voters, np.mean(prediction.voter_labels == truth[:, None], axis=0).tolist(), strict=True)
            ),
            "predictions": list(zip(features.keys, truth.tolist(), predicted.tolist(), strict=True)),
            "errors": features.errors,
        } | _estimate_metrics(features, predicted, self.estimate(features, prediction), self.knn.sizes)


INTERVAL_UNDEFINED = (
    "no interval: the calibration has too few held-out LoRAs (or concepts) for model.coverage, so its bounds "
    "are infinite and coverage and width are not reported"
)


def _estimate_metrics(features: Features, predicted: np.ndarray, estimate: Estimate, sizes: np.ndarray) -> dict:
    """Regression error, interval coverage and width, mismatch (false-alarm) rate; seen vs unseen sizes."""
    truth = features.n
    error = np.abs(estimate.n - truth)
    inside = (estimate.low <= truth) & (truth <= estimate.high)
    out = {
        "regression_mae": float(error.mean()),
        "estimates": [
            [key, int(t), *(round(float(x), 4) for x in row)]
            for key, t, *row in zip(
                features.keys, truth, estimate.n, estimate.low, estimate.high, estimate.mismatch_p, strict=True
            )
        ],  # key, N, estimate, low, high, mismatch p
    }
    if np.isfinite(estimate.mismatch_p).all():
        out["mismatch_rate"] = float(estimate.mismatch.mean())
    intervals = bool(np.isfinite(estimate.high).all())
    if intervals:
        out |= {"coverage": float(inside.mean()), "interval_width": float((estimate.high - estimate.low).mean())}
    else:  # an infinite interval covers everything: a coverage of 1 would say nothing
        out["interval_undefined"] = INTERVAL_UNDEFINED
    seen = np.isin(truth, sizes)
    if seen.any() and not seen.all():  # sizes absent from training: how well does the estimate interpolate?
        out |= {
            "mae_seen": float(np.abs(predicted - truth)[seen].mean()),
            "regression_mae_unseen": float(error[~seen].mean()),
        }
        if intervals:
            out["coverage_unseen"] = float(inside[~seen].mean())
        between = ~seen & (truth > sizes.min()) & (truth < sizes.max())  # between trained sizes, vs beyond them
        for name, part in (("between", between), ("beyond", ~seen & ~between)):
            if part.any():
                out[f"regression_mae_{name}"] = float(error[part].mean())
    return out


def _mismatch(got: dict[str, int], expected: dict[str, int]) -> str | None:
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
