"""A sweep: every (concept, N, replicate) fine-tune of a recipe, sharded over processes, resumable.

Each finished checkpoint is written atomically and then recorded in `manifest.csv` (also written
atomically), so a killed sweep leaves only complete files and a manifest that lists them; the
next run skips every job whose snapshots are all recorded and present. A zoo directory holds one
recipe: resuming with a changed recipe is refused rather than mixing two recipes in one zoo.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dsire.errors import UserError
from dsire.zoo.manifest import MANIFEST, read_manifest, write_manifest
from dsire.zoo.plan import finished, plan
from dsire.zoo.workers import caller_settings_restored, execute, load_worker


def run_sweep(cfg: DictConfig, workers: int, console: Console | None = None) -> list[dict[str, str]]:
    """Run every unfinished job of the recipe; returns the manifest rows."""
    console = console or Console()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with caller_settings_restored():
        return _run_sweep(cfg, workers, console, out_dir)


def _run_sweep(cfg: DictConfig, workers: int, console: Console, out_dir: Path) -> list[dict[str, str]]:
    container = OmegaConf.to_container(cfg, resolve=True)
    recipe, concepts = load_worker(container)  # pretrains the base once, before any worker starts
    rows = read_manifest(out_dir)
    others = {row["recipe_hash"] for row in rows} - {recipe}
    if others:
        raise UserError(
            "zoo.out_dir",
            f"{out_dir / MANIFEST} lists checkpoints of recipe(s) {sorted(others)}, not of this one "
            f"({recipe}): set zoo.out_dir to a new directory for a changed recipe",
        )
    jobs = plan(cfg, concepts)
    todo = [job for job in jobs if not finished(job, rows, cfg, out_dir)]
    console.print(f"zoo {cfg.name}: {len(jobs)} fine-tunes, {len(jobs) - len(todo)} already done, {len(todo)} to run")
    start = time.perf_counter()
    with Progress(console=console) as progress:
        bar = progress.add_task("fine-tuning", total=len(todo))
        for new_rows in execute(todo, container, workers):
            rows = [r for r in rows if r["path"] not in {n["path"] for n in new_rows}] + new_rows
            write_manifest(out_dir, rows)
            progress.advance(bar)
    _summary(rows, len(todo), time.perf_counter() - start, console)
    return read_manifest(out_dir)


def _summary(rows: list[dict[str, str]], ran: int, seconds: float, console: Console) -> None:
    by_n: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        by_n[int(row["n"])].append(float(row["seconds"]))
    table = Table(title=f"zoo: {len(rows)} checkpoints; this run {ran} fine-tunes in {seconds:.0f} s")
    for column in ("N", "checkpoints", "mean s / fine-tune"):
        table.add_column(column)
    for n in sorted(by_n):
        table.add_row(str(n), str(len(by_n[n])), f"{sum(by_n[n]) / len(by_n[n]):.1f}")
    console.print(table)
