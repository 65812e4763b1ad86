"""The project's SHA-256 digests, each computed one way: of tensors (base-model fingerprints, checkpoint
content), of a file's bytes (spectra cache keys), and of JSON-able settings (recipes, cache settings)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Over every tensor's name, dtype, shape and bytes, in name order: independent of the file holding them."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(value: object) -> str:
    """Of the JSON text with sorted keys: equal settings give equal digests whatever their order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
