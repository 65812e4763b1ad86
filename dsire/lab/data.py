"""Classification tasks with a public, a private and a test split.

The backbone is pretrained on the *public* split only; fine-tunes, attacks, attribution and
unlearning are about the *private* split; the *test* split measures accuracy. Examples are read
by index (`Examples.take`), so in-memory digits and a folder of images on disk look the same to
the trainers. Every private example has a stable id (`digits/17`, `cat/img_003.png`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dsire.errors import UserError
from dsire.settings import require

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TaskSettings:
    """`task.*`: which data, and how it is split (stratified by class, seeded)."""

    name: Literal["digits", "image_folder"] = "digits"
    path: str | None = None  # image_folder: a folder with one sub-folder of images per class
    image_size: int = 224
    public_fraction: float = 0.5
    test_fraction: float = 0.2
    private_limit: int | None = None  # keep at most this many private examples (small audits)
    split_seed: int = 0

    def __post_init__(self) -> None:
        require(0 < self.public_fraction < 1, "public_fraction", f"{self.public_fraction} is not in (0, 1)")
        require(0 < self.test_fraction < 1, "test_fraction", f"{self.test_fraction} is not in (0, 1)")
        require(
            self.public_fraction + self.test_fraction < 1,
            "test_fraction",
            "public_fraction + test_fraction must leave a private split (sum < 1)",
        )
        require(self.private_limit is None or self.private_limit >= 2, "private_limit", "must be at least 2")
        require(self.image_size >= 8, "image_size", f"{self.image_size} is below 8 pixels")
        require(self.name != "image_folder" or bool(self.path), "path", "image_folder needs task.path=DIR")


@dataclass
class Examples:
    """Labelled examples read by index: `take(idx)` gives the inputs, `labels[idx]` the classes."""

    labels: torch.Tensor  # int64 [n]
    ids: list[str]
    take: Callable[[torch.Tensor], torch.Tensor]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> Examples:
        index_tensor = torch.as_tensor(index, dtype=torch.long)
        return Examples(
            self.labels[index_tensor], [self.ids[i] for i in index], lambda idx: self.take(index_tensor[idx])
        )


@dataclass
class Task:
    public: Examples
    private: Examples
    test: Examples
    classes: int
    input_shape: tuple[int, ...]


def load_task(settings: TaskSettings) -> Task:
    if settings.name == "digits":
        examples, classes, shape = digit_examples()
    else:
        examples, classes, shape = image_folder_examples(Path(settings.path or ""), settings.image_size, "task.path")
    public, private, test = split_examples(examples.labels.numpy(), settings)
    return Task(examples.subset(public), examples.subset(private), examples.subset(test), classes, shape)


def split_examples(labels: np.ndarray, settings: TaskSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the public, private and test splits: disjoint, stratified by class, seeded."""
    everything = np.arange(len(labels))
    rest, test = train_test_split(
        everything, test_size=settings.test_fraction, stratify=labels, random_state=settings.split_seed
    )
    public_share = settings.public_fraction / (1 - settings.test_fraction)
    public, private = train_test_split(
        rest, train_size=public_share, stratify=labels[rest], random_state=settings.split_seed
    )
    if settings.private_limit is not None and settings.private_limit < len(private):
        private, _ = train_test_split(
            private, train_size=settings.private_limit, stratify=labels[private], random_state=settings.split_seed
        )
    return np.sort(public), np.sort(private), np.sort(test)


def digit_examples() -> tuple[Examples, int, tuple[int, ...]]:
    """sklearn's 1,797 8×8 digits (shipped offline), pixels scaled to [0, 1]."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    ids = [f"digits/{i}" for i in range(len(labels))]
    return Examples(labels, ids, lambda idx: images[idx]), 10, (1, 8, 8)


def image_folder_examples(root: Path, size: int, where: str) -> tuple[Examples, int, tuple[int, ...]]:
    """One sub-folder per class (classes in sorted order); images are read when a batch needs them
    (RGB, resized to `size`, ImageNet-normalised). `where` names the setting in error messages."""
    if not root.is_dir():
        raise UserError(where, f"{root} is not a directory (one sub-folder of images per class)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for label, folder in enumerate(class_dirs):
        for file in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            files.append(file)
            labels.append(label)
    if len(class_dirs) < 2 or len(files) < 10 * len(class_dirs):
        raise UserError(
            where, f"{root}: {len(class_dirs)} class folders, {len(files)} images; need ≥ 2 classes, ≥ 10 each"
        )
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def take(idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([(_read_image(files[int(i)], size) - mean) / std for i in idx.reshape(-1)]).reshape(
            *idx.shape, 3, size, size
        )

    ids = [str(f.relative_to(root)) for f in files]
    return Examples(torch.tensor(labels), ids, take), len(class_dirs), (3, size, size)


def _read_image(path: Path, size: int) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.float32)
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(str(path), f"not a readable image ({exc})") from None
    return torch.from_numpy(pixels / 255.0).permute(2, 0, 1)
