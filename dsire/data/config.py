"""The data module's settings (`configs/data/*.yaml`), checked when they are built.

Built with `dsire.settings.from_config`: a wrong type, an unknown key or a value out of range is a
`UserError` naming `data.<key>`, the value and what is allowed, before any LoRA is read. What needs
the zoo itself (enough concepts for the folds, sizes the zoo has) is checked by
`LoRAZooDataModule.setup`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dsire.settings import require


@dataclass(frozen=True)
class SourceConfig:
    """`data.source`: a manifest directory, a labels.csv directory, or LoRA-WiSE parquet."""

    kind: Literal["manifest", "labels_dir", "lorawise"] = "manifest"
    path: str | None = None
    labels: str = "labels.csv"  # labels_dir: the CSV in `path`
    subset: str | None = None  # lorawise
    cache_dir: str | None = None  # lorawise: where the hub download goes
    rank: int | None = None  # lorawise: reshape flat columns with this rank (None: from the subset name)
    make: str | None = None  # manifest: the command that builds this zoo, shown when it is missing
    step: int | None = None  # manifest: the snapshot step to use (None: the last)

    def __post_init__(self) -> None:
        require(bool(self.path), "path", "missing; give the zoo's folder or file (data.source.path=...)")
        require(bool(self.labels), "labels", "empty; the labels CSV's file name")
        require(self.rank is None or self.rank >= 1, "rank", f"{self.rank} must be at least 1 (null: from the subset)")
        require(self.step is None or self.step >= 0, "step", f"{self.step} must be at least 0 (null: the last)")


@dataclass(frozen=True)
class SplitConfig:
    """`data.split`: `kfold` (`folds`) or `paper` (`n_train` concepts, `repeats` times)."""

    protocol: Literal["kfold", "paper"] = "kfold"
    folds: int = 5
    n_train: int = 15
    repeats: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.folds >= 2, "folds", f"{self.folds} must be at least 2")
        require(self.n_train >= 1, "n_train", f"{self.n_train} must be at least 1")
        require(self.repeats >= 1, "repeats", f"{self.repeats} must be at least 1")


@dataclass(frozen=True)
class DataConfig:
    """`data.sizes`, `data.train_sizes` (null: all) and `data.batch_size`."""

    sizes: tuple[int, ...] | None = None
    train_sizes: tuple[int, ...] | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        for key, sizes in (("sizes", self.sizes), ("train_sizes", self.train_sizes)):
            ok = sizes is None or (len(set(sizes)) == len(sizes) >= 2 and min(sizes) >= 1)
            require(ok, key, f"{list(sizes or ())}: null (all) or at least two distinct sizes, each at least 1")
        outside = sorted(set(self.train_sizes or ()) - set(self.sizes or self.train_sizes or ()))
        require(not outside, "train_sizes", f"{outside} not among data.sizes {list(self.sizes or ())}")
        require(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be at least 1")
