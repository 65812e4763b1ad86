"""`predict.py`'s job: how many images was each LoRA trained on, according to a fitted model.

Prints one row per LoRA (table, JSON or CSV): predicted N, the N its kohya metadata claims (if any),
the share of the vote it won, the mean distance to the nearest zoo LoRA over voters, and the layers
whose own vote disagreed. Files that cannot be read, or whose layers (names, rank, shapes) do not match
the model's, are reported and skipped; the exit code is then non-zero.

With `labels=CSV` (a `file,n,concept` labels file, files relative to `lora`, or a zoo manifest
`path,n,concept`) the listed LoRAs are predicted and scored: how a user tests a model on LoRAs from
elsewhere. Accuracy, MAE, per-N accuracy and the confusion matrix (`dsire.models.metrics`, the same
numbers train.py reports per split) are printed and written to `evaluation_dir`.
"""

from __future__ import annotations

import csv
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

from dsire.atomic import atomic_write_csv, atomic_write_text, csv_text
from dsire.data.datamodule import zoo_batches
from dsire.data.sources import ZooEntry, from_labels_dir, from_manifest, scan_directory
from dsire.errors import UserError
from dsire.harvest import claimed_columns
from dsire.loggers import quiet_library_noise
from dsire.lora.load import PEFT_CONFIG, WEIGHT_SUFFIXES
from dsire.models.checkpoint import load_checkpoint
from dsire.models.features import Features
from dsire.models.metrics import split_metrics
from dsire.settings import require_device
from dsire.train import finite

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


def labelled_entries(lora: str | Path, labels: str | Path) -> list[ZooEntry]:
    """The LoRAs a labels CSV lists, with their N: `file,n,concept` (files relative to `lora`) or a
    zoo manifest `path,n,concept` (paths relative to the manifest)."""
    table = Path(lora) / labels if Path(lora).is_dir() else Path(labels)  # an absolute `labels` stays itself
    if not table.is_file():
        raise UserError("labels", f"{table} does not exist (a CSV file,n,concept, or a manifest path,n,concept)")
    with table.open(newline="") as f:
        header = next(csv.reader(f), [])
    return from_manifest(table) if "path" in header else from_labels_dir(table.parent, table.name)


def predict(cfg: DictConfig) -> tuple[list[dict], dict[str, str], dict | None]:
    """Rows, per-file errors, and with `labels` the metrics of the labelled set (else None)."""
    module = load_checkpoint(cfg.ckpt)
    if cfg.labels:
        entries, unreadable = labelled_entries(cfg.lora, cfg.labels), {}
    else:
        entries, unreadable = collect_inputs(cfg.lora)
    if not entries:
        return [], unreadable or {str(cfg.lora): "no LoRA files found"}, None
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    loader = zoo_batches(entries, None, cfg.batch_size, cfg.allow_torch_load)
    features = Features.concat(trainer.predict(module, loader) or [])
    if not features.keys:
        return [], unreadable | features.errors, None
    prediction = module.predict_features(features)
    estimate = module.estimate(features, prediction)
    sizes = module.knn.sizes
    rows = []
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
    evaluation = split_metrics(features, prediction, estimate, module.knn.voters, sizes) if cfg.labels else None
    return rows, unreadable | features.errors, evaluation


def write_evaluation(evaluation: dict, directory: str | Path) -> None:
    """`evaluation.json` (every metric, every prediction) and `confusion.csv`: rows true N, columns
    predicted N, and each true N's accuracy."""
    directory = Path(directory)
    atomic_write_text(directory / "evaluation.json", json.dumps(finite(evaluation), indent=1, allow_nan=False))
    sizes, counts = evaluation["confusion"]["sizes"], evaluation["confusion"]["counts"]
    per_size = evaluation["per_size_accuracy"]
    columns = ["true_n", *(f"predicted_{s}" for s in sizes), "accuracy"]
    rows = [[s, *row, per_size.get(s, "")] for s, row in zip(sizes, counts, strict=True) if sum(row)]
    atomic_write_csv(directory / "confusion.csv", columns, rows)


def evaluation_text(evaluation: dict) -> str:
    """A few lines: accuracy, MAE, the estimate's MAE, per-N accuracy, the confusion matrix."""
    sizes, counts = evaluation["confusion"]["sizes"], evaluation["confusion"]["counts"]
    lines = [
        f"labelled LoRAs: {len(evaluation['predictions'])}; accuracy {evaluation['accuracy']:.3f}, "
        f"MAE {evaluation['mae']:.3f}, estimate MAE {evaluation['regression_mae']:.3f}",
        "accuracy per N: " + ", ".join(f"{s}: {a:.2f}" for s, a in evaluation["per_size_accuracy"].items()),
        "confusion (rows: true N, columns: predicted N " + " ".join(map(str, sizes)) + "):",
    ]
    lines += [f"  {s}: " + " ".join(map(str, row)) for s, row in zip(sizes, counts, strict=True) if sum(row)]
    return "\n".join(lines)


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
    rows, errors, evaluation = predict(cfg)  # a damaged checkpoint raises CheckpointError: one `error:` line
    text = render(rows, errors, cfg.output)
    if text is not None:
        if cfg.output_file:
            atomic_write_text(cfg.output_file, text)  # creates its folder
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if evaluation is not None:
        write_evaluation(evaluation, cfg.evaluation_dir)
        stdout_is_data = text is not None and not cfg.output_file  # JSON or CSV there: the summary goes to stderr
        where = sys.stderr if stdout_is_data else sys.stdout
        print(f"{evaluation_text(evaluation)}\nevaluation: {cfg.evaluation_dir}", file=where)
    for key, problem in errors.items():
        print(f"error: {key}: {problem}", file=sys.stderr)
    flagged = sum(row["recipe_mismatch"] for row in rows)
    if flagged:
        print(f"warning: {flagged} of {len(rows)} LoRAs look like another recipe than the zoo's", file=sys.stderr)
    return 1 if errors else 0
