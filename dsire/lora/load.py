"""`load_lora`: one function for every LoRA file, directory or parquet row users bring."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from dsire.lora.files import DEFAULT_LIMITS, SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, Limits, read_tensors
from dsire.lora.formats import FORMATS, AdapterConfig, build_lora, detect_format
from dsire.lora.lorawise import read_lorawise
from dsire.lora.model import LoRA, LoRAError

PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES
_MAX_CONFIG_BYTES = 1 << 20


def load_lora(
    path: str | Path,
    format: str = "auto",
    *,
    allow_torch_load: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    rank: int | None = None,
    row: int = 0,
) -> LoRA:
    """Read a LoRA in any supported format as a canonical `LoRA`.

    `path` is a weights file, a PEFT/diffusers output directory, or a LoRA-WiSE parquet file
    (then `row` picks the row and `rank` reshapes flat columns; see `read_lorawise` for all rows).
    `format` is "auto" or one of FORMATS. Raises LoRAError naming the file and the problem; an
    OS error (permission denied, a symlink loop, an I/O error) becomes one too, so callers need
    to handle a single error type.
    """
    path = Path(path)
    try:
        return _load(path, format, allow_torch_load, limits, rank, row)
    except OSError as exc:
        raise LoRAError(exc.filename or path, f"cannot read: {os_problem(exc)}") from exc


def os_problem(exc: OSError) -> str:
    """`no such file or directory`, `too many levels of symbolic links`, ...: the OS's words."""
    return (exc.strerror or str(exc)).lower()


def _load(path: Path, format: str, allow_torch_load: bool, limits: Limits, rank: int | None, row: int) -> LoRA:
    if format not in ("auto", *FORMATS):
        raise LoRAError(path, f"unknown format {format!r}; one of {('auto', *FORMATS)}")
    if path.suffix.lower() == ".parquet" or format == "lorawise":
        for lora in read_lorawise(path, rank=rank, rows=range(row, row + 1), limits=limits):
            return lora
        raise LoRAError(path, f"no row {row}")
    weights = resolve_weights_file(path)
    tensors, metadata = read_tensors(weights, allow_torch_load, limits)
    configs = _adapter_configs(weights, metadata)
    fmt = detect_format(list(tensors), _peft_config_path(weights).is_file(), weights) if format == "auto" else format
    return build_lora(tensors, fmt, weights, configs=configs, metadata=metadata)


def _peft_config_path(weights: Path) -> Path:
    return weights.parent / PEFT_CONFIG


def resolve_weights_file(path: Path) -> Path:
    """The one weights file a path names: itself, or the single weights file in a directory.

    Anything else (a FIFO, a device, a symlink loop) is refused here, before any caller opens it:
    reading /dev/zero or a FIFO would never end.
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:  # Path.exists() would hide a symlink loop as "no such file"
        raise LoRAError(path, os_problem(exc)) from exc
    if stat.S_ISREG(mode):
        return path
    if not stat.S_ISDIR(mode):
        raise LoRAError(path, "not a regular file or directory (a FIFO, socket or device?)")
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    preferred = [p for p in candidates if p.suffix.lower() in SAFETENSORS_SUFFIXES] or candidates
    if len(preferred) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise LoRAError(path, f"directory must hold exactly one weights file to read (found: {found})")
    return preferred[0]


def _read_json(path: Path) -> dict:
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise LoRAError(path, f"config over {_MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoRAError(path, f"malformed JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise LoRAError(path, "malformed config (not a JSON object)")
    return data


def _adapter_configs(weights: Path, metadata: dict[str, str]) -> dict[str | None, AdapterConfig]:
    """Rank/alpha settings: PEFT's adapter_config.json beside the file, or diffusers' header entry."""
    config_file = _peft_config_path(weights)
    if config_file.is_file():
        return {None: AdapterConfig.from_dict(_read_json(config_file), config_file)}
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoRAError(weights, f"malformed {DIFFUSERS_METADATA_KEY} ({exc})") from exc
    if not isinstance(flat, dict):
        raise LoRAError(weights, f"malformed {DIFFUSERS_METADATA_KEY} (not a JSON object)")
    per_component: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        per_component.setdefault(component, {})[field] = value
    return {c: AdapterConfig.from_dict(d, weights) for c, d in per_component.items()}
