"""Featurisation speed: r×r Gram-matrix spectra vs the paper's `torch.svd_lowrank` on dense ΔW, and vs an
exact batched baseline (QR of the factors, batched by shape as ours are).

Generates LoRAs with the attention shapes of Stable Diffusion 1.5 (`benchmarks.synthetic`), times both methods
on the same LoRAs, measures both methods' errors against the float64 SVD of the dense ΔW, and writes the
figures to benchmarks/README.md.

    python -m benchmarks.spectra [--loras 8] [--rank 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict

import torch

from benchmarks.report import command_line, write_section
from benchmarks.synthetic import random_lora
from dsire.lora import LoRA
from dsire.spectra import lora_spectra


def reference_spectra(lora: LoRA) -> dict[str, torch.Tensor]:
    """The paper's code: `torch.svd_lowrank(q=rank)` of A, of B and of the dense product B·A."""
    result = {}
    for name, layer in lora.layers.items():
        down, up = layer.down.float(), layer.up.float()
        for part, matrix in (("down", down), ("up", up), ("delta", layer.scale * (up @ down))):
            result[f"{name}/{part}"] = torch.svd_lowrank(matrix, q=layer.rank)[1]
    return result


def batched_exact(lora: LoRA) -> dict[str, torch.Tensor]:
    """The exact textbook method, batched like ours: layers of one shape stacked, one batched QR of
    B = Q_B R_B and of Aᵀ = Q_A R_A, then σ(ΔW) = s·σ(R_B R_Aᵀ), σ(A) = σ(R_A), σ(B) = σ(R_B), all r×r
    (float32). Beside it, our speed-up is the method's (Gram matrices instead of QR), not batching's."""
    by_shape: dict[tuple, list[str]] = defaultdict(list)
    for name, layer in lora.layers.items():
        by_shape[(*layer.shape, layer.rank)].append(name)
    result = {}
    for names in by_shape.values():
        layers = [lora.layers[n] for n in names]
        r_down = torch.linalg.qr(torch.stack([layer.down.float().T for layer in layers]), mode="r")[1]
        r_up = torch.linalg.qr(torch.stack([layer.up.float() for layer in layers]), mode="r")[1]
        scale = torch.tensor([abs(layer.scale) for layer in layers])[:, None]
        parts = {
            "down": torch.linalg.svdvals(r_down),
            "up": torch.linalg.svdvals(r_up),
            "delta": scale * torch.linalg.svdvals(r_up @ r_down.transpose(1, 2)),
        }
        for part, values in parts.items():
            for name, row in zip(names, values, strict=True):
                result[f"{name}/{part}"] = row
    return result


def dense_exact(lora: LoRA) -> dict[str, torch.Tensor]:
    """σ(ΔW) from the float64 SVD of the dense product: the ground truth both methods are held to."""
    return {
        name: torch.linalg.svdvals(layer.scale * (layer.up.double() @ layer.down.double()))[: layer.rank]
        for name, layer in lora.layers.items()
    }


def timed(fn, loras: list[LoRA], repeats: int) -> float:
    """Best-of-`repeats` LoRAs per second."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for lora in loras:
            fn(lora)
        best = min(best, time.perf_counter() - start)
    return len(loras) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loras", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loras = [random_lora(args.rank, seed) for seed in range(args.loras)]
    ours = timed(lora_spectra, loras, args.repeats)
    reference = timed(reference_spectra, loras, args.repeats)
    batched = timed(batched_exact, loras, args.repeats)

    exact = dense_exact(loras[0])
    approx = {n: s for n, s in reference_spectra(loras[0]).items() if n.endswith("/delta")}
    approx = {n.removesuffix("/delta"): s for n, s in approx.items()}
    fast = lora_spectra(loras[0])
    top_err = max(float(abs(approx[n][0] - exact[n][0]) / exact[n][0]) for n in exact)
    all_err = max(float(((approx[n].double() - exact[n]).abs() / exact[n][0]).max()) for n in exact)
    ours_err = max(float(((fast[n].delta.double() - exact[n]).abs() / exact[n][0]).max()) for n in exact)
    dense = batched_exact(loras[0])
    batched_err = max(float(((dense[f"{n}/delta"].double() - exact[n]).abs() / exact[n][0]).max()) for n in exact)

    command = command_line()
    table = f"""## Spectra: r×r Gram matrices vs the paper's `svd_lowrank` on A, B and dense ΔW

`{command}` on {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU,
torch {torch.__version__}. {args.loras} synthetic SD 1.5 LoRAs (128 attention layers, rank {args.rank}), float32.

| method | LoRAs/s | max error vs float64 SVD of dense ΔW (relative to σ₁ of each layer) |
| --- | ---: | --- |
| ours: float64 Gram matrices, r×r eigenvalues, batched by shape, float32 out | {ours:.2f} | {ours_err:.1e} |
| paper: `torch.svd_lowrank(q=r)` of A, B, dense ΔW per layer | {reference:.2f} | {all_err:.1e} (σ₁: {top_err:.1e}) |
| exact baseline: batched QR of A and B, then r×r SVDs, by shape (float32) | {batched:.2f} | {batched_err:.1e} |

Speed-up: **{ours / reference:.1f}×** over the paper's method; **{ours / batched:.1f}×** over the batched exact
baseline, the part that is the method's (Gram matrices instead of QR) rather than batching's.
"""
    write_section("spectra", table)
    print(table)


if __name__ == "__main__":
    main()
