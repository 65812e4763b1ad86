"""Featurisation throughput on SD 1.5-shaped LoRA files, side by side with raw reads and the paper's way.

    python -m benchmarks.featurise [--loras 96] [--paper-loras 12] [--dir .cache/bench/sd15] [--gpu] [--load T]

On the same kohya files (rank 32, float16, `benchmarks.synthetic`), one run measures:
- read: `safetensors` load of every tensor plus a sum (bytes off the disk, no math): the ceiling;
- dsire: what `train.py` does without a spectra cache: `LoRAZooDataModule` batches, the bounded
  reader with its checks and canonical names, batched Gram-matrix spectra in `DSiReModule.predict_step`,
  with the default exact precision and with `spectra_precision=fast`;
- paper: `load_lora`, then `torch.svd_lowrank` of A, B and the dense ΔW of each layer (the paper's code).
Each is timed cold (the files evicted from the page cache first, with `posix_fadvise`) and, for
read and dsire, warm (straight after). With `--gpu`, dsire also runs with `trainer.accelerator=gpu`
beside the CPU pass. With `--load T`, another CPU-bound process runs T threads throughout, so that
the slowdown of dsire and of the paper's way under a busy machine can be compared. Figures go to
benchmarks/README.md (section `featurise`, `featurise_loadT` or `featurise_gpu`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import load_file

from benchmarks.report import command_line, write_section
from benchmarks.spectra import reference_spectra
from benchmarks.synthetic import write_zoo
from dsire.data.datamodule import LoRAZooDataModule
from dsire.errors import UserError, report_user_errors
from dsire.lora import load_lora
from dsire.models.module import DSiReModule


def evict(files: list[Path]) -> None:
    """Drop the files from the page cache so the next read comes from the disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_and_sum(files: list[Path], directory: Path) -> None:
    for path in files:
        sum(float(t.float().sum()) for t in load_file(str(path)).values())


def dsire_featurise(files: list[Path], directory: Path, accelerator: str = "cpu", precision: str = "exact") -> None:
    split = {"protocol": "kfold", "folds": 2, "n_train": 1, "repeats": 1, "seed": 0}
    datamodule = LoRAZooDataModule({"kind": "manifest", "path": str(directory)}, split)
    datamodule.setup()
    datamodule.entries = datamodule.entries[: len(files)]
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    features = trainer.predict(DSiReModule(spectra_precision=precision), datamodule.predict_dataloader())
    assert sum(len(f.keys) for f in features) == len(files)


def paper(files: list[Path], directory: Path) -> None:
    for path in files:
        reference_spectra(load_lora(path))


def timed(fn: Callable, files: list[Path], directory: Path, cold: bool) -> float:
    if cold:
        evict(files)
    start = time.perf_counter()
    fn(files, directory)
    return time.perf_counter() - start


BUSY = "import torch; torch.set_num_threads({threads}); a = torch.randn(512, 512)\nwhile True: a @ a"


@contextlib.contextmanager
def competing_load(threads: int) -> Iterator[None]:
    """Another CPU-bound process (a matrix product loop on `threads` threads) for the duration."""
    if threads == 0:
        yield
        return
    busy = subprocess.Popen([sys.executable, "-c", BUSY.format(threads=threads)])
    try:
        time.sleep(2)  # its start-up out of the way
        yield
    finally:
        busy.kill()
        busy.wait()


@report_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loras", type=int, default=96)
    parser.add_argument("--paper-loras", type=int, default=12)
    parser.add_argument("--dir", type=Path, default=Path(".cache/bench/sd15"))
    parser.add_argument("--gpu", action="store_true", help="also featurise on CUDA (trainer.accelerator=gpu)")
    parser.add_argument("--load", type=int, default=0, help="threads of a competing CPU-bound process (0: none)")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        raise UserError("--gpu", "this machine has no CUDA device (torch.cuda.is_available() is False)")
    files = write_zoo(args.dir, args.loras)
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    subset = files[: args.paper_loras]
    subset_mb = sum(p.stat().st_size for p in subset) / 1e6
    passes = {
        "dsire featurisation": dsire_featurise,
        "dsire featurisation, `model.spectra_precision=fast`": functools.partial(dsire_featurise, precision="fast"),
    }
    if args.gpu:
        passes["dsire featurisation on CUDA"] = functools.partial(dsire_featurise, accelerator="gpu")
    for featurise in passes.values():
        featurise(files[:2], args.dir)  # imports and first-call costs out of the way

    with competing_load(args.load):
        runs = [  # name, files, megabytes, seconds
            ("read + sum", files, megabytes, timed(read_and_sum, files, args.dir, cold=True)),
            *((name, files, megabytes, timed(fn, files, args.dir, cold=True)) for name, fn in passes.items()),
            ("paper: svd_lowrank of A, B, dense ΔW", subset, subset_mb, timed(paper, subset, args.dir, cold=True)),
            ("read + sum (warm)", files, megabytes, timed(read_and_sum, files, args.dir, cold=False)),
            *(
                (f"{name} (warm)", files, megabytes, timed(fn, files, args.dir, cold=False))
                for name, fn in passes.items()
            ),
        ]
    rate = {name: (len(f) / s, mb / s) for name, f, mb, s in runs}
    read, warm_read, theirs = rate["read + sum"], rate["read + sum (warm)"], rate[runs[len(passes) + 1][0]]
    device = f"GPU {torch.cuda.get_device_name()}" if args.gpu else "no GPU"
    load = f" A competing CPU-bound process ran {args.load} thread(s) throughout." if args.load else ""
    lines = [
        "## Featurisation throughput: dsire vs raw reads vs the paper"
        + (" (CPU and CUDA)" if args.gpu else "")
        + (f", under a competing {args.load}-thread load" if args.load else ""),
        "",
        f"`{command_line()}` on {platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch"
        f" threads, torch {torch.__version__}, {device}. {len(files)} synthetic SD 1.5 LoRAs (128 attention layers,"
        f" rank 32, kohya float16, {megabytes / len(files):.1f} MB each); the paper's way on the first {len(subset)}."
        f" Cold: files evicted from the page cache before the pass.{load}",
        "",
        "| pass (cold unless marked) | LoRAs | seconds | LoRAs/s | MB/s |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {n} | {len(f)} | {s:.1f} | {rate[n][0]:.1f} | {rate[n][1]:.0f} |" for n, f, _, s in runs),
        "",
    ]
    for name in passes:
        if "CUDA" not in name:
            cold, warm = rate[name], rate[f"{name} (warm)"]
            lines.append(
                f"- {name} / raw read: **{cold[1] / read[1]:.0%}** cold (goal ≥ 90%), **{warm[1] / warm_read[1]:.0%}**"
                f" warm (goal ≥ 50%); / paper: **{cold[0] / theirs[0]:.1f}×**."
            )
    if args.gpu:
        cuda = rate["dsire featurisation on CUDA (warm)"][0] / rate["dsire featurisation (warm)"][0]
        lines.append(f"- CUDA / CPU, warm: **{cuda:.1f}×**.")
    table = "\n".join(lines)
    print(table)
    write_section("featurise_gpu" if args.gpu else f"featurise_load{args.load}" if args.load else "featurise", table)


if __name__ == "__main__":
    main()
