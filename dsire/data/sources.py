"""Zoo sources: where the LoRAs of a zoo are and what their labels are.

A zoo is a list of `ZooEntry`s (a LoRA, its dataset size `n` and its `concept`, the group that
must never straddle a split). Three sources produce one:
- a zoo generator output directory: `manifest.csv` with `path,n,concept,...` (see `dsire.zoo`);
- any directory of LoRA files with a `labels.csv` of `file,n,concept`;
- LoRA-WiSE parquet: local files, or the Hugging Face dataset `MoSalama98/LoRA-WiSE` by name.
"""

from __future__ import annotations

import csv
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from dsire.errors import UserError
from dsire.lora import LoRA, LoRAError, load_lora
from dsire.lora.load import PEFT_CONFIG, os_problem
from dsire.lora.lorawise import CONCEPT_COLUMN, LABEL_COLUMN, subset_rank


@dataclass(frozen=True)
class ZooEntry:
    """One labelled LoRA: a file or directory, or one row of a parquet file."""

    path: str
    n: int
    concept: str
    row: int | None = None  # parquet row
    rank: int | None = None  # for flat LoRA-WiSE columns

    @property
    def key(self) -> str:
        return self.path if self.row is None else f"{self.path}#row={self.row}"

    def load(self, allow_torch_load: bool = False) -> LoRA:
        return load_lora(self.path, allow_torch_load=allow_torch_load, rank=self.rank, row=self.row or 0)


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of each data row; the file must have the `required` columns."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [(reader.line_num, row) for row in reader]
    missing = [c for c in required if c not in (reader.fieldnames or ())]
    if missing or not rows:
        columns = ", ".join(reader.fieldnames or ()) or "none"
        problem = f"missing columns {', '.join(missing)}" if missing else "no rows"
        raise LoRAError(path, f"{problem}; expected a CSV with columns {', '.join(required)} (found: {columns})")
    return rows


def _labelled(table: Path, where: str, path: str, n: object, concept: str | None) -> ZooEntry:
    """A row's entry; a size that is not a whole number >= 1, or an empty concept, names the file and row."""
    text = str(n).strip()
    if not text.isdigit() or int(text) < 1:
        raise LoRAError(table, f"{where}: n must be a whole number >= 1, got {n!r}")
    if not (concept or "").strip():
        raise LoRAError(table, f"{where}: concept is empty (every LoRA needs the concept it was trained on)")
    return ZooEntry(path, int(text), str(concept))


def from_manifest(manifest: str | Path, step: int | None = None) -> list[ZooEntry]:
    """Entries of a zoo generator's manifest at one snapshot `step` (default: the last), relative
    paths relative to the manifest: snapshots of different steps are different recipes, never mixed."""
    manifest = Path(manifest)
    rows = _read_csv(manifest, ("path", "n", "concept"))
    rows = _at_step(manifest, rows, step)
    return [
        _labelled(manifest, f"line {line}", str(manifest.parent / r["path"]), r["n"], r["concept"]) for line, r in rows
    ]


def _at_step(manifest: Path, rows: list[tuple[int, dict[str, str]]], step: int | None) -> list:
    """The rows of snapshot `step` (None: the last); a manifest without a `step` column has one snapshot."""
    if "step" not in rows[0][1]:
        if step is not None:
            raise UserError("data.source.step", f"{step}: {manifest} has no step column (one snapshot per LoRA)")
        return rows
    steps = set()
    for line, row in rows:
        if not row["step"].strip().isdigit():
            raise LoRAError(manifest, f"line {line}: step must be a whole number, got {row['step']!r}")
        steps.add(int(row["step"]))
    if step is not None and step not in steps:
        raise UserError("data.source.step", f"{step} is not among {manifest}'s snapshot steps {sorted(steps)}")
    chosen = max(steps) if step is None else step
    return [(line, row) for line, row in rows if int(row["step"]) == chosen]


def from_labels_dir(directory: str | Path, labels: str = "labels.csv") -> list[ZooEntry]:
    """Entries of a directory of LoRA files in any format, labelled by `labels.csv` (file,n,concept)."""
    directory = Path(directory)
    table = directory / labels
    entries = [
        _labelled(table, f"line {line}", str(directory / r["file"]), r["n"], r["concept"])
        for line, r in _read_csv(table, ("file", "n", "concept"))
    ]
    _refuse_same_file_twice(table, entries)
    return entries


def _refuse_same_file_twice(labels: Path, entries: list[ZooEntry]) -> None:
    """One LoRA under two rows (a repeated row, a symlink, a hard link) would sit on both sides of a split.

    Entries that cannot be looked at are left to the reader, which reports them per file.
    """
    seen: dict[tuple[int, int], int] = {}
    for row, entry in enumerate(entries, start=1):
        try:
            info = os.stat(entry.path)
        except OSError:
            continue
        first = seen.setdefault((info.st_dev, info.st_ino), row)
        if first != row:
            raise LoRAError(labels, f"rows {first} and {row} name the same file ({entry.path}): list each LoRA once")


def scan_directory(directory: Path, suffixes: tuple[str, ...]) -> tuple[list[Path], dict[str, str]]:
    """The LoRAs directly in `directory` (files with `suffixes`, PEFT adapter directories), and why
    each entry that is or may be one cannot be read.

    Reported, not read: an entry that cannot be looked at (a symlink loop, a dangling link, a
    directory we may not read), a weights name on something that is not a regular file (reading a
    FIFO never ends), and a second name (symlink, hard link) of a file already listed.
    Subdirectories other than PEFT adapters are not descended into, so a directory symlink loop
    cannot recurse.
    """
    try:
        children = sorted(directory.iterdir())
    except OSError as exc:
        return [], {str(directory): f"cannot list: {os_problem(exc)}"}
    found: list[Path] = []
    errors: dict[str, str] = {}
    seen: dict[tuple[int, int], Path] = {}
    for child in children:
        try:
            info = child.stat()
        except OSError as exc:
            errors[str(child)] = os_problem(exc)
            continue
        if stat.S_ISDIR(info.st_mode):
            try:
                if not _is_peft_adapter(child):
                    continue
            except OSError as exc:  # a locked directory may or may not be an adapter: say so
                errors[str(child)] = os_problem(exc)
                continue
        elif child.suffix.lower() not in suffixes:
            continue
        elif not stat.S_ISREG(info.st_mode):
            errors[str(child)] = "not a regular file (a FIFO, socket or device?)"
            continue
        first = seen.setdefault((info.st_dev, info.st_ino), child)
        if first != child:
            errors[str(child)] = f"same file as {first.name} (a symlink or hard link): read once"
            continue
        found.append(child)
    return found, errors


def _is_peft_adapter(directory: Path) -> bool:
    """Whether `directory` holds adapter_config.json; OSError where that cannot be told (a directory
    we may not read), which Path.is_file would answer with False on some Python versions."""
    try:
        return stat.S_ISREG(os.stat(directory / PEFT_CONFIG).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def from_parquet_files(files: list[str | Path], rank: int | None = None) -> list[ZooEntry]:
    """One entry per row of local LoRA-WiSE parquet files; reads only the label columns."""
    entries = []
    for file in sorted(map(Path, files)):
        try:
            table = pq.read_table(file, columns=[LABEL_COLUMN, CONCEPT_COLUMN])
        except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
            raise LoRAError(file, f"cannot read the label columns ({exc})") from exc
        file_rank = rank if rank is not None else subset_rank(file)
        for row, (n, concept) in enumerate(
            zip(table[LABEL_COLUMN].to_pylist(), table[CONCEPT_COLUMN].to_pylist(), strict=True)
        ):
            entry = _labelled(file, f"row {row}", str(file), n, "" if concept is None else str(concept))
            entries.append(ZooEntry(entry.path, entry.n, entry.concept, row=row, rank=file_rank))
    return entries


def lorawise_files(dataset: str | Path, subset: str | None, cache_dir: str | Path) -> list[Path]:
    """Local parquet files of a LoRA-WiSE subset, through `datasets`' own resolution and download.

    `dataset` is a Hugging Face dataset name (`MoSalama98/LoRA-WiSE`, downloaded once into
    `cache_dir`) or a local parquet file or directory in the same schema.
    """
    from datasets import DownloadConfig, DownloadManager, load_dataset_builder  # heavy; only here

    local = Path(dataset)
    if local.exists():
        files = sorted(map(str, local.rglob("*.parquet"))) if local.is_dir() else [str(local)]
        if not files:
            raise UserError("data.source.path", f"{local} holds no .parquet files")
        builder = load_dataset_builder("parquet", data_files=files, cache_dir=str(cache_dir))
        return [Path(f) for f in builder.config.data_files["train"]]
    try:  # network errors, an unknown dataset or subset, offline mode: all OSErrors in datasets/huggingface_hub
        _check_hub_reachable()
        builder = load_dataset_builder(str(dataset), subset, cache_dir=str(cache_dir))
        manager = DownloadManager(download_config=DownloadConfig(cache_dir=str(cache_dir)))
        return [Path(f) for f in manager.download(list(builder.config.data_files["train"]))]
    except OSError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            "data.source.path",
            f"cannot get the Hugging Face dataset {dataset} ({reason}); with no network, give a local copy of its "
            "parquet files (data.source.path=DIR), or set HF_HUB_OFFLINE=1 to use a copy cached in paths.cache_dir",
        ) from exc


def _check_hub_reachable(timeout: float = 5.0) -> None:
    """Raise OSError at once when the Hub's host does not answer: huggingface_hub would retry for
    half a minute before giving up. Offline mode (HF_HUB_OFFLINE=1) skips the check: it reads the cache."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise OSError(f"{endpoint.hostname}:{port} does not answer: {exc.strerror or exc}") from exc


def from_lorawise(
    dataset: str | Path, subset: str | None, cache_dir: str | Path, rank: int | None = None
) -> list[ZooEntry]:
    """Entries of a LoRA-WiSE subset; the rank comes from the subset name unless given."""
    rank = rank if rank is not None else (subset_rank(subset) if subset else None)
    return from_parquet_files(lorawise_files(dataset, subset, cache_dir), rank=rank)
