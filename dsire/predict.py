"""`predict.py`'s job: how many images was each LoRA trained on, according to a fitted model.

Prints one row per LoRA (table, JSON or CSV): predicted N, the N its kohya metadata claims (if any),
the share of the vote it won, the mean distance to the nearest zoo LoRA over voters, and the layers
whose own vote disagreed. Files that cannot be read, or whose layers do not match the model's, are
reported and skipped; the exit code is then non-zero.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from dsire.atomic import atomic_write_text, csv_text
from dsire.data.datamodule import zoo_batches
from dsire.data.sources import ZooEntry, scan_directory
from dsire.errors import UserError
from dsire.harvest import claimed_columns
from dsire.loggers import quiet_library_noise
from dsire.lora.load import PEFT_CONFIG, WEIGHT_SUFFIXES
from dsire.models.checkpoint import load_checkpoint
from dsire.models.features import Features
from dsire.settings import require_device

OUTPUTS = ("table", "json", "csv")
FILE_MIN_WIDTH = 12
COLUMNS = (
    "file",
    "predicted_n",
    "claimed_n",  # distinct images in the file's kohya metadata (see dsire.harvest); empty without it
    "claimed_images_with_repeats",
    "estimated_n",  # the size regression: N as a number, with its conformal interval
    "interval_low",
    "interval_high",
    "beyond_zoo_sizes",  # the estimate lies outside the zoo's sizes: extrapolated, the least reliable kind
    "mismatch_p",  # small: the LoRA sits farther from the zoo than the zoo's own unseen concepts
    "recipe_mismatch",
    "vote_share",
    "nearest_distance",
    "disagreeing_voters",  # how many of the model's voters voted for another N
    "disagreeing_layers",
)


def collect_inputs(path: str | Path) -> tuple[list[ZooEntry], dict[str, str]]:
    """One entry per LoRA (the file itself, a PEFT directory, or each LoRA inside a directory), and
    the directory's entries that cannot be read, with why (pickles are listed: the reader says why
    it refuses them)."""
    path = Path(path)
    if not path.is_dir() or (path / PEFT_CONFIG).is_file():
        return [ZooEntry(str(path), n=-1, concept="")], {}
    found, unreadable = scan_directory(path, WEIGHT_SUFFIXES)
    return [ZooEntry(str(p), n=-1, concept="") for p in found], unreadable


def _disagreeing(voter_labels, voters: list[str], predicted: int) -> str:
    layers = Counter(v.rsplit("/", 1)[0] for v, label in zip(voters, voter_labels, strict=True) if label != predicted)
    return "; ".join(f"{layer} ({count})" for layer, count in layers.most_common())


def predict(cfg: DictConfig) -> tuple[list[dict], dict[str, str]]:
    module = load_checkpoint(cfg.ckpt)
    entries, unreadable = collect_inputs(cfg.lora)
    if not entries:
        return [], unreadable or {str(cfg.lora): "no LoRA files found"}
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    loader = zoo_batches(entries, None, cfg.batch_size, cfg.allow_torch_load)
    features = Features.concat(trainer.predict(module, loader) or [])
    rows = []
    if features.keys:
        prediction = module.predict_features(features)
        estimate = module.estimate(features, prediction)
        sizes = module.knn.sizes
        for i, key in enumerate(features.keys):
            n = int(prediction.n[i])
            rows.append(
                {
                    "file": key,
                    "predicted_n": n,
                    **claimed_columns(key),
                    "estimated_n": _number(estimate.n[i], 2),
                    "interval_low": _number(estimate.low[i], 2),
                    "interval_high": _number(estimate.high[i], 2),
                    "beyond_zoo_sizes": not sizes.min() <= estimate.n[i] <= sizes.max(),
                    "mismatch_p": _number(estimate.mismatch_p[i], 4),
                    "recipe_mismatch": bool(estimate.mismatch[i]),
                    "vote_share": round(float(prediction.share[i]), 4),
                    "nearest_distance": round(float(prediction.distance[i]), 6),
                    "disagreeing_voters": int((prediction.voter_labels[i] != n).sum()),
                    "disagreeing_layers": _disagreeing(prediction.voter_labels[i], module.knn.voters, n),
                }
            )
    return rows, unreadable | features.errors


def _number(value: float, digits: int) -> float | None:
    """Rounded, or None where the model has no calibration (too few concepts) or the bound is infinite."""
    return round(float(value), digits) if np.isfinite(value) else None


def _estimate_text(row: dict) -> str:
    """`4.2 [2.1, 8.4]`; an unknown bound shows as `?`; `(beyond zoo)` marks an extrapolation."""
    low, high = (f"{row[k]:.3g}" if row[k] is not None else "?" for k in ("interval_low", "interval_high"))
    return f"{row['estimated_n']:.3g} [{low}, {high}]" + (" (beyond zoo)" if row["beyond_zoo_sizes"] else "")


def _mismatch_text(row: dict) -> str:
    """`0.412`, or `0.010 (!)` when flagged; `?` without calibration."""
    if row["mismatch_p"] is None:
        return "?"
    return f"{row['mismatch_p']:.3f}" + (" (!)" if row["recipe_mismatch"] else "")


def _claimed_text(n: int | None, with_repeats: int | None) -> str:
    """`12 (120)`, `12`, `? (120)`, or "" when the file claims nothing."""
    if with_repeats is None:
        return "" if n is None else str(n)
    return f"{'?' if n is None else n} ({with_repeats})"


def render(rows: list[dict], errors: dict[str, str], output: str) -> str | None:
    """JSON or CSV text; None for the table, which is printed directly."""
    if output == "json":
        return json.dumps({"predictions": rows, "errors": errors}, indent=1)
    if output == "csv":
        return csv_text(COLUMNS, rows)
    print_table(rows)
    return None


def print_table(rows: list[dict], console: Console | None = None) -> None:
    """The table, never cropped: piped, it is as wide as its content; in a narrow terminal, no narrower
    than its longest words. Cells and headers are plain text (a `[` in a file name is not markup)."""
    headers = ("N", "claimed N\n(×repeats)", "estimate\n[interval]", "mismatch\np", "vote\nshare", "nearest\ndistance")
    headers += ("disagreeing\nvoters",)  # which ones: output=json or csv
    cells = [
        (
            str(row["predicted_n"]),
            _claimed_text(row["claimed_n"], row["claimed_images_with_repeats"]),
            _estimate_text(row).replace(" (beyond", "\n(beyond"),
            _mismatch_text(row),
            f"{row['vote_share']:.2f}",
            f"{row['nearest_distance']:.4g}",
            str(row["disagreeing_voters"]),
        )
        for row in rows
    ]
    table = Table(title="How many images was each LoRA trained on?")
    table.add_column("file", overflow="fold", min_width=FILE_MIN_WIDTH)  # the one column that may fold
    widths = [FILE_MIN_WIDTH]
    for i, header in enumerate(headers):
        widths.append(max(len(line) for text in (header, *(c[i] for c in cells)) for line in text.splitlines()))
        table.add_column(Text(header), no_wrap=True, min_width=widths[-1])
    for row, texts in zip(rows, cells, strict=True):
        table.add_row(Text(row["file"]), *map(Text, texts))
    console = console or Console()
    narrowest = 1 + sum(width + 3 for width in widths)  # each column: its width, padding 2, a rule
    widest = Measurement.get(console, console.options.update_width(10**6), table).maximum
    console.width = max(console.width, narrowest) if console.is_terminal else max(widest, narrowest)
    console.print(table)


def check_options(cfg: DictConfig) -> None:
    """Refuse options that would be ignored or fail late, before any file is read."""
    if cfg.output not in OUTPUTS:
        raise UserError("output", f"{cfg.output!r} is not allowed; one of {list(OUTPUTS)}")
    if cfg.output_file and cfg.output == "table":
        raise UserError("output_file", "the table is for the terminal; to write a file use output=json or output=csv")
    require_device("trainer.accelerator", cfg.trainer.accelerator)


def run(cfg: DictConfig) -> int:
    """Exit code: 0 all predicted, 1 some files failed, 2 the checkpoint itself is unusable (or an option)."""
    check_options(cfg)
    quiet_library_noise()
    rows, errors = predict(cfg)  # a damaged checkpoint raises CheckpointError: one `error:` line, exit 2
    text = render(rows, errors, cfg.output)
    if text is not None:
        if cfg.output_file:
            atomic_write_text(cfg.output_file, text)  # creates its folder
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
    for key, problem in errors.items():
        print(f"error: {key}: {problem}", file=sys.stderr)
    flagged = sum(row["recipe_mismatch"] for row in rows)
    if flagged:
        print(f"warning: {flagged} of {len(rows)} LoRAs look like another recipe than the zoo's", file=sys.stderr)
    return 1 if errors else 0
