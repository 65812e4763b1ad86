"""Feature sets: which spectra become voters, and how many singular values each keeps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dsire.spectra import Spectra

PARTS = ("delta", "down", "up", "norms")


@dataclass(frozen=True)
class FeatureSpec:
    """`parts`: per layer, which voters: σ(ΔW) `delta`, σ(down) `down`, σ(up) `up`, and `norms`
    (‖ΔW‖F, ‖down‖F, ‖up‖F). `num_sv`: singular values kept (None: all r, as in the paper)."""

    parts: tuple[str, ...] = ("delta", "down", "up")
    num_sv: int | None = None

    def __post_init__(self):
        unknown = set(self.parts) - set(PARTS)
        if unknown or not self.parts:
            raise ValueError(f"unknown feature parts {sorted(unknown)}; choose from {PARTS}")

    def vectors(self, spectra: dict[str, Spectra]) -> dict[str, torch.Tensor]:
        """{"layer/part": 1-D feature vector} for one LoRA."""
        out = {}
        for layer, s in spectra.items():
            for part in self.parts:
                if part == "norms":
                    out[f"{layer}/norms"] = torch.stack([s.delta_norm, s.down_norm, s.up_norm]).float()
                else:
                    out[f"{layer}/{part}"] = getattr(s, part)[: self.num_sv].float()
        return out


def stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Feature dicts of several LoRAs (same voters) -> {voter: [LoRAs, d]} arrays."""
    return {voter: torch.stack([row[voter] for row in rows]).numpy() for voter in rows[0]}
