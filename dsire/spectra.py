"""Spectra of LoRA updates without ever forming ΔW, from r×r Gram matrices.

ΔW = s · up @ down. With the Gram matrices G_up = upᵀ up and G_down = down downᵀ (r×r), σ(up)²
and σ(down)² are their eigenvalues, and ΔWᵀΔW = s² downᵀ G_up down has the nonzero eigenvalues
of s² G_up G_down, which are those of the symmetric s² Fᵀ G_up F for any factor G_down = F Fᵀ
(F from the eigendecomposition, which, unlike Cholesky, also exists when down is rank-deficient).
So every spectrum is an r×r symmetric eigenproblem, and the only pass over the out×r and r×in
factors is one product each, a symmetric one that BLAS runs at full speed and computes only half of
(`syrk`; a QR of the same factors is slower; see benchmarks/README.md).

Squaring halves the digits, so by default (`precision="exact"`) the Grams and eigenproblems are
float64: singular values carry an absolute error near √ε₆₄ · σ₁ ≈ 1.5e-8 · σ₁, below float32's own
rounding and far below float16 weights' quantisation. `precision="fast"` forms the Grams in float32
(a few times cheaper), which leaves the large singular values accurate but small ones with an
absolute error up to √ε₃₂ · σ₁ ≈ 3e-4 · σ₁: measured errors and speeds are in benchmarks/README.md.
Frobenius norms are the 2-norms of the singular values.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from dsire.lora import LoRA, LoRALayer

Precision = Literal["exact", "fast"]
GRAM_DTYPES: dict[str, torch.dtype] = {"exact": torch.float64, "fast": torch.float32}


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
    precision: Precision = "exact",
) -> Spectra:
    """Spectra of scale · up @ down for up [..., out, r], down [..., r, in], scale [...] or a float.

    Computed on the inputs' device, the Grams in `GRAM_DTYPES[precision]` and the r×r problems in
    float64 (see the module docstring), returned in `dtype`. Values beyond a factor's possible rank
    (min(out, r), min(in, r)) are exact zeros.
    """
    if down.shape[-2] != up.shape[-1]:
        raise ValueError(f"rank mismatch: up {tuple(up.shape)}, down {tuple(down.shape)}")
    up, down = up.to(GRAM_DTYPES[precision]), down.to(GRAM_DTYPES[precision])
    shape = (up.shape[-2], down.shape[-1])
    return gram_spectra(up.mT @ up, down @ down.mT, shape, scale, dtype)


def gram_spectra(
    gram_up: torch.Tensor,
    gram_down: torch.Tensor,
    shape: tuple[int, int],
    scale: torch.Tensor | float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Spectra:
    """Spectra of scale · up @ down from G_up = upᵀ up and G_down = down downᵀ ([..., r, r]), for
    ΔW of `shape` (out, in): the r×r problems, in float64."""
    gram_up, gram_down = gram_up.to(torch.float64), gram_down.to(torch.float64)
    (out, inp), rank = shape, gram_up.shape[-1]
    factor = _factor(gram_down)
    core = factor.mT @ gram_up @ factor
    scale = torch.as_tensor(scale, dtype=torch.float64, device=gram_up.device).abs().unsqueeze(-1)
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
"""Most float64 factor bytes per chunk: bounds a GPU batch's memory; on the CPU, chunks are the
units of work that the threads share."""


def batch_spectra(
    loras: Sequence[LoRA],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    precision: Precision = "exact",
) -> list[dict[str, Spectra]]:
    """Per-layer spectra of several LoRAs; layers of equal shape, across all LoRAs, run as chunks
    of at most `CHUNK_BYTES`, their r×r problems as batched calls. Results are on the CPU, in each
    LoRA's layer order.

    On the CPU the chunks run on `torch.get_num_threads()` threads of one torch thread each: the
    products are too small for torch's own threads to split well, and threads that never wait for
    each other degrade gently when other processes want the cores (see benchmarks/README.md).
    """
    device = torch.device(device or "cpu")
    chunks = _chunks(loras)
    results: list[dict[str, Spectra]] = [{} for _ in loras]
    batches = _map(functools.partial(_chunk_spectra, loras, device, dtype, precision), chunks, device)
    for chunk, batch in zip(chunks, batches, strict=True):
        for (i, name), spectra in zip(chunk, batch, strict=True):
            results[i][name] = spectra
    return [{name: result[name] for name in lora.layers} for lora, result in zip(loras, results, strict=True)]


def _chunks(loras: Sequence[LoRA]) -> list[list[tuple[int, str]]]:
    """(LoRA index, layer name) lists: layers of one shape, at most `CHUNK_BYTES` of float64 factors each."""
    groups: dict[tuple, list[tuple[int, str]]] = defaultdict(list)
    for i, lora in enumerate(loras):
        for name, layer in lora.layers.items():
            groups[(tuple(layer.up.shape), tuple(layer.down.shape))].append((i, name))
    chunks = []
    for (up_shape, down_shape), members in groups.items():
        step = max(1, CHUNK_BYTES // (8 * (math.prod(up_shape) + math.prod(down_shape))))
        chunks += [members[start : start + step] for start in range(0, len(members), step)]
    return chunks


def _chunk_spectra(
    loras: Sequence[LoRA], device: torch.device, dtype: torch.dtype, precision: Precision, chunk: list[tuple[int, str]]
) -> list[Spectra]:
    layers = [loras[i].layers[name] for i, name in chunk]
    grams = _grams_in_turn if device.type == "cpu" else _grams_stacked
    gram_up, gram_down = grams(layers, device, GRAM_DTYPES[precision])
    scale = torch.tensor([layer.scale for layer in layers], dtype=torch.float64)
    batch = gram_spectra(gram_up, gram_down, layers[0].shape, scale, dtype).cpu()
    return [Spectra(*parts) for parts in zip(batch.delta.unbind(), batch.down.unbind(), batch.up.unbind(), strict=True)]


def _grams_in_turn(
    layers: list[LoRALayer], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grams of same-shape layers on the CPU, one layer at a time, each factor converted into one
    reused buffer: the converted factor is still in the CPU's cache when its product reads it, where
    a converted batch would make a round trip through memory. The products are NumPy's, which sees
    that `xᵀ x` is symmetric and computes half of it (BLAS `syrk`); torch computes all of it."""
    up, down = torch.empty(layers[0].up.shape, dtype=dtype), torch.empty(layers[0].down.shape, dtype=dtype)
    rank = up.shape[1]
    gram_up = torch.empty((len(layers), rank, rank), dtype=dtype)
    gram_down = torch.empty_like(gram_up)
    up_np, down_np, gram_up_np, gram_down_np = up.numpy(), down.numpy(), gram_up.numpy(), gram_down.numpy()
    for i, layer in enumerate(layers):
        up.copy_(layer.up)
        down.copy_(layer.down)
        np.matmul(up_np.T, up_np, out=gram_up_np[i])
        np.matmul(down_np, down_np.T, out=gram_down_np[i])
    return gram_up, gram_down


def _grams_stacked(
    layers: list[LoRALayer], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grams of same-shape layers on a GPU: the factors stacked (converted while stacking, into
    pinned memory for CUDA so the copy runs asynchronously) and multiplied as one batch."""
    up, down = (_stack([getattr(layer, part) for layer in layers], device, dtype) for part in ("up", "down"))
    return up.mT @ up, down @ down.mT


def _map(fn: Callable[[list], list[Spectra]], chunks: list[list], device: torch.device) -> list[list[Spectra]]:
    """`fn` over the chunks, in order: in threads of one torch thread each on the CPU (NumPy's BLAS,
    which forms the Grams, on one thread too), in turn on a GPU."""
    threads = torch.get_num_threads()
    if device.type != "cpu":
        return [fn(chunk) for chunk in chunks]
    with threadpool_limits(limits=1, user_api="blas"):
        if threads == 1 or len(chunks) == 1:
            return [fn(chunk) for chunk in chunks]
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dsire-spectra") as pool:
                return list(pool.map(fn, chunks))
        finally:
            torch.set_num_threads(threads)


def _stack(tensors: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    pinned = device.type == "cuda"
    batch = torch.empty((len(tensors), *tensors[0].shape), dtype=dtype, pin_memory=pinned)
    return torch.stack(tensors, out=batch).to(device, non_blocking=pinned)


def lora_spectra(
    lora: LoRA,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    precision: Precision = "exact",
) -> dict[str, Spectra]:
    """Per-layer spectra of one LoRA (see `batch_spectra`)."""
    return batch_spectra([lora], device, dtype, precision)[0]
