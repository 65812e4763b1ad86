"""Concept image sets: which N images a fine-tune of a concept sees.

The images for (concept, N) are the first N of the concept's fixed, ordered pool, so N=3 ⊂ N=4:
the pool order never depends on N, and a larger fine-tune only adds images. Each image has its own
prompt (for digit concepts, its class token after the concept's identifier).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from dsire.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def digit_images() -> tuple[torch.Tensor, np.ndarray]:
    """sklearn's 1,797 8×8 digits (shipped offline) as [-1, 1] tensors [n, 1, 8, 8], and their classes."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 8.0 - 1.0  # pixel values are 0..16
    return images.unsqueeze(1), digits.target


def digit_concepts(pools_per_class: int) -> dict[str, torch.Tensor]:
    """Concept `d{class}p{pool}`: every `pools_per_class`-th image of a digit class, disjoint pools."""
    images, classes = digit_images()
    concepts = {}
    for digit in range(10):
        members = np.flatnonzero(classes == digit)
        for pool in range(pools_per_class):
            concepts[f"d{digit}p{pool}"] = images[members[pool::pools_per_class]]
    return concepts


def mixed_concepts(count: int, size: int, seed: int) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """Concept `m{k}`: a block of `size` digits of any class, from one seeded permutation of all digits.

    Every concept is then drawn from the same distribution, so concepts differ by their images only,
    not by how hard their class is for the base; each image keeps its own class (its prompt's token).
    """
    images, classes = digit_images()
    if count * size > len(images):
        raise UserError("zoo.data.count", f"{count} concepts of {size} images need more than the {len(images)} digits")
    order = np.random.default_rng(seed).permutation(len(images))
    blocks = [order[k * size : (k + 1) * size] for k in range(count)]
    return {f"m{k}": (images[block], classes[block]) for k, block in enumerate(blocks)}


def concept_class(concept: str) -> int:
    """The digit class of a digit concept (its class token in the prompt)."""
    return int(concept[1])


def folder_concepts(root: str | Path, resolution: int) -> dict[str, torch.Tensor]:
    """One concept per sub-folder of `root`, images sorted by file name, as [-1, 1] RGB tensors."""
    root = Path(root)
    if not root.is_dir():
        raise UserError("zoo.data.root", f"{root} is not a folder: one sub-folder of images per concept")
    concepts = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images = [Image.open(f).convert("RGB").resize((resolution, resolution)) for f in files]
        array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
        concepts[folder.name] = torch.from_numpy(array).permute(0, 3, 1, 2)
    return concepts
