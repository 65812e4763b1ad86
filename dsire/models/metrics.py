"""Metrics of a test set: the vote (accuracy, MAE, MAPE, per size, confusion, per voter) and the size
estimate (error, interval coverage and width, mismatch rate; seen against unseen sizes)."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import MeanAbsoluteError, MeanAbsolutePercentageError
from torchmetrics.functional.classification import multiclass_confusion_matrix

from dsire.models.calibration import Estimate
from dsire.models.features import Features
from dsire.models.knn import Prediction


def split_metrics(
    features: Features, prediction: Prediction, estimate: Estimate, voters: list[str], trained_sizes: np.ndarray
) -> dict:
    """Every metric `train.py` reports for one split; `trained_sizes` are the N the model was fit on."""
    predicted, truth = prediction.n, features.n
    y, yhat = torch.from_numpy(truth).double(), torch.from_numpy(predicted).double()
    sizes = sorted(set(trained_sizes.tolist()) | set(truth.tolist()))
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
            zip(voters, np.mean(prediction.voter_labels == truth[:, None], axis=0).tolist(), strict=True)
        ),
        "predictions": list(zip(features.keys, truth.tolist(), predicted.tolist(), strict=True)),
        "errors": features.errors,
    } | _estimate_metrics(features, predicted, estimate, trained_sizes)


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
