"""LoRA-WiSE parquet rows (Hugging Face dataset `MoSalama98/LoRA-WiSE`) as canonical LoRAs.

Each row is one fine-tune snapshot: `label` (dataset size N), `name` (concept id) and one column
per matrix, named like `unet.<module>.lora.down.weight`, holding the matrix as a float64 list
(flat, or a list of rows). Flat columns need the rank to be reshaped; it is part of the subset
name (`low_8`, `low_16`, `low_32`, `medium_16`, `medium_32`, `medium_32_2`, `high_32`).
`write_lorawise` writes any labelled LoRAs in this layout, so that the LoRA-WiSE path can be tried
on a zoo made here (`dsire lorawise ZOO OUT`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dsire.atomic import atomic_path
from dsire.lora.files import DEFAULT_LIMITS, Limits, check_size
from dsire.lora.formats import build_lora
from dsire.lora.model import LoRA, LoRAError

SUBSETS = ("low_8", "low_16", "low_32", "medium_16", "medium_32", "medium_32_2", "high_32")
LABEL_COLUMN, CONCEPT_COLUMN = "label", "name"
_SUBSET_IN_PATH = re.compile(r"(?:^|[/_\\])(?:low|medium|high)[_/\\](\d+)(?:_\d+)?(?:[/_\\.]|$)")


def subset_rank(subset_or_path: str | Path) -> int | None:
    """The LoRA rank encoded in a subset name or a path that contains one (`.../low/32/...`)."""
    match = _SUBSET_IN_PATH.search("/" + str(subset_or_path).replace("\\", "/"))
    return int(match.group(1)) if match else None


def _matrix(column: pa.ListArray, name: str, role: str, rank: int | None, source: str) -> torch.Tensor:
    """One cell (a 1-row list column) as a [rows, cols] tensor."""
    values = column.flatten()
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        rows = len(values)
        flat = values.flatten().to_numpy(zero_copy_only=False)
        if rows == 0 or flat.size % rows:
            raise LoRAError(source, f"column {name!r}: ragged nested list")
        return torch.from_numpy(np.array(flat, dtype=np.float64).reshape(rows, -1))
    flat = values.to_numpy(zero_copy_only=False)
    if rank is None:
        raise LoRAError(source, f"column {name!r} is a flat list: pass rank= (or use a path naming the subset)")
    if flat.size == 0 or flat.size % rank:
        raise LoRAError(source, f"column {name!r}: {flat.size} values do not reshape to rank {rank}")
    flat = np.array(flat, dtype=np.float64)  # an owned, writable copy of Arrow's buffer
    shape = (rank, -1) if role == "down" else (-1, rank)
    return torch.from_numpy(flat.reshape(shape))


def read_lorawise(
    path: str | Path,
    rank: int | None = None,
    rows: range | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Iterator[LoRA]:
    """Yield one LoRA per row (all rows, or those in `rows`), reading one row at a time."""
    path = Path(path)
    check_size(path, limits)
    rank = rank if rank is not None else subset_rank(path)
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # a corrupt schema can hold bad UTF-8
        raise LoRAError(path, f"unreadable parquet file ({exc})") from exc
    names = parquet.schema_arrow.names
    for column in (LABEL_COLUMN, CONCEPT_COLUMN):
        if column not in names:
            raise LoRAError(path, f"not in the LoRA-WiSE schema: no {column!r} column")
    weight_columns = [n for n in names if n not in (LABEL_COLUMN, CONCEPT_COLUMN)]
    if len(weight_columns) > limits.max_tensors:
        raise LoRAError(path, f"{len(weight_columns)} weight columns, over the {limits.max_tensors} limit")
    groups, index = _row_groups_from(parquet, rows.start if rows is not None else 0)
    try:
        for batch in parquet.iter_batches(batch_size=1, row_groups=groups):
            if rows is None or index in rows:
                yield _row_to_lora(batch, weight_columns, rank, f"{path}#row={index}")
            index += 1
            if rows is not None and index >= rows.stop:
                return
    except (pa.ArrowException, OSError) as exc:  # Arrow raises corrupt pages as OSError, not ArrowException
        raise LoRAError(path, f"corrupt parquet data at row {index} ({exc})") from exc


def _row_groups_from(parquet: pq.ParquetFile, start: int) -> tuple[list[int], int]:
    """The row groups from the one holding row `start` on, and that group's first row: reading row k
    skips whole groups instead of decoding every row before it."""
    first = 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        if start < first + size:
            return list(range(group, parquet.num_row_groups)), first
        first += size
    return [], first


def _row_to_lora(batch: pa.RecordBatch, weight_columns: list[str], rank: int | None, source: str) -> LoRA:
    tensors = {}
    for name in weight_columns:
        role = "up" if name.endswith(".up.weight") else "down"
        tensors[name] = _matrix(batch.column(name), name, role, rank, source)
    lora = build_lora(tensors, "lorawise", source)
    lora.labels = {
        "n": int(batch.column(LABEL_COLUMN)[0].as_py()),
        "concept": str(batch.column(CONCEPT_COLUMN)[0].as_py()),
    }
    return lora


def write_lorawise(rows: Iterable[tuple[LoRA, int, str]], path: str | Path, nested: bool = False) -> Path:
    """Write (LoRA, N, concept) rows as one LoRA-WiSE parquet file, atomically.

    The layout has no alpha (readers assume alpha = r, scale 1), so each layer's scale is folded into
    `up`: ΔW is what it was. Matrices are float64, flat (the published layout: the rank must then
    come from the file's subset name) or, with `nested`, lists of rows. Every row must have the same
    layers, since each layer is a column.
    """
    columns: dict[str, list] = {LABEL_COLUMN: [], CONCEPT_COLUMN: []}
    layers: list[str] | None = None
    for lora, n, concept in rows:
        layers = layers if layers is not None else list(lora.layers)
        if list(lora.layers) != layers:
            raise LoRAError(lora.source, "other layers than the first row's: one parquet file holds one layer set")
        columns[LABEL_COLUMN].append(int(n))
        columns[CONCEPT_COLUMN].append(str(concept))
        for name, layer in lora.layers.items():
            for role, matrix in (("down", layer.down), ("up", layer.scale * layer.up.double())):
                matrix = matrix.double()
                columns.setdefault(f"{name}.lora.{role}.weight", []).append(
                    matrix.tolist() if nested else matrix.flatten().tolist()
                )
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(columns), tmp)
    return Path(path)
