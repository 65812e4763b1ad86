"""A sweep: every (concept, N, replicate) fine-tune of a recipe, sharded over processes, resumable.

Each finished checkpoint is written atomically and then recorded in `manifest.csv` (also written
atomically), so a killed sweep leaves only complete files and a manifest that lists them; the
next run skips every job whose snapshots are all recorded and present. A zoo directory holds one
recipe: resuming with a changed recipe is refused rather than mixing two recipes in one zoo.
"""

from __future__ import annotations

import csv
import ctypes
import logging
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dsire.atomic import atomic_write_csv
from dsire.errors import UserError
from dsire.lora.save import save_lora
from dsire.zoo.finetune import finetune, lora_config
from dsire.zoo.pretrain import config_hash
from dsire.zoo.recipes import load_base, load_concepts
from dsire.zoo.seeds import model_seed

MANIFEST = "manifest.csv"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
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
# Where things are and which jobs a sweep plans are not part of the recipe: a LoRA trained from the same
# base (fingerprinted separately), data, LoRA and training settings has the same recipe hash on any machine.
NOT_RECIPE = {"name", "out_dir", "sizes", "replicates", "base.path", "data.root", "data.concepts", "data.count"}


@dataclass(frozen=True)
class Job:
    concept: str
    n: int
    replicate: int
    seed: int

    def filename(self, step: int, fmt: str) -> str:
        suffix = "" if fmt == "peft" else ".safetensors"
        return f"{self.concept}_n{self.n}_r{self.replicate}_step{step}{suffix}"


def recipe_hash(cfg: DictConfig) -> str:
    """Hash of how each LoRA is trained, independent of paths and of the sweep's plan."""
    recipe = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_RECIPE:
        *parents, leaf = key.split(".")
        node = recipe
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return config_hash(OmegaConf.create(recipe))


def plan(cfg: DictConfig, concepts: list[str]) -> list[Job]:
    """All jobs, ordered by concept then N; seeds come from the policy, which never sees N."""
    return [
        Job(concept, n, rep, model_seed(cfg.seeds.policy, cfg.seeds.zoo_seed))
        for concept in concepts
        for n in cfg.sizes
        for rep in range(cfg.replicates)
    ]


def read_manifest(out_dir: Path) -> list[dict[str, str]]:
    path = out_dir / MANIFEST
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_manifest(out_dir: Path, rows: list[dict]) -> None:
    order = sorted(rows, key=lambda r: (r["concept"], int(r["n"]), int(r["replicate"]), int(r["step"])))
    atomic_write_csv(out_dir / MANIFEST, COLUMNS, order)


def finished(job: Job, rows: list[dict[str, str]], cfg: DictConfig, out_dir: Path) -> bool:
    recorded = {row["path"] for row in rows}
    names = [job.filename(step, cfg.format) for step in cfg.train.snapshot_steps]
    return all(name in recorded and (out_dir / name).exists() for name in names)


# Worker state: each process loads the base and the concepts once.
_STATE: dict = {}


def _init_worker(cfg_container: dict, threads: int) -> None:
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    cfg = OmegaConf.create(cfg_container)
    _STATE.update(cfg=cfg, base=load_base(cfg), concepts=load_concepts(cfg), recipe=recipe_hash(cfg))


def _init_pool_worker(cfg_container: dict, sweep_pid: int) -> None:
    """A pool worker: one thread, and it dies with the sweep (even a kill -9 of it) instead of running on
    orphaned and writing checkpoints no manifest will list."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != sweep_pid:  # the sweep died before prctl took effect
            os._exit(1)
    _init_worker(cfg_container, threads=1)


def run_job(job: Job) -> list[dict]:
    """Fine-tune one job and save its snapshots; returns their manifest rows."""
    cfg, base = _STATE["cfg"], _STATE["base"]
    images, token_ids = _STATE["concepts"][job.concept]
    out_dir = Path(cfg.out_dir)
    config = lora_config(cfg.lora).to_dict()
    rows, start = [], time.perf_counter()

    def save(step: int, state: dict[str, torch.Tensor]) -> None:
        name = job.filename(step, cfg.format)
        row = {
            "path": name,
            "n": job.n,
            "concept": job.concept,
            "replicate": job.replicate,
            "seed": job.seed,
            "step": step,
            "rank": cfg.lora.rank,
            "alpha": cfg.lora.alpha,
            "format": cfg.format,
            "recipe_hash": _STATE["recipe"],
            "base_fingerprint": base.fingerprint,
            "seconds": f"{time.perf_counter() - start:.2f}",
        }
        metadata = {f"dsire_{k}": str(v) for k, v in row.items() if k not in ("path", "seconds")}
        save_lora(state, out_dir / name, cfg.format, config, metadata=metadata, dtype=getattr(torch, cfg.dtype))
        rows.append(row)

    finetune(base, images[: job.n], token_ids[: job.n], cfg, job.seed, save)
    return rows


def run_sweep(cfg: DictConfig, workers: int, console: Console | None = None) -> list[dict[str, str]]:
    """Run every unfinished job of the recipe; returns the manifest rows."""
    console = console or Console()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _caller_settings_restored():
        return _run_sweep(cfg, workers, console, out_dir)


@contextmanager
def _caller_settings_restored() -> Iterator[None]:
    """The sweep runs its in-process jobs with one torch thread and quiet Lightning; the caller (a test,
    a notebook, a benchmark) gets its own thread count and log level back afterwards."""
    threads, lightning_log = torch.get_num_threads(), logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        lightning_log.setLevel(level)


def _run_sweep(cfg: DictConfig, workers: int, console: Console, out_dir: Path) -> list[dict[str, str]]:
    container = OmegaConf.to_container(cfg, resolve=True)
    # One thread everywhere (also for in-process jobs and the base's pretraining): a checkpoint is then
    # bitwise the same whatever the worker count, and workers do not oversubscribe the cores.
    _init_worker(container, threads=1)  # pretrains the base once, before any worker starts
    rows = read_manifest(out_dir)
    others = {row["recipe_hash"] for row in rows} - {_STATE["recipe"]}
    if others:
        raise UserError(
            "zoo.out_dir",
            f"{out_dir / MANIFEST} lists checkpoints of recipe(s) {sorted(others)}, not of this one "
            f"({_STATE['recipe']}): set zoo.out_dir to a new directory for a changed recipe",
        )
    jobs = plan(cfg, list(_STATE["concepts"]))
    todo = [job for job in jobs if not finished(job, rows, cfg, out_dir)]
    console.print(f"zoo {cfg.name}: {len(jobs)} fine-tunes, {len(jobs) - len(todo)} already done, {len(todo)} to run")
    start = time.perf_counter()
    with Progress(console=console) as progress:
        bar = progress.add_task("fine-tuning", total=len(todo))
        for new_rows in _execute(todo, container, workers):
            rows = [r for r in rows if r["path"] not in {n["path"] for n in new_rows}] + new_rows
            write_manifest(out_dir, rows)
            progress.advance(bar)
    _summary(rows, len(todo), time.perf_counter() - start, console)
    return read_manifest(out_dir)


def _execute(jobs: list[Job], container: dict, workers: int):
    """Yield each job's rows as it finishes: in this process for one worker, else in a process pool."""
    if workers <= 1:
        for job in jobs:
            yield run_job(job)
        return
    context = get_context("spawn")  # fresh interpreters: no forked torch thread pools
    initargs = (container, os.getpid())
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_pool_worker, initargs=initargs) as pool:
        for future in as_completed([pool.submit(run_job, job) for job in jobs]):
            yield future.result()


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
