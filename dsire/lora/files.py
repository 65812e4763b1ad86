"""Reading raw tensors from untrusted files, with bounds.

LoRA files come from strangers. Safetensors is the trusted path: its header is bounded and
checked against the file size here (so truncation is reported as such), then `safetensors`
itself parses it. Pickle-based files (.ckpt/.pt/.bin) are read only through
`torch.load(weights_only=True)` and only when the caller opts in.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dsire.lora.model import LoRAError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8}


@dataclass(frozen=True)
class Limits:
    """Bounds on what one file may make us read or allocate."""

    max_file_bytes: int = 8 * 2**30  # a rank-128 SDXL LoRA is ~1.7 GB; full models are bigger
    max_header_bytes: int = 16 * 2**20  # safetensors headers of real LoRAs are < 1 MB
    max_tensors: int = 100_000


DEFAULT_LIMITS = Limits()


def check_size(path: Path, limits: Limits) -> int:
    """The file's size, or a LoRAError if it is missing, empty or over the limit."""
    if not path.is_file():
        raise LoRAError(path, "not a file")
    size = path.stat().st_size
    if size == 0:
        raise LoRAError(path, "empty file")
    if size > limits.max_file_bytes:
        raise LoRAError(path, f"file is {size} bytes, over the {limits.max_file_bytes}-byte limit")
    return size


def _read_safetensors_header(path: Path, size: int, limits: Limits) -> dict:
    """Parse and check the header ourselves so that every failure gets a plain message."""
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise LoRAError(path, "truncated: shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > limits.max_header_bytes:
            raise LoRAError(
                path,
                f"safetensors header claims {header_len} bytes, over the {limits.max_header_bytes}-byte "
                "limit (not a safetensors file, or a hostile one)",
            )
        if 8 + header_len > size:
            raise LoRAError(path, "truncated: the file ends inside the safetensors header")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5000-digit number, absurd nesting
        raise LoRAError(path, f"malformed safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise LoRAError(path, "malformed safetensors header (not a JSON object)")
    if len(header) > limits.max_tensors + 1:
        raise LoRAError(path, f"{len(header) - 1} tensors, over the {limits.max_tensors} limit")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _check_entry(path, name, info, data_len)
    return header


def _check_entry(path: Path, name: str, info: object, data_len: int) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise LoRAError(path, f"malformed safetensors header entry for {name!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise LoRAError(path, f"tensor {name!r} has dtype {dtype}, not a float or integer type")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise LoRAError(path, f"tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise LoRAError(path, f"tensor {name!r} has malformed data offsets {offsets!r}")
    begin, end = offsets
    if end > data_len:
        raise LoRAError(path, f"truncated: tensor {name!r} ends at byte {end} of a {data_len}-byte data section")
    if begin < 0 or end < begin or end - begin != DTYPE_BYTES[dtype] * _numel(shape):
        raise LoRAError(path, f"tensor {name!r}: data offsets {offsets} do not match {dtype}{shape}")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_safetensors(path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU, dtype as stored) and the `__metadata__` strings of a safetensors file."""
    size = check_size(path, limits)
    header = _read_safetensors_header(path, size, limits)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise LoRAError(path, f"unreadable safetensors file ({exc})") from exc
    metadata.pop("format", None)
    if not isinstance(header.get("__metadata__", {}), dict):
        raise LoRAError(path, "malformed safetensors metadata")
    return tensors, metadata


def read_safetensors_metadata(path: Path, limits: Limits = DEFAULT_LIMITS) -> dict[str, str]:
    """Only the `__metadata__` strings of a safetensors file: its checked header, no tensor data.

    For tools that list many files by what they claim (e.g. `dsire harvest`), where reading every
    tensor would be slow and pointless.
    """
    header = _read_safetensors_header(path, check_size(path, limits), limits)
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoRAError(path, "malformed safetensors metadata (not an object of strings)")
    return metadata


def read_torch(path: Path, allow_torch_load: bool, limits: Limits = DEFAULT_LIMITS) -> dict[str, torch.Tensor]:
    """Tensors of a pickle-based checkpoint, via `torch.load(weights_only=True)`, only on opt-in."""
    if not allow_torch_load:
        raise LoRAError(
            path,
            "pickle-based checkpoint (.ckpt/.pt/.bin): refused by default; convert it to safetensors, "
            "or opt in with allow_torch_load=True (--allow-torch-load), which uses torch.load(weights_only=True)",
        )
    check_size(path, limits)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # weights_only refusals and corrupt archives both land here
        raise LoRAError(path, f"refused or unreadable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise LoRAError(path, "torch checkpoint is not a flat {name: tensor} state dict")
    if len(obj) > limits.max_tensors:
        raise LoRAError(path, f"{len(obj)} tensors, over the {limits.max_tensors} limit")
    return obj


def read_tensors(
    path: Path, allow_torch_load: bool = False, limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one weights file, dispatched on its suffix."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path, limits)
    if suffix in TORCH_SUFFIXES:
        return read_torch(path, allow_torch_load, limits), {}
    raise LoRAError(path, f"unknown weights file type {suffix!r} (expected .safetensors, or {TORCH_SUFFIXES})")
