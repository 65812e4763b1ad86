"""Where a warm featurisation pass spends its time, stage by stage, on SD 1.5-shaped LoRA files.

    python -m benchmarks.featurise_profile [--loras 96] [--dir .cache/bench/sd15]

On the files of `benchmarks.featurise` (rank 32, kohya float16), warm (read once before), each stage
runs alone on one torch thread, in wall seconds (the profiler's operator times are wall times, so run
it on an idle machine):
- reading: `safetensors.load_file` alone, then dsire's bounded reader (checks, canonical names);
- spectra: `batch_spectra`'s Grams (float64 conversion and NumPy's products, layer by layer), its
  r×r problems split by `torch.profiler` into operators (products, Cholesky, eigendecompositions),
  and the Python around them;
- feature vectors (`FeatureSpec.vectors` of every part) and spectra cache writes.
Then the whole pass as `train.py` runs it (`benchmarks.featurise`'s `dsire_featurise`), in wall
seconds, with one and with all torch threads. The table goes to benchmarks/README.md
(section `featurise_profile`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.profiler import ProfilerActivity, profile

from benchmarks.featurise import dsire_featurise
from benchmarks.report import command_line, write_section
from benchmarks.synthetic import write_zoo
from dsire.data.cache import SpectraCache
from dsire.data.sources import from_manifest
from dsire.models.features import ALL
from dsire.spectra import _chunks, _grams_in_turn, batch_spectra, gram_spectra

OPERATORS = {  # profiler operator name -> stage of the r×r problems
    "aten::matmul": "r×r products (Fᵀ G_up F)",
    "aten::linalg_cholesky_ex": "Cholesky factors",
    "aten::linalg_eigvalsh": "eigendecompositions (3 r×r per layer)",
    "aten::linalg_eigh": "eigendecompositions (3 r×r per layer)",
}


def seconds_of(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def spectra_stages(loras: list) -> dict[str, float]:
    """`batch_spectra`'s work chunk by chunk, as it runs it: the Grams (conversion into a buffer and
    products, one layer at a time), then the r×r problems, split by `torch.profiler` into operators
    and the Python around them."""
    stages: dict[str, float] = defaultdict(float)
    for chunk in _chunks(loras):
        layers = [loras[i].layers[name] for i, name in chunk]
        seconds, (gram_up, gram_down) = seconds_of(partial(_grams_in_turn, layers, torch.device("cpu"), torch.float64))
        stages["float64 conversion and Gram products (NumPy's `syrk`)"] += seconds
        scale = torch.tensor([layer.scale for layer in layers], dtype=torch.float64)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            seconds, _ = seconds_of(partial(gram_spectra, gram_up, gram_down, layers[0].shape, scale))
        operators = 0.0
        for event in prof.events():
            if event.cpu_parent is None:  # top-level calls only: nested ones are inside their parent's time
                stages[OPERATORS.get(event.name, "other operators")] += event.cpu_time_total / 1e6
                operators += event.cpu_time_total / 1e6
        stages["Python around the r×r operators (and the profiler)"] += seconds - operators
    return {f"spectra: {stage}": seconds for stage, seconds in stages.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loras", type=int, default=96)
    parser.add_argument("--dir", type=Path, default=Path(".cache/bench/sd15"))
    args = parser.parse_args()
    files = write_zoo(args.dir, args.loras)
    entries = from_manifest(args.dir / "manifest.csv")[: args.loras]
    threads = torch.get_num_threads()
    dsire_featurise(files, args.dir)  # warm: files in the page cache, first-call costs paid

    torch.set_num_threads(1)
    rows: list[tuple[str, float]] = []
    seconds, _ = seconds_of(lambda: [load_file(str(p)) for p in files])
    rows.append(("read: `safetensors.load_file` alone", seconds))
    seconds, loras = seconds_of(lambda: [e.load() for e in entries])
    rows.append(("read: dsire's bounded reader (checks, canonical names)", seconds))
    batch_spectra(loras[:2])
    rows += list(spectra_stages(loras).items())
    spectra = batch_spectra(loras)
    seconds, _ = seconds_of(lambda: [ALL.vectors(s) for s in spectra])
    rows.append(("feature vectors (every part)", seconds))
    with tempfile.TemporaryDirectory() as root:
        cache = SpectraCache(root, {"dtype": "float32"})
        shapes = [{name: layer.shape for name, layer in lora.layers.items()} for lora in loras]
        items = list(zip(entries, spectra, shapes, strict=True))
        seconds, _ = seconds_of(lambda: [cache.put(*item) for item in items])
    rows.append(("spectra cache writes (not in a pass without `cache_dir`)", seconds))

    passes = []
    for count in sorted({1, threads}):
        torch.set_num_threads(count)
        start = time.perf_counter()
        dsire_featurise(files, args.dir)
        passes.append((count, time.perf_counter() - start))
    torch.set_num_threads(threads)

    stages = sum(s for name, s in rows if "cache" not in name and "alone" not in name)
    lines = [
        "## Featurisation profile: where a warm pass spends its time",
        "",
        f"`{command_line()}` on {os.cpu_count()} CPU cores, torch {torch.__version__}; {len(files)} synthetic"
        " SD 1.5 LoRAs (128 layers, rank 32, kohya float16), warm. Each stage alone on one torch thread, wall"
        " seconds (the r×r problems split by `torch.profiler`'s top-level operators).",
        "",
        "| stage | seconds | ms per LoRA | share of the stages |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {s:.2f} | {1e3 * s / len(files):.1f} | {s / stages:.0%} |" for name, s in rows),
        f"| **sum of the stages of a pass** (without `load_file` alone and cache writes) | {stages:.2f}"
        f" | {1e3 * stages / len(files):.1f} | 100% |",
        "",
        "The whole pass as `train.py` runs it (read ahead in a thread, spectra, vectors; wall seconds):",
        "",
        "| torch threads | seconds | LoRAs/s |",
        "| ---: | ---: | ---: |",
        *(f"| {count} | {s:.2f} | {len(files) / s:.1f} |" for count, s in passes),
    ]
    table = "\n".join(lines)
    print(table)
    write_section("featurise_profile", table)


if __name__ == "__main__":
    main()
