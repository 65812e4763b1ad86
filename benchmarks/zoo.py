"""Cost of the tiny zoo recipe on this machine: seconds per LoRA and per sweep, 1 vs 2 workers.

    python -m benchmarks.zoo [--concepts 2]

Runs the bundled recipe (sizes 1..6) on a few concepts into a temporary directory, once with one
worker process of one thread and once with two, and writes the figures to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from rich.console import Console

from benchmarks.report import write_section
from dsire.zoo.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]


def sweep_seconds(concepts: list[str], workers: int) -> tuple[float, int]:
    os.environ["DSIRE_ROOT"] = str(ROOT)
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("zoo_sweep", overrides=[f"zoo.out_dir={out}", f"zoo.data.concepts=[{','.join(concepts)}]"])
        torch.set_num_threads(1)
        start = time.perf_counter()
        rows = run_sweep(cfg.zoo, workers=workers, console=Console(quiet=True))
        return time.perf_counter() - start, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=2)
    args = parser.parse_args()
    concepts = [f"d{d}p0" for d in range(args.concepts)]
    lines = []
    for workers in (1, 2):
        seconds, loras = sweep_seconds(concepts, workers)
        lines.append(f"| {workers} × 1 thread | {loras} | {seconds:.1f} | {seconds / loras:.2f} |")
    command = " ".join(["python -m benchmarks.zoo", *sys.argv[1:]])
    text = f"""## Zoo generation: the tiny recipe

`{command}` on {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}. Each sweep
fine-tunes {len(concepts)} concepts × N = 1..6 (200 steps, batch 4, rank 8), base loading included.

| workers | LoRAs | sweep seconds | seconds per LoRA |
| --- | ---: | ---: | ---: |
{chr(10).join(lines)}
"""
    write_section("zoo", text)
    print(text)


if __name__ == "__main__":
    main()
