"""Inputs of the ViT-B/16 recipe check: sklearn's digits upscaled into an image folder, and timm's
ViT-B/16 with random weights saved as a local safetensors file.

The real recipe reads a folder of class sub-folders and a local ViT-B/16 weights file; this makes
both offline, so `gpu_check.sh` and `vit_cpu_check.sh` check the code path (not a real ViT's
accuracy) with one set of inputs.

    python -m benchmarks.vit_inputs OUT [--images 400] [--size 224]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from dsire.errors import report_user_errors
from dsire.lab.backbones import timm_vit

WEIGHTS = "vit_b16_random.safetensors"


def make_inputs(out: Path, images: int, size: int) -> None:
    """`out/images/<digit>/<i>.png` (RGB, size × size) and `out/vit_b16_random.safetensors`."""
    torch.manual_seed(0)  # the model first, so that a machine without timm writes nothing
    state = timm_vit(1000, "benchmarks.vit_inputs").state_dict()  # timm's default ImageNet head
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images[:images], digits.target[:images], strict=True)):
        folder = out / "images" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray((image * 255 / 16).astype(np.uint8))
        pixels.resize((size, size)).convert("RGB").save(folder / f"{i}.png")
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS))


@report_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=400, help="the first N digits (10 classes)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (ViT-B/16 takes 224)")
    args = parser.parse_args()
    make_inputs(args.out, args.images, args.size)


if __name__ == "__main__":
    main()
