"""Cost of the tiny zoo recipe on this machine: seconds per LoRA and per sweep, 1 vs 2 workers.

    python -m benchmarks.zoo [--concepts 2]

Runs the bundled recipe (sizes 1..6) on a few concepts into a temporary directory, once with one
worker process of one thread and once with two, and writes the figures to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from rich.console import Console

from benchmarks.report import command_line, write_section
from dsire.zoo.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]


def recipe(*overrides: str):
    """The tiny recipe's config (the bundled zoo's), with `overrides`."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("zoo_sweep", overrides=[f"paths.root_dir={ROOT}", *overrides]).zoo


def sweep_seconds(concepts: list[str], workers: int) -> tuple[float, float, int]:
    """Wall seconds of a fresh sweep, mean seconds of one fine-tune inside it, and the LoRA count."""
    with tempfile.TemporaryDirectory() as out:
        cfg = recipe(f"zoo.out_dir={out}", f"zoo.data.concepts=[{','.join(concepts)}]")
        start = time.perf_counter()
        rows = run_sweep(cfg, workers=workers, console=Console(quiet=True))
        seconds = time.perf_counter() - start
        return seconds, sum(float(r["seconds"]) for r in rows) / len(rows), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=2)
    args = parser.parse_args()
    cfg = recipe()
    load = os.getloadavg()[0]  # other processes on these cores inflate the figures: say how busy they were
    concepts = [f"m{k}" for k in range(args.concepts)]
    lines = []
    for workers in (1, 2):
        seconds, per_lora, loras = sweep_seconds(concepts, workers)
        lines.append(f"| {workers} × 1 thread | {loras} | {seconds:.1f} | {seconds / loras:.2f} | {per_lora:.2f} |")
    command = command_line()
    text = f"""## Zoo generation: the tiny recipe

`{command}` on {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}. Each sweep
fine-tunes {len(concepts)} concepts × N = {list(cfg.sizes)} ({cfg.train.steps} steps, batch {cfg.train.batch_size},
rank {cfg.lora.rank}); sweep seconds include process start-up and loading the (cached) base. One fine-tune
is timed inside its worker (training and saving). 1-minute load average when it started: {load:.1f}.

| workers | LoRAs | sweep seconds | sweep seconds / LoRA | seconds of one fine-tune |
| --- | ---: | ---: | ---: | ---: |
{chr(10).join(lines)}
"""
    write_section("zoo", text)
    print(text)


if __name__ == "__main__":
    main()
