"""The processes that run a sweep's jobs: each loads the base and the concepts once, trains one
fine-tune per job with one torch thread and saves its snapshots; a pool worker dies with the sweep."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dsire.lora.save import save_lora
from dsire.zoo.finetune import finetune, lora_config
from dsire.zoo.plan import Job, recipe_hash
from dsire.zoo.recipes import load_base, load_concepts

PR_SET_PDEATHSIG = 1  # linux/prctl.h

# Worker state: each process loads the base and the concepts once.
_STATE: dict = {}


def load_worker(cfg_container: dict) -> tuple[str, list[str]]:
    """Make this process a worker of the recipe (one torch thread, quiet Lightning, base and concepts
    loaded, the base pretrained if not cached); returns the recipe's hash and its concepts."""
    torch.set_num_threads(1)  # a checkpoint is bitwise the same whatever the worker count
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    cfg = OmegaConf.create(cfg_container)
    _STATE.update(cfg=cfg, base=load_base(cfg), concepts=load_concepts(cfg), recipe=recipe_hash(cfg))
    return _STATE["recipe"], list(_STATE["concepts"])


def _init_pool_worker(cfg_container: dict, sweep_pid: int) -> None:
    """A pool worker: one thread, and it dies with the sweep (even a kill -9 of it) instead of running on
    orphaned and writing checkpoints no manifest will list."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != sweep_pid:  # the sweep died before prctl took effect
            os._exit(1)
    load_worker(cfg_container)


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


@contextmanager
def caller_settings_restored() -> Iterator[None]:
    """The sweep runs its in-process jobs with one torch thread and quiet Lightning; the caller (a test,
    a notebook, a benchmark) gets its own thread count and log level back afterwards."""
    threads, lightning_log = torch.get_num_threads(), logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        lightning_log.setLevel(level)


def execute(jobs: list[Job], container: dict, workers: int) -> Iterator[list[dict]]:
    """Yield each job's rows as it finishes: in this process (made a worker by `load_worker`) for one
    worker, else in a process pool."""
    if workers <= 1:
        for job in jobs:
            yield run_job(job)
        return
    context = get_context("spawn")  # fresh interpreters: no forked torch thread pools
    initargs = (container, os.getpid())
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_pool_worker, initargs=initargs) as pool:
        for future in as_completed([pool.submit(run_job, job) for job in jobs]):
            yield future.result()
