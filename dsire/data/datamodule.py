"""`LoRAZooDataModule`: streams a zoo's LoRAs (or their cached spectra) in batches, split by concept.

Items are dicts: `key`, `n`, `concept`, and either `spectra` and `shapes` (a cache hit: no weights read),
`lora` (raw tensors: the model computes spectra on its device and fills the cache), or `error`
(a file that could not be read: reported and skipped, the rest still run).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from dsire.data.cache import SpectraCache
from dsire.data.config import DataConfig, SourceConfig, SplitConfig
from dsire.data.sources import ZooEntry, from_labels_dir, from_lorawise, from_manifest
from dsire.data.splits import Split, make_splits
from dsire.distributed import ShardSampler
from dsire.errors import UserError
from dsire.lora import LoRAError
from dsire.settings import from_config


class ZooDataset(Dataset):
    def __init__(self, entries: list[ZooEntry], cache: SpectraCache | None, allow_torch_load: bool = False):
        self.entries, self.cache, self.allow_torch_load = entries, cache, allow_torch_load

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        entry = self.entries[i]
        item = {"entry": entry, "key": entry.key, "n": entry.n, "concept": entry.concept}
        try:
            cached = self.cache.get(entry) if self.cache else None
            if cached is not None:
                return item | {"spectra": cached[0], "shapes": cached[1]}
            return item | {"lora": entry.load(self.allow_torch_load)}
        except LoRAError as exc:
            return item | {"error": exc.problem}
        except OSError as exc:
            return item | {"error": str(exc)}


def as_list(batch: list[dict]) -> list[dict]:
    return batch


class ReadAhead:
    """A DataLoader read one batch ahead in a background thread, so that reading the next LoRAs
    (disk waits, and copies that release the GIL) overlaps the spectra of this batch.

    Threads, not DataLoader worker processes: workers send every tensor through shared memory,
    which was slower than reading in the main process.
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[dict]]:
        batches, done = iter(self.loader), object()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsire-read-ahead") as pool:
            pending = pool.submit(next, batches, done)
            while (batch := pending.result()) is not done:
                pending = pool.submit(next, batches, done)
                yield batch


def zoo_batches(
    entries: list[ZooEntry],
    cache: SpectraCache | None,
    batch_size: int,
    allow_torch_load: bool = False,
    read_ahead: bool = True,
) -> DataLoader | ReadAhead:
    """Batches of zoo items (see `ZooDataset`), each rank reading its own share under DDP.

    `read_ahead` for passes that read weights; passes over cached spectra are faster without it
    (probably the many small tensors allocated in one thread and freed in another).
    """
    loader = DataLoader(
        ZooDataset(entries, cache, allow_torch_load),
        batch_size=batch_size,
        sampler=ShardSampler(len(entries)),  # under DDP each rank reads its own share, no padding
        collate_fn=as_list,
    )
    return ReadAhead(loader) if read_ahead else loader


def load_entries(source: SourceConfig) -> list[ZooEntry]:
    """Entries of a zoo source; a missing zoo is an error naming the key and how to make it."""
    path = Path(source.path)
    if source.kind == "manifest":
        manifest = path / "manifest.csv" if path.is_dir() else path
        if not manifest.is_file():
            make = f"; make the zoo with: {source.make}" if source.make else ""
            raise UserError("data.source.path", f"{manifest} does not exist{make}")
        return from_manifest(manifest, source.step)
    if source.kind == "labels_dir":
        if not path.is_dir():
            raise UserError("data.source.path", f"{path} is not a folder (a folder of LoRAs with {source.labels})")
        if not (path / source.labels).is_file():
            raise UserError("data.source.labels", f"{path / source.labels} does not exist (a CSV: file,n,concept)")
        return from_labels_dir(path, source.labels)
    return from_lorawise(source.path, source.subset, source.cache_dir, source.rank)


class LoRAZooDataModule(pl.LightningDataModule):
    """Settings are checked when built (`DataConfig`); what needs the zoo itself, in `setup`."""

    def __init__(
        self,
        source: dict,
        split: dict,
        sizes: list[int] | None = None,
        train_sizes: list[int] | None = None,
        batch_size: int = 16,
        cache_dir: str | None = None,
        cache_settings: dict | None = None,
        allow_torch_load: bool = False,
    ):
        super().__init__()
        self.source = from_config(SourceConfig, source, "data.source")
        self.split = from_config(SplitConfig, split, "data.split")
        sized = OmegaConf.create({"sizes": sizes, "train_sizes": train_sizes, "batch_size": batch_size})
        self.config = from_config(DataConfig, sized, "data")
        self.train_sizes = self.config.train_sizes
        self.batch_size, self.allow_torch_load = batch_size, allow_torch_load
        self.cache = SpectraCache(cache_dir, cache_settings or {}) if cache_dir else None
        self.entries: list[ZooEntry] = []

    def setup(self, stage: str | None = None) -> None:
        if self.entries:
            return
        entries = load_entries(self.source)
        zoo_sizes = sorted({e.n for e in entries})
        sizes = self.config.sizes
        for key, wanted in (("data.sizes", sizes), ("data.train_sizes", self.train_sizes)):
            missing = sorted(set(wanted or ()) - set(zoo_sizes))
            if missing:
                raise UserError(key, f"{missing} not among the zoo's sizes {zoo_sizes}")
        self.entries = [e for e in entries if sizes is None or e.n in sizes]
        if len({e.n for e in self.entries}) < 2:
            raise UserError("data.sizes", f"the zoo has one size only ({zoo_sizes}); DSiRe needs two or more")
        self.splits_of([e.concept for e in self.entries])  # too few concepts: fail before reading any weights

    def splits_of(self, concepts: list[str]) -> list[Split]:
        """Concept-grouped splits of these concepts: those of the LoRAs that could be read, so that an
        unreadable file cannot change how the other concepts are split."""
        return make_splits(sorted(set(concepts)), self.split)

    def entries_of(self, concepts: tuple[str, ...] | None = None) -> list[ZooEntry]:
        return [e for e in self.entries if concepts is None or e.concept in concepts]

    def loader(self, entries: list[ZooEntry]) -> DataLoader | ReadAhead:
        """Test passes: after `predict_dataloader` has filled the cache they read only spectra."""
        return zoo_batches(entries, self.cache, self.batch_size, self.allow_torch_load, read_ahead=self.cache is None)

    def predict_dataloader(self) -> DataLoader | ReadAhead:
        """Every entry: `trainer.predict` featurises the whole zoo once, splits reuse the features."""
        return zoo_batches(self.entries, self.cache, self.batch_size, self.allow_torch_load)
