"""Content hashes of settings: the cache keys of pretrained backbones, zoo bases and training records."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def json_hash(value: Any) -> str:
    """16 hex digits of SHA-256 over canonical JSON (sorted keys; dataclasses as dicts)."""
    text = json.dumps(value, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} has no canonical JSON form")
