"""The canonical LoRA: one view of a checkpoint, whatever format it came in.

Every reader in `dsire.lora` turns a file into a `LoRA`, so that spectra, zoos and audits never
see a file format. A layer's update is ΔW = scale · up @ down with `down` [r, in] and `up`
[out, r]; convolution LoRAs are flattened to that shape (down [r, in·kh·kw], up [out, r]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch


class LoRAError(ValueError):
    """Any file this project cannot read as a LoRA; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class LoRALayer:
    """One adapted module: ΔW = scale · up @ down."""

    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    alpha: float
    scale: float
    alpha_given: bool  # False when the file had no alpha and alpha = r was assumed
    kernel: tuple[int, ...] = ()  # conv kernel (kh, kw) for conv LoRAs, () for linear ones

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of ΔW, with `in` flattened over the kernel for convolutions."""
        return self.up.shape[0], self.down.shape[1]

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ΔW [out, in]: for tests and small layers only (spectra never build it)."""
        return self.scale * (self.up.to(dtype) @ self.down.to(dtype))


@dataclass
class LoRA:
    """An ordered {canonical layer name: LoRALayer} plus what the file said about itself.

    Canonical names are the base model's module paths with dots, prefixed by the pipeline
    component when there is one (`unet.`, `text_encoder.`, `text_encoder_2.`, `transformer.`).
    """

    source: str
    format: str
    layers: dict[str, LoRALayer]
    metadata: dict[str, str] = field(default_factory=dict)  # the file's own metadata (kohya `ss_*`, ...)
    labels: dict[str, str | int] = field(default_factory=dict)  # labels stored with the weights
    notes: list[str] = field(default_factory=list)  # assumptions the reader made, for the user


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank
