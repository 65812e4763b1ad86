"""The data module's settings (`configs/data/*.yaml`), checked when they are built.

A bad value raises `ConfigError` naming `data.<key>`, the value and what is allowed, before any
LoRA is read. What needs the zoo itself (enough concepts for the folds, sizes the zoo has) is
checked by `LoRAZooDataModule.setup`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from dsire.errors import ConfigError, is_int, require

KINDS = ("manifest", "labels_dir", "lorawise")
PROTOCOLS = ("kfold", "paper")


def _known(cls: type, values: Mapping, prefix: str) -> dict:
    """`values` as keyword arguments of `cls`; an unknown key is an error naming it."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(names))}")
    return dict(values)


@dataclass(frozen=True)
class SourceConfig:
    """Where the zoo is: a manifest directory, a labels.csv directory, or LoRA-WiSE parquet."""

    kind: str = "manifest"
    path: str | None = None
    labels: str = "labels.csv"  # labels_dir: the CSV in `path`
    subset: str | None = None  # lorawise
    cache_dir: str | None = None  # lorawise: where the hub download goes
    rank: int | None = None  # lorawise: reshape flat columns with this rank (None: from the subset name)
    make: str | None = None  # manifest: the command that builds this zoo, shown when it is missing

    def __post_init__(self) -> None:
        require(self.kind in KINDS, "data.source.kind", self.kind, f"one of {list(KINDS)}")
        if self.path is None or self.path == "":
            raise ConfigError("data.source.path", "missing; give the zoo's folder or file (data.source.path=...)")
        require(isinstance(self.path, str), "data.source.path", self.path, "a path")
        require(isinstance(self.labels, str) and bool(self.labels), "data.source.labels", self.labels, "a file name")
        require(
            self.rank is None or (is_int(self.rank) and self.rank >= 1),
            "data.source.rank",
            self.rank,
            "null (from the subset name) or a whole number >= 1",
        )


@dataclass(frozen=True)
class SplitConfig:
    """Concept-grouped splits: `kfold` (`folds`) or `paper` (`n_train` concepts, `repeats` times)."""

    protocol: str = "kfold"
    folds: int = 5
    n_train: int = 15
    repeats: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.protocol in PROTOCOLS, "data.split.protocol", self.protocol, f"one of {list(PROTOCOLS)}")
        require(is_int(self.folds) and self.folds >= 2, "data.split.folds", self.folds, "a whole number >= 2")
        require(is_int(self.n_train) and self.n_train >= 1, "data.split.n_train", self.n_train, "a whole number >= 1")
        require(is_int(self.repeats) and self.repeats >= 1, "data.split.repeats", self.repeats, "a whole number >= 1")
        require(is_int(self.seed), "data.split.seed", self.seed, "a whole number")


def _sizes(key: str, value: Sequence[int] | None) -> tuple[int, ...] | None:
    """None, or at least two distinct whole numbers >= 1 (one size leaves nothing to tell apart)."""
    if value is None:
        return None
    listed = isinstance(value, Sequence) and not isinstance(value, str)
    sizes = tuple(value) if listed else ()
    ok = all(is_int(n) and n >= 1 for n in sizes) and len(set(sizes)) == len(sizes) >= 2
    require(listed and ok, key, value, "null (all) or a list of at least two distinct whole numbers >= 1")
    return sizes


@dataclass(frozen=True)
class DataConfig:
    source: SourceConfig
    split: SplitConfig
    sizes: tuple[int, ...] | None = None
    train_sizes: tuple[int, ...] | None = None
    batch_size: int = 16

    @classmethod
    def build(
        cls,
        source: Mapping,
        split: Mapping,
        sizes: Sequence[int] | None,
        train_sizes: Sequence[int] | None,
        batch_size: int,
    ) -> DataConfig:
        return cls(
            SourceConfig(**_known(SourceConfig, source, "data.source")),
            SplitConfig(**_known(SplitConfig, split, "data.split")),
            _sizes("data.sizes", sizes),
            _sizes("data.train_sizes", train_sizes),
            batch_size,
        )

    def __post_init__(self) -> None:
        require(
            is_int(self.batch_size) and self.batch_size >= 1, "data.batch_size", self.batch_size, "a whole number >= 1"
        )
        if self.sizes is not None and self.train_sizes is not None:
            outside = sorted(set(self.train_sizes) - set(self.sizes))
            require(
                not outside, "data.train_sizes", list(self.train_sizes), f"sizes among data.sizes {list(self.sizes)}"
            )
