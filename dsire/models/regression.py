"""Dataset size as a number, not a class: ridge regression of log N on log singular values.

The classifier can only answer sizes present in its zoo. A user asks "about how many images?", so
`SizeRegressor` fits log N as a linear function of the log spectra of every voter (the spectra shrink
roughly as a power of N, which is linear in log-log), with the ridge penalty chosen by scikit-learn's
efficient leave-one-out. Chosen by measurement against k-NN regression in log N, an isotonic fit on
log ‖ΔW‖ (both can only answer values inside the range of the sizes they have seen) and the
classifier, on sizes the fit has and has not seen: `python -m benchmarks.size_regression`, table in
benchmarks/README.md.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import RidgeCV

ALPHAS = np.logspace(-2, 4, 13)
EPS = 1e-6  # keeps the zero-padded values of rank-deficient layers finite in log space


class SizeRegressor:
    """fit(voter features, N) / predict(voter features) -> N estimates (floats)."""

    def __init__(self) -> None:
        self.voters: list[str] = []
        self.coef = np.zeros(0)
        self.intercept = 0.0
        self.alpha = 0.0

    def _design(self, features: dict[str, np.ndarray]) -> np.ndarray:
        x = np.concatenate([np.asarray(features[v], np.float64) for v in self.voters], axis=1)
        if (x < 0).any():
            raise ValueError("size regression needs spectra or norms (non-negative features)")
        return np.log(x + EPS)

    def fit(self, features: dict[str, np.ndarray], n: np.ndarray) -> SizeRegressor:
        self.voters = list(features)
        ridge = RidgeCV(alphas=ALPHAS).fit(self._design(features), np.log(np.asarray(n, np.float64)))
        self.coef, self.intercept, self.alpha = ridge.coef_, float(ridge.intercept_), float(ridge.alpha_)
        return self

    def predict_log(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return self._design(features) @ self.coef + self.intercept

    def predict(self, features: dict[str, np.ndarray]) -> np.ndarray:
        return np.exp(self.predict_log(features))

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {"regression.coef": torch.from_numpy(self.coef)}, {"intercept": self.intercept, "alpha": self.alpha}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], settings: dict, voters: list[str]) -> SizeRegressor:
        model = cls()
        model.voters, model.coef = list(voters), tensors["regression.coef"].double().numpy()
        model.intercept, model.alpha = float(settings["intercept"]), float(settings["alpha"])
        return model
