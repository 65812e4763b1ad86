"""`train.py` end to end on a 1,000-LoRA SD 1.5 zoo: cold (reads weights), warm (spectra cache), DDP.

    python -m benchmarks.train_e2e [--loras 1000] [--dir .cache/bench/sd15]

Runs `train.py` as a user would, on synthetic SD 1.5 kohya files (`benchmarks.synthetic`, 12.8 MB
each): cold with an empty spectra cache and the files evicted from the page cache, then warm with
the filled cache, then cold again with `trainer=ddp` (2 processes). A smaller zoo (a quarter) is run
cold too: the peak resident memory of `train.py` stays flat while the zoo's bytes grow, because
weights are streamed in batches and never all held. Figures go to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.featurise import evict
from benchmarks.report import command_line, write_section
from benchmarks.synthetic import write_zoo
from dsire.atomic import atomic_write_csv

ROOT = Path(__file__).resolve().parents[1]


def train(manifest: Path, cache: Path, run_dir: Path, *overrides: str) -> tuple[float, float, str]:
    """Wall seconds, peak resident MiB (the largest process), and the spectra line of one train.py run."""
    command = [sys.executable, str(ROOT / "train.py"), f"data.source.path={manifest}", f"paths.cache_dir={cache}"]
    command += [f"hydra.run.dir={run_dir}", "logger=csv", *overrides]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(output[-3000:])
    return seconds, usage.ru_maxrss / 1024, re.search(r"spectra: .*", output).group(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loras", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=Path(".cache/bench/sd15"))
    args = parser.parse_args()
    files = write_zoo(args.dir, args.loras)
    gigabytes = sum(p.stat().st_size for p in files) / 1e9
    work = args.dir.parent / "e2e"
    shutil.rmtree(work, ignore_errors=True)
    quarter = work / "quarter.csv"
    with (args.dir / "manifest.csv").open(newline="") as f:
        entries = list(csv.DictReader(f))
    quarter_rows = [row | {"path": str(args.dir.resolve() / row["path"])} for row in entries[: len(entries) // 4]]
    atomic_write_csv(quarter, ("path", "n", "concept"), quarter_rows)
    rows = []
    for name, manifest, cache, overrides, cold in [
        (f"cold, {args.loras // 4} LoRAs", quarter, work / "cache_quarter", (), True),
        (f"cold, {args.loras} LoRAs", args.dir / "manifest.csv", work / "cache", (), True),
        (f"warm, {args.loras} LoRAs", args.dir / "manifest.csv", work / "cache", (), False),
        (
            f"cold, {args.loras} LoRAs, trainer=ddp (2 processes)",
            args.dir / "manifest.csv",
            work / "cache_ddp",
            ("trainer=ddp", "trainer.devices=2"),
            True,
        ),
    ]:
        if cold:
            evict(files)
        seconds, peak, spectra = train(manifest, cache, work / re.sub(r"\W+", "_", name), *overrides)
        rows.append(f"| {name} | {seconds:.0f} | {peak:.0f} | {spectra} |")
        print(rows[-1], flush=True)
    command = command_line()
    table = "\n".join(
        [
            "## `train.py` end to end on a 1,000-LoRA zoo: cold, warm, DDP; memory while streaming",
            "",
            f"`{command}` on {platform.machine()}, {os.cpu_count()} CPU cores, no GPU. Synthetic SD 1.5 LoRAs"
            f" (rank 32, kohya float16): {args.loras} files, {gigabytes:.1f} GB. Each run is the whole job:"
            " featurise, 5 concept-grouped splits, fit with calibration, save. Peak memory: the largest"
            " process's resident set.",
            "",
            "| run | seconds | peak MiB | spectra |",
            "| --- | ---: | ---: | --- |",
            *rows,
        ]
    )
    write_section("train_e2e", table)


if __name__ == "__main__":
    main()
