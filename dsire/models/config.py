"""`ModelConfig`: the DSiRe model's settings (`configs/model/dsire.yaml`), checked when they are built.

Built with `dsire.settings.from_config`: a wrong type, an unknown key or a value out of range is a
`UserError` naming `model.<key>`, the value and what is allowed, before any LoRA is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from dsire.models.features import PARTS, Part
from dsire.models.knn import Normalisation, Weighting
from dsire.settings import require

SEARCH = re.compile(r"\w+=[0-9.]+(,\w+=[0-9.]+)*")  # FAISS ParameterSpace: name=value[,name=value ...]


@dataclass(frozen=True)
class ModelConfig:
    parts: tuple[Part, ...] = ("delta", "down", "up")
    num_sv: int | None = None
    k: int = 1
    weighting: Weighting = "uniform"
    normalisation: Normalisation = "global"
    spectra_dtype: Literal["float32", "float64"] = "float32"
    spectra_precision: Literal["exact", "fast"] = "exact"
    use_faiss_gpu: bool = True
    index: str = "Flat"
    index_search: str = ""
    coverage: float = 0.9
    false_alarm: float = 0.05
    calibration_folds: int = 5
    calibration_points: int = 2000
    select: dict | str | None = None  # model selection (`dsire.models.select.SelectConfig`); None: the fixed one

    def __post_init__(self) -> None:
        distinct = bool(self.parts) and len(set(self.parts)) == len(self.parts)
        require(distinct, "parts", f"{list(self.parts)}: name one or more of {', '.join(PARTS)}, each once")
        require(self.num_sv is None or self.num_sv >= 1, "num_sv", f"{self.num_sv} must be at least 1 (null: all)")
        require(self.k >= 1, "k", f"{self.k} must be at least 1 (neighbours per voter)")
        require(bool(self.index), "index", "empty; a FAISS factory string such as Flat, HNSW32 or IVF1024,Flat")
        require(
            not self.index_search or SEARCH.fullmatch(self.index_search) is not None,
            "index_search",
            f"{self.index_search!r} is not name=value[,name=value] (on the command line: "
            "'model.index_search=\"efSearch=64\"')",
        )
        require(0 < self.coverage < 1, "coverage", f"{self.coverage} is not in (0, 1)")
        require(0 < self.false_alarm < 1, "false_alarm", f"{self.false_alarm} is not in (0, 1)")
        require(self.calibration_folds >= 2, "calibration_folds", f"{self.calibration_folds} must be at least 2")
        require(
            not isinstance(self.select, str),
            "select",
            f"{self.select!r}: a grid is a config group, chosen with model/select=NAME (auto, wide or none; "
            "configs/model/select/), not model.select=",
        )
        require(self.calibration_points >= 1, "calibration_points", f"{self.calibration_points} must be at least 1")
