"""On-disk spectra cache, keyed by file content hash and feature settings.

A second run reads no weights: the content hash of a file is remembered against its
(path, size, mtime), so a cache hit costs a `stat` and one small safetensors read. The remembered
hashes are saved at least every `FLUSH_SECONDS` while entries are written, so a killed run's
successor does not hash every file again.
Entries are written atomically; a torn or foreign entry is treated as a miss and rewritten, and so is
an entry written before layer shapes were stored with the spectra.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dsire.atomic import atomic_path, atomic_write_text
from dsire.data.sources import ZooEntry
from dsire.hashing import file_sha256, json_hash
from dsire.lora.load import resolve_weights_file
from dsire.spectra import Spectra

CACHE_VERSION = 1
FLUSH_SECONDS = 60.0  # rewriting content_hashes.json costs one JSON dump of every hash seen
_PARTS = ("delta", "down", "up")
Shapes = dict[str, tuple[int, int]]  # layer: (out, in) of ΔW, so a LoRA of another base can be refused


class SpectraCache:
    """get/put the per-layer spectra of zoo entries under `root/<settings>/<hash>.safetensors`."""

    def __init__(self, root: str | Path, settings: dict):
        self.dir = Path(root) / json_hash({"version": CACHE_VERSION, **settings})[:12]
        self.dir.mkdir(parents=True, exist_ok=True)
        self._hashes_file = Path(root) / "content_hashes.json"
        self._hashes: dict[str, str] = self._read_hashes()
        self._flushed = time.monotonic()

    def _read_hashes(self) -> dict[str, str]:
        try:
            hashes = json.loads(self._hashes_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return hashes if isinstance(hashes, dict) else {}

    def _content_key(self, entry: ZooEntry) -> str:
        """Content hash of the entry's weights file (the directory's single file for PEFT dirs)."""
        path = resolve_weights_file(Path(entry.path))
        stat = path.stat()
        stamp = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if stamp not in self._hashes:
            self._hashes[stamp] = file_sha256(path)
        # a parquet row's flat columns are reshaped with the entry's rank: another rank, other spectra
        return self._hashes[stamp] + (f"-row{entry.row}-rank{entry.rank}" if entry.row is not None else "")

    def _path(self, entry: ZooEntry) -> Path:
        return self.dir / f"{self._content_key(entry)}.safetensors"

    def get(self, entry: ZooEntry) -> tuple[dict[str, Spectra], Shapes] | None:
        """The entry's per-layer spectra and layer shapes (out, in); None on a miss."""
        path = self._path(entry)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            layers = sorted({k.rsplit("/", 1)[0] for k in tensors}, key=lambda n: tensors[f"{n}/order"].item())
            spectra = {n: Spectra(*(tensors[f"{n}/{p}"] for p in _PARTS)) for n in layers}
            return spectra, {n: tuple(tensors[f"{n}/shape"].tolist()) for n in layers}
        except (SafetensorError, OSError, KeyError, RuntimeError, ValueError):  # torn, foreign, older: a miss
            return None

    def put(self, entry: ZooEntry, spectra: dict[str, Spectra], shapes: Shapes) -> None:
        tensors = {}
        for order, (name, s) in enumerate(spectra.items()):
            tensors |= {f"{name}/{p}": getattr(s, p).contiguous() for p in _PARTS}
            tensors[f"{name}/order"] = torch.tensor(order)
            tensors[f"{name}/shape"] = torch.tensor(shapes[name], dtype=torch.int64)
        with atomic_path(self._path(entry), durable=False) as tmp:  # a torn entry is a miss, recomputed
            save_file(tensors, str(tmp))
        if time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Persist the remembered content hashes, keeping those other runs (or DDP ranks) added meanwhile."""
        self._hashes = self._read_hashes() | self._hashes
        atomic_write_text(self._hashes_file, json.dumps(self._hashes))
        self._flushed = time.monotonic()
