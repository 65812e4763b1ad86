"""Featurisation speed: r×r Gram-matrix spectra vs the paper's `torch.svd_lowrank` on dense ΔW, and vs an
exact batched baseline (QR of the factors, batched by shape as ours are).

Generates LoRAs with the attention shapes of Stable Diffusion 1.5 (`benchmarks.synthetic`), times both methods
on the same LoRAs, measures both methods' errors against the float64 SVD of the dense ΔW, and writes the
figures to benchmarks/README.md.

    python -m benchmarks.spectra [--loras 8] [--rank 32] [--repeats 3] [--zoo data/zoo] [--zoo-loras 24]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.report import command_line, write_section
from benchmarks.synthetic import random_lora
from dsire.data.sources import from_manifest
from dsire.lora import LoRA, load_lora
from dsire.project import ROOT
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


def delta_error(method: Callable[[LoRA], dict[str, torch.Tensor]], loras: list[LoRA]) -> float:
    """Largest |σ − σ_exact| of ΔW over every layer and value, relative to the layer's σ₁."""
    worst = 0.0
    for lora in loras:
        exact, values = dense_exact(lora), method(lora)
        worst = max(worst, *(float(((values[n].double() - e).abs() / e[0]).max()) for n, e in exact.items()))
    return worst


METHODS: dict[str, Callable[[LoRA], dict[str, torch.Tensor]]] = {
    "ours: float64 Gram matrices, r×r eigenvalues, batched by shape, float32 out": lambda lora: {
        n: s.delta for n, s in lora_spectra(lora).items()
    },
    "ours, `precision=fast`: float32 Gram matrices, the rest as above": lambda lora: {
        n: s.delta for n, s in lora_spectra(lora, precision="fast").items()
    },
    "paper: `torch.svd_lowrank(q=r)` of A, B, dense ΔW per layer": lambda lora: {
        n.removesuffix("/delta"): s for n, s in reference_spectra(lora).items() if n.endswith("/delta")
    },
    "exact baseline: batched QR of A and B, then r×r SVDs, by shape (float32)": lambda lora: {
        n.removesuffix("/delta"): s for n, s in batched_exact(lora).items() if n.endswith("/delta")
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loras", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zoo", type=Path, default=ROOT / "data" / "zoo", help="trained LoRAs for the errors")
    parser.add_argument("--zoo-loras", type=int, default=24)
    args = parser.parse_args()

    loras = [random_lora(args.rank, seed) for seed in range(args.loras)]
    trained = [load_lora(e.path) for e in from_manifest(args.zoo / "manifest.csv")[: args.zoo_loras]]
    rows = [
        (name, timed(method, loras, args.repeats), delta_error(method, loras[:1]), delta_error(method, trained))
        for name, method in METHODS.items()
    ]
    ours, fast, reference, batched = (rate for _, rate, _, _ in rows)
    lines = [
        "## Spectra: r×r Gram matrices vs the paper's `svd_lowrank` on A, B and dense ΔW",
        "",
        f"`{command_line()}` on {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch"
        f" threads, CPU, torch {torch.__version__}. Speed on {args.loras} synthetic SD 1.5 LoRAs (128 attention"
        f" layers, rank {args.rank}, float32, random factors); errors of σ(ΔW) against the float64 SVD of the dense"
        " ΔW (largest over layers and values, relative to each layer's σ₁) on one of them and on"
        f" {len(trained)} trained LoRAs of `{args.zoo.name}`, whose small singular values come from cancellation,"
        " where squaring costs digits.",
        "",
        "| method | LoRAs/s | max error, synthetic | max error, trained |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {rate:.2f} | {synthetic:.1e} | {real:.1e} |" for name, rate, synthetic, real in rows),
        "",
        f"Speed-up: **{ours / reference:.1f}×** over the paper's method (`fast`: {fast / reference:.1f}×);"
        f" **{ours / batched:.1f}×** over the batched exact baseline, the part that is the method's (Gram"
        " matrices instead of QR) rather than batching's.",
    ]
    table = "\n".join(lines)
    write_section("spectra", table)
    print(table)


if __name__ == "__main__":
    main()
