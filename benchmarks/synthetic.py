"""Synthetic LoRAs with the attention shapes of Stable Diffusion 1.5, in memory or as a zoo on disk.

The 128 attention projections LoRA-WiSE adapts: 16 transformer blocks, to_q/k/v/out of attn1 and
attn2, widths 320/640/1280, cross-attention 768. On disk they are kohya files (the common published
layout) with a `manifest.csv`, so `train.py data.source.path=DIR` reads them like a generated zoo.
Their up factors shrink as N^-1/2 (N = 1..6), so a zoo has a dataset-size signal, but what they
measure is speed, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.progress import track

from dsire.atomic import atomic_write_csv
from dsire.lora import LoRA, LoRALayer
from dsire.lora.save import save_lora

# (diffusers path, width) of the 16 attention blocks of the SD 1.5 UNet, one transformer block each
SD15_BLOCKS = [
    *[(f"down_blocks.{b}.attentions.{a}", w) for b, w in enumerate((320, 640, 1280)) for a in range(2)],
    ("mid_block.attentions.0", 1280),
    *[(f"up_blocks.{b}.attentions.{a}", w) for b, w in ((1, 1280), (2, 640), (3, 320)) for a in range(3)],
]
CROSS_DIM = 768


def sd15_shapes() -> dict[str, tuple[int, int]]:
    """{layer name: (out, in)} of the 128 attention projections LoRA-WiSE adapts."""
    shapes = {}
    for block, width in SD15_BLOCKS:
        for attn, context in (("attn1", width), ("attn2", CROSS_DIM)):
            prefix = f"unet.{block}.transformer_blocks.0.{attn}"
            shapes |= {
                f"{prefix}.to_q": (width, width),
                f"{prefix}.to_k": (width, context),
                f"{prefix}.to_v": (width, context),
                f"{prefix}.to_out.0": (width, width),
            }
    return shapes


def random_lora(rank: int, seed: int) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    layers = {
        name: LoRALayer(
            down=torch.randn(rank, inp, generator=g) / inp**0.5,
            up=torch.randn(out, rank, generator=g) * 0.01,
            alpha=float(rank),
            scale=1.0,
            alpha_given=True,
        )
        for name, (out, inp) in sd15_shapes().items()
    }
    return LoRA(source=f"synthetic-{seed}", format="synthetic", layers=layers)


def write_zoo(directory: Path, loras: int, rank: int = 32, dtype: torch.dtype = torch.float16) -> list[Path]:
    """`loras` kohya files (concept c{i // 6}, N = i % 6 + 1) and their manifest; existing files are kept.

    Drawing 6M random numbers per LoRA would dominate the time, so each LoRA rescales one of 8
    random LoRAs by its own factor: every file has distinct bytes (distinct content hashes) and
    the same spectra cost as any other.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pool = [random_lora(rank, seed) for seed in range(8)]
    rows = []
    for i in track(range(loras), description=f"writing {loras} SD 1.5 LoRAs"):
        n, path = i % 6 + 1, directory / f"lora{i:05d}.safetensors"
        if not path.is_file():
            factor = n**-0.5 * (1 + i / loras)
            state = {}
            for name, layer in pool[i % len(pool)].layers.items():
                state[f"{name.removeprefix('unet.')}.lora_A.weight"] = layer.down
                state[f"{name.removeprefix('unet.')}.lora_B.weight"] = layer.up * factor
            save_lora(state, path, "kohya", {"r": rank, "lora_alpha": rank}, dtype=dtype)
        rows.append({"path": path.name, "n": n, "concept": f"c{i // 6}"})
    atomic_write_csv(directory / "manifest.csv", ("path", "n", "concept"), rows)
    return [directory / row["path"] for row in rows]
