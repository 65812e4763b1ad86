"""`ModelConfig`: the DSiRe model's settings (`configs/model/dsire.yaml`), checked when they are built.

Every value is checked on its own, and a bad one raises `ConfigError` naming `model.<key>`, the value
and what is allowed, before any LoRA is read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from dsire.errors import is_int, is_number, require
from dsire.models.features import PARTS
from dsire.models.knn import NORMALISATIONS, WEIGHTINGS

DTYPES = ("float32", "float64")
SEARCH = re.compile(r"\w+=[0-9.]+(,\w+=[0-9.]+)*")  # FAISS ParameterSpace: name=value[,name=value ...]


@dataclass(frozen=True)
class ModelConfig:
    parts: tuple[str, ...] = ("delta", "down", "up")
    num_sv: int | None = None
    k: int = 1
    weighting: str = "uniform"
    normalisation: str = "global"
    spectra_dtype: str = "float32"
    use_faiss_gpu: bool = True
    index: str = "Flat"
    index_search: str = ""
    coverage: float = 0.9
    false_alarm: float = 0.05
    calibration_folds: int = 5
    calibration_points: int = 2000

    def __post_init__(self) -> None:
        listed = isinstance(self.parts, Sequence) and not isinstance(self.parts, str)
        parts = tuple(self.parts) if listed else self.parts
        ok = listed and bool(parts) and len(set(parts)) == len(parts) and set(parts) <= set(PARTS)
        require(ok, "model.parts", self.parts, f"a non-empty list of distinct parts from {list(PARTS)}")
        object.__setattr__(self, "parts", parts)
        require(
            self.num_sv is None or (is_int(self.num_sv) and self.num_sv >= 1),
            "model.num_sv",
            self.num_sv,
            "null (all singular values) or a whole number >= 1",
        )
        require(is_int(self.k) and self.k >= 1, "model.k", self.k, "a whole number >= 1 (neighbours per voter)")
        require(self.weighting in WEIGHTINGS, "model.weighting", self.weighting, f"one of {list(WEIGHTINGS)}")
        require(
            self.normalisation in NORMALISATIONS,
            "model.normalisation",
            self.normalisation,
            f"one of {list(NORMALISATIONS)}",
        )
        require(self.spectra_dtype in DTYPES, "model.spectra_dtype", self.spectra_dtype, f"one of {list(DTYPES)}")
        require(isinstance(self.use_faiss_gpu, bool), "model.use_faiss_gpu", self.use_faiss_gpu, "true or false")
        require(
            isinstance(self.index, str) and bool(self.index),
            "model.index",
            self.index,
            "a FAISS factory string such as Flat, HNSW32 or IVF1024,Flat",
        )
        require(
            isinstance(self.index_search, str) and (not self.index_search or SEARCH.fullmatch(self.index_search)),
            "model.index_search",
            self.index_search,
            "empty, or FAISS search parameters name=value[,name=value], e.g. 'model.index_search=\"efSearch=64\"'",
        )
        for key, value in (("coverage", self.coverage), ("false_alarm", self.false_alarm)):
            require(is_number(value) and 0 < value < 1, f"model.{key}", value, "a number strictly between 0 and 1")
        require(
            is_int(self.calibration_folds) and self.calibration_folds >= 2,
            "model.calibration_folds",
            self.calibration_folds,
            "a whole number >= 2",
        )
        require(
            is_int(self.calibration_points) and self.calibration_points >= 1,
            "model.calibration_points",
            self.calibration_points,
            "a whole number >= 1",
        )
