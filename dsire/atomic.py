"""Atomic file writes: a crash leaves either the old file or the new one, never a torn one."""

from __future__ import annotations

import csv
import io
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    The temporary file is created with mode 0666, so the kernel applies the process umask itself (the
    umask is never read by setting it, which would race with other threads creating files). When
    `durable`, the data and then the directory entry are fsynced, so the rename survives a power cut
    too; without, a killed process still leaves the old file or the new one, and only a power cut may
    leave a torn file: for files a reader can recompute when torn (cache entries), where two fsyncs
    per file would cost more than the write itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:  # flush the data to disk before the rename makes it visible
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_directory(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def csv_text(columns: Sequence[str], rows: Iterable[Sequence | Mapping]) -> str:
    """Rows (sequences in `columns` order, or mappings keyed by them) as CSV text: the one CSV writer of
    the project (zoo manifests, harvest labels, predictions, logged tables, audits, benchmark zoos), so a
    field with a comma, a quote or a newline is always quoted."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([row[c] for c in columns] if isinstance(row, Mapping) else row for row in rows)
    return buffer.getvalue()


def atomic_write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence | Mapping]) -> None:
    """`csv_text` of the rows, written atomically."""
    atomic_write_text(path, csv_text(columns, rows))
