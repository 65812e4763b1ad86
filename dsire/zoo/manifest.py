"""A zoo's `manifest.csv`: one row per saved checkpoint, written atomically after its file.

The manifest is what a zoo directory promises: every row names a complete checkpoint, so readers
(training, the quality check) and a resumed sweep trust it and nothing else.
"""

from __future__ import annotations

import csv
from pathlib import Path

from dsire.atomic import atomic_write_csv

MANIFEST = "manifest.csv"
COLUMNS = (
    "path",
    "n",
    "concept",
    "replicate",
    "seed",
    "step",
    "rank",
    "alpha",
    "format",
    "recipe_hash",
    "base_fingerprint",
    "seconds",
)


def read_manifest(out_dir: Path) -> list[dict[str, str]]:
    path = out_dir / MANIFEST
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_manifest(out_dir: Path, rows: list[dict]) -> None:
    order = sorted(rows, key=lambda r: (r["concept"], int(r["n"]), int(r["replicate"]), int(r["step"])))
    atomic_write_csv(out_dir / MANIFEST, COLUMNS, order)
