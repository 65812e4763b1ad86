"""The project's SHA-256 digests, each computed one way: of settings (`json_hash`: the cache keys of
pretrained backbones, zoo bases, training records, spectra cache settings), of tensors and of files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

HASHED_UNLESS_DEFAULT = {"hashed": "unless default"}
"""Metadata of a settings field added after its dataclass was hashed: the field enters `json_hash`
only when set away from its default, so every earlier recipe keeps its hash, and with it its cached
backbones, records and the seeds derived from it."""


def json_hash(value: Any) -> str:
    """16 hex digits of SHA-256 over canonical JSON (sorted keys; dataclasses as dicts, without
    their `HASHED_UNLESS_DEFAULT` fields at their defaults)."""
    text = json.dumps(value, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        plain = dataclasses.asdict(value)
        for field in dataclasses.fields(value):
            if field.metadata == HASHED_UNLESS_DEFAULT and getattr(value, field.name) == field.default:
                del plain[field.name]
        return plain
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} has no canonical JSON form")


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Over every tensor's name, dtype, shape and bytes, in name order: independent of the file holding them
    (base-model fingerprints, checkpoint contents)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Of a file's bytes, read in blocks (the spectra cache's content keys)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
