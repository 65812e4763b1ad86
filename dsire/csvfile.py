"""Every CSV this project writes (zoo manifests, harvest labels, predictions, logged tables, benchmark
zoos) goes through here: one quoting rule (a field with a comma or a quote is quoted), one line end,
and files are written atomically."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from dsire.atomic import atomic_write_text


def csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, object]]) -> str:
    """A header of `columns`, then one line per row (a dict keyed by column; missing keys are empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, object]]) -> None:
    atomic_write_text(path, csv_text(columns, rows))
