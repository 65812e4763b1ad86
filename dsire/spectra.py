"""Exact spectra of LoRA updates without ever forming ΔW.

With up = Q_u R_u and downᵀ = Q_d R_d (thin QR), ΔW = s · up @ down = s · Q_u (R_u R_dᵀ) Q_dᵀ.
Q_u and Q_d have orthonormal columns, so σ(ΔW) = |s| · σ(R_u R_dᵀ): singular values of an r×r
core instead of an out×in matrix. σ(up) = σ(R_u) and σ(down) = σ(R_d) come for free, and
Frobenius norms are the 2-norms of the singular values. Layers of one shape run as one batched call.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsire.lora import LoRA


@dataclass(frozen=True)
class Spectra:
    """Singular values (descending, zero-padded to the rank r) and Frobenius norms.

    Tensors have shape [..., r] (values) and [...] (norms): one leading dim per batched layer.
    """

    delta: torch.Tensor  # σ(ΔW)
    down: torch.Tensor  # σ(down)
    up: torch.Tensor  # σ(up)

    @property
    def delta_norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.delta, dim=-1)

    @property
    def down_norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.down, dim=-1)

    @property
    def up_norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.up, dim=-1)

    def __getitem__(self, index: int | slice) -> Spectra:
        return Spectra(self.delta[index], self.down[index], self.up[index])

    def cpu(self) -> Spectra:
        return Spectra(self.delta.cpu(), self.down.cpu(), self.up.cpu())


def _pad(values: torch.Tensor, rank: int) -> torch.Tensor:
    missing = rank - values.shape[-1]
    return torch.nn.functional.pad(values, (0, missing)) if missing > 0 else values


def lowrank_spectra(
    up: torch.Tensor,
    down: torch.Tensor,
    scale: torch.Tensor | float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Spectra:
    """Spectra of scale · up @ down for up [..., out, r], down [..., r, in], scale [...] or a float.

    Computed on the inputs' device in `dtype` (float32, or float64 for reference precision).
    """
    rank = up.shape[-1]
    if down.shape[-2] != rank:
        raise ValueError(f"rank mismatch: up {tuple(up.shape)}, down {tuple(down.shape)}")
    r_up = torch.linalg.qr(up.to(dtype), mode="r").R  # [..., min(out, r), r]
    r_down = torch.linalg.qr(down.to(dtype).mT, mode="r").R  # [..., min(in, r), r]
    core = r_up @ r_down.mT  # [..., min(out, r), min(in, r)]
    scale = torch.as_tensor(scale, dtype=dtype, device=core.device).abs()
    return Spectra(
        delta=_pad(torch.linalg.svdvals(core), rank) * scale.unsqueeze(-1),
        down=_pad(torch.linalg.svdvals(r_down), rank),
        up=_pad(torch.linalg.svdvals(r_up), rank),
    )


def batch_spectra(
    loras: Sequence[LoRA], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> list[dict[str, Spectra]]:
    """Per-layer spectra of several LoRAs; layers of equal shape, across all LoRAs, run as one call.

    Results are on the CPU, in each LoRA's layer order.
    """
    groups: dict[tuple, list[tuple[int, str]]] = defaultdict(list)
    for i, lora in enumerate(loras):
        for name, layer in lora.layers.items():
            groups[(tuple(layer.up.shape), tuple(layer.down.shape))].append((i, name))
    results: list[dict[str, Spectra]] = [{} for _ in loras]
    for members in groups.values():
        layers = [loras[i].layers[name] for i, name in members]
        up = _to_device(torch.stack([layer.up for layer in layers]), device)
        down = _to_device(torch.stack([layer.down for layer in layers]), device)
        scale = torch.tensor([layer.scale for layer in layers], dtype=torch.float64)
        batch = lowrank_spectra(up, down, scale, dtype=dtype).cpu()
        for j, (i, name) in enumerate(members):
            results[i][name] = batch[j]
    return [{name: result[name] for name in lora.layers} for lora, result in zip(loras, results, strict=True)]


def _to_device(batch: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """Copy to a CUDA device from pinned memory, so the copy runs asynchronously; elsewhere as is."""
    if device is not None and torch.device(device).type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def lora_spectra(
    lora: LoRA, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Spectra]:
    """Per-layer spectra of one LoRA (see `batch_spectra`)."""
    return batch_spectra([lora], device, dtype)[0]
