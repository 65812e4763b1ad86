"""Spectra of LoRA updates without ever forming ΔW, from r×r Gram matrices.

ΔW = s · up @ down. With the Gram matrices G_up = upᵀ up and G_down = down downᵀ (r×r), σ(up)²
and σ(down)² are their eigenvalues, and ΔWᵀΔW = s² downᵀ G_up down has the nonzero eigenvalues
of s² G_up G_down, which are those of the symmetric s² Fᵀ G_up F for any factor G_down = F Fᵀ
(F from the eigendecomposition, which, unlike Cholesky, also exists when down is rank-deficient).
So every spectrum is an r×r symmetric eigenproblem, and the only pass over the out×r and r×in
factors is one matrix product each, which BLAS runs at full speed (a QR of the same factors is
slower: LAPACK runs it on one core per batch; see benchmarks/README.md).

Squaring halves the digits, so the Grams and eigenproblems are float64: singular values carry an
absolute error near √ε₆₄ · σ₁ ≈ 1.5e-8 · σ₁, below float32's own rounding and far below float16
weights' quantisation. Frobenius norms are the 2-norms of the singular values.
"""

from __future__ import annotations

import math
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

    def to(self, *args, **kwargs) -> Spectra:
        """`Tensor.to` on all three (a device, a dtype or both)."""
        return Spectra(self.delta.to(*args, **kwargs), self.down.to(*args, **kwargs), self.up.to(*args, **kwargs))

    def cpu(self) -> Spectra:
        return self.to("cpu")


def lowrank_spectra(
    up: torch.Tensor,
    down: torch.Tensor,
    scale: torch.Tensor | float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Spectra:
    """Spectra of scale · up @ down for up [..., out, r], down [..., r, in], scale [...] or a float.

    Computed on the inputs' device in float64 (see the module docstring), returned in `dtype`.
    Values beyond a factor's possible rank (min(out, r), min(in, r)) are exact zeros.
    """
    out, rank = up.shape[-2:]
    if down.shape[-2] != rank:
        raise ValueError(f"rank mismatch: up {tuple(up.shape)}, down {tuple(down.shape)}")
    inp = down.shape[-1]
    up, down = up.to(torch.float64), down.to(torch.float64)
    gram_up, gram_down = up.mT @ up, down @ down.mT
    factor = _factor(gram_down)
    core = factor.mT @ gram_up @ factor
    scale = torch.as_tensor(scale, dtype=torch.float64, device=up.device).abs().unsqueeze(-1)
    return Spectra(
        delta=_singular_values(torch.linalg.eigvalsh(core), min(out, inp, rank)) * scale,
        down=_singular_values(torch.linalg.eigvalsh(gram_down), min(inp, rank)),
        up=_singular_values(torch.linalg.eigvalsh(gram_up), min(out, rank)),
    ).to(dtype)


def _factor(gram: torch.Tensor) -> torch.Tensor:
    """F with gram = F Fᵀ: Cholesky, 20× cheaper than an eigendecomposition, which serves only the
    Grams Cholesky refuses (rank-deficient factors)."""
    factor, info = torch.linalg.cholesky_ex(gram)
    refused = info != 0
    if refused.any():
        values, vectors = torch.linalg.eigh(gram[refused])
        factor[refused] = vectors * values.clamp_min(0).sqrt().unsqueeze(-2)
    return factor


def _singular_values(eigenvalues: torch.Tensor, possible_rank: int) -> torch.Tensor:
    """Descending square roots of a Gram's ascending eigenvalues; rounding's negatives and the
    entries beyond the rank the factor can have become zeros."""
    values = eigenvalues.flip(-1).clamp_min(0).sqrt()
    values[..., possible_rank:] = 0
    return values


CHUNK_BYTES = 32 << 20
"""Most float64 factor bytes per call: bounds the working memory (also on a GPU), and keeps CPU
allocations small enough to reuse freed memory instead of faulting in fresh pages every call
(one big batch was slower than chunks)."""


def batch_spectra(
    loras: Sequence[LoRA], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> list[dict[str, Spectra]]:
    """Per-layer spectra of several LoRAs; layers of equal shape, across all LoRAs, run as batched
    calls of at most `CHUNK_BYTES`. Results are on the CPU, in each LoRA's layer order.
    """
    groups: dict[tuple, list[tuple[int, str]]] = defaultdict(list)
    for i, lora in enumerate(loras):
        for name, layer in lora.layers.items():
            groups[(tuple(layer.up.shape), tuple(layer.down.shape))].append((i, name))
    results: list[dict[str, Spectra]] = [{} for _ in loras]
    for (up_shape, down_shape), members in groups.items():
        per_layer = 8 * (math.prod(up_shape) + math.prod(down_shape))
        step = max(1, CHUNK_BYTES // per_layer)
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            layers = [loras[i].layers[name] for i, name in chunk]
            up = _stack([layer.up for layer in layers], device)
            down = _stack([layer.down for layer in layers], device)
            scale = torch.tensor([layer.scale for layer in layers], dtype=torch.float64)
            batch = lowrank_spectra(up, down, scale, dtype=dtype).cpu()
            for j, (i, name) in enumerate(chunk):
                results[i][name] = batch[j]
    return [{name: result[name] for name in lora.layers} for lora, result in zip(loras, results, strict=True)]


def _stack(tensors: list[torch.Tensor], device: torch.device | str | None) -> torch.Tensor:
    """One float64 batch on `device`, converted while stacking (one pass over the weights). For
    CUDA it is stacked into pinned memory, so the copy to the device runs asynchronously."""
    device = torch.device(device or "cpu")
    pinned = device.type == "cuda"
    batch = torch.empty((len(tensors), *tensors[0].shape), dtype=torch.float64, pin_memory=pinned)
    return torch.stack(tensors, out=batch).to(device, non_blocking=pinned)


def lora_spectra(
    lora: LoRA, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Spectra]:
    """Per-layer spectra of one LoRA (see `batch_spectra`)."""
    return batch_spectra([lora], device, dtype)[0]
