"""`DSiReModule`: dataset-size recovery as a LightningModule (no gradient training).

Lightning runs the featurisation: `predict_step` turns a batch of zoo items into per-voter
feature vectors, computing spectra on the module's device (GPU when present) for items the
cache did not have. Fitting is `fit(features)`: with `select` (model/select=auto), model selection on
those LoRAs only (`dsire.models.select`), then normalisation + one FAISS index per chosen voter. With
the answer `estimate` chosen, the predicted N is the zoo size nearest the size estimate; the vote's
share and each voter's label still describe the vote.
`test_step` featurises; at the end of a test run the held-out set (gathered from every rank under
DDP) is predicted at once, and `test_features` and `test_results` (`dsire.models.metrics`) hold
what callbacks and the runner report, computed once. The feature container is
`dsire.models.features.Features`; this module is the Lightning glue around it.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dsire.data.cache import SpectraCache
from dsire.models.calibration import Calibration, Estimate, FitPredict, calibrate
from dsire.models.config import ModelConfig
from dsire.models.features import ALL, Features, FeatureSpec, gather_features, shape_mismatch, stack, voter_mismatch
from dsire.models.knn import KNNVote, Prediction
from dsire.models.metrics import split_metrics
from dsire.models.regression import SizeRegressor
from dsire.models.select import Candidate, SelectConfig, Selection, select
from dsire.settings import from_config
from dsire.spectra import batch_spectra


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
        spectra_precision: str = "exact",
        use_faiss_gpu: bool = True,
        index: str = "Flat",
        index_search: str = "",
        coverage: float = 0.9,
        false_alarm: float = 0.05,
        calibration_folds: int = 5,
        calibration_points: int = 2000,
        select: dict | None = None,
    ):
        super().__init__()
        if isinstance(select, DictConfig):  # from Hydra: saved with the checkpoint as plain JSON
            select = OmegaConf.to_container(select, resolve=True)
        self.save_hyperparameters()
        self.config = from_config(ModelConfig, OmegaConf.create(dict(self.hparams)), "model")  # names a bad key
        self.selector = from_config(SelectConfig, select, "model.select") if select else None
        if self.selector is not None and not self.selector.enabled:
            self.selector = None
        # the fixed configuration (model.parts, num_sv, normalisation, k, weighting); with selection the first candidate
        c = self.config
        self.chosen = Candidate(",".join(c.parts), num_sv, c.normalisation, c.k, c.weighting)
        self.selection: Selection | None = None
        # featurisation: the fixed voters, or with selection every part (the candidates are slices of them)
        self.spec = FeatureSpec(self.config.parts, num_sv) if self.selector is None else ALL
        self.knn = self._new_knn()
        self.regressor = SizeRegressor()
        self.calibration: Calibration | None = None  # intervals and mismatch p-values; None below 2 concepts
        self.spectra_dtype = getattr(torch, spectra_dtype)
        self.cache: SpectraCache | None = None  # set by the runner to fill the cache on misses
        self.metadata: dict[str, str] = {}  # recipe facts saved with the checkpoint
        self.shapes: dict[str, tuple[int, int]] = {}  # the fitted zoo's layer (out, in): its base model
        self.inputs: dict[str, int] = {}  # featurised vectors' sizes, {"layer/part": d}: every LoRA must match
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
            todo,
            batch_spectra([i["lora"] for i in todo], self.device, self.spectra_dtype, self.config.spectra_precision),
            strict=True,
        ):
            item["spectra"] = spectra
            item["shapes"] = {name: layer.shape for name, layer in item["lora"].layers.items()}
            if self.cache is not None:
                self.cache.put(item["entry"], spectra, item["shapes"])
        rows = [self.spec.vectors(item["spectra"]) for item in good]
        # a fitted model's vector sizes and layer shapes, else those of the first LoRA this module
        # featurised: every LoRA must match them
        if not self.shapes and good:
            self.shapes, self.inputs = dict(good[0]["shapes"]), {v: len(x) for v, x in rows[0].items()}
        matching = []
        for item, row in zip(good, rows, strict=True):
            problem = voter_mismatch({v: len(x) for v, x in row.items()}, self.inputs) or shape_mismatch(
                item["shapes"], self.shapes
            )
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
            shapes=dict(self.shapes),
        )

    def predict_step(self, batch: list[dict], batch_idx: int) -> Features:
        return self.featurise(batch)

    # --- fitting and prediction ---------------------------------------------------------------
    def _new_knn(self) -> KNNVote:
        h, c = self.hparams, self.chosen
        return KNNVote(c.k, c.weighting, c.normalisation, h.use_faiss_gpu, h.index, h.index_search)

    def voters(self, vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The chosen voters from featurised vectors (without selection they are the voters)."""
        return vectors if self.selector is None else self.chosen.spec().derive(vectors)

    def fit(self, features: Features) -> DSiReModule:
        """Selection (if enabled) on these LoRAs only, then the vote's indices, the size regression, and
        their calibration on held-out concepts."""
        if not features.keys:
            raise ValueError("no readable LoRAs to fit on")
        if self.selector is not None:
            self.selection = select(features, self.chosen, self.selector)
            self.chosen = self.selection.chosen
            self.knn = self._new_knn()
        vectors = self.voters(features.vectors)
        self.knn.fit(vectors, features.n)
        if self.selection is not None and self.selection.voter_weights is not None:
            self.knn.voter_weights = self.selection.voter_weights
        self.shapes = dict(features.shapes) or self.shapes
        self.inputs = {v: x.shape[1] for v, x in features.vectors.items()}
        self.regressor.fit(vectors, features.n)
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
        vectors = self.voters(features.vectors)

        def fit_predict(train: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            fit = {v: x[train] for v, x in vectors.items()}
            test = {v: x[held] for v, x in vectors.items()}
            distance = self._new_knn().fit(fit, features.n[train]).predict(test).distance
            return SizeRegressor().fit(fit, features.n[train]).predict_log(test), distance

        return fit_predict

    def check_voters(self, features: Features) -> None:
        """A clear error when the LoRAs' layers are not the ones the model was fitted on."""
        problem = voter_mismatch({v: x.shape[1] for v, x in features.vectors.items()}, self.inputs)
        if features.keys and problem:
            raise ValueError(problem)

    def predict_features(self, features: Features) -> Prediction:
        """The vote; with `answer=estimate` chosen, the zoo size nearest the size estimate answers."""
        self.check_voters(features)
        vectors = self.voters(features.vectors)
        prediction = self.knn.predict(vectors)
        if self.chosen.answer == "estimate":
            sizes, estimate = self.knn.sizes, self.regressor.predict(vectors)
            prediction.n = sizes[np.abs(estimate[:, None] - sizes[None, :]).argmin(axis=1)]
        return prediction

    def estimate(self, features: Features, prediction: Prediction) -> Estimate:
        """The regression estimate of N, its conformal interval, and the recipe-mismatch p-value."""
        n = self.regressor.predict(self.voters(features.vectors))
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
        """Metrics over a test set (see `dsire.models.metrics`)."""
        if not features.keys:
            return {"errors": features.errors}
        prediction = self.predict_features(features)
        estimate = self.estimate(features, prediction)
        return split_metrics(features, prediction, estimate, self.knn.voters, self.knn.sizes)
