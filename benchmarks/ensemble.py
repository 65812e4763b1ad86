"""Shadow-model training throughput: M models at once (`dsire.lab.ensemble`, torch.func + vmap)
against the same M models trained one after another with an ordinary module and torch's SGD.

The baseline is the fastest plain loop: no Lightning, no hooks, batches pre-drawn, the same thread
count. Both train the same models on the same batches (the ensemble = one-by-one test checks the
weights agree). Writes the figures to benchmarks/README.md.

    python -m benchmarks.ensemble [--models 8 32 64] [--steps 100] [--methods lora full] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import torch
import torch.nn.functional as F

from benchmarks.report import command_line, write_section
from dsire.lab.backbones import BackboneSettings, build_backbone
from dsire.lab.data import TaskSettings, load_task
from dsire.lab.ensemble import Ensemble, batch_indices, train_ensemble
from dsire.lab.methods import FinetuneSettings, adapt, lora_inputs, param_groups
from dsire.lab.subsets import half_masks

THREADS = torch.get_num_threads()


def timed(run, backbone, task, masks, settings: FinetuneSettings, repeats: int) -> tuple[float, int]:
    """The best (wall-clock seconds, torch threads) of `repeats` runs on fresh models at each thread count
    up to the machine's: small matrices often run fastest on one thread, and each side gets its best."""
    best = (float("inf"), 0)
    for threads in range(1, THREADS + 1):
        torch.set_num_threads(threads)
        for _ in range(repeats):
            models = [adapt(backbone, settings, s) for s in range(len(masks))]
            start = time.perf_counter()
            run(models, task, masks, settings)
            best = min(best, (time.perf_counter() - start, threads))
    torch.set_num_threads(THREADS)
    return best


def one_by_one(models, task, masks, settings: FinetuneSettings) -> None:
    for seed, (model, mask) in enumerate(zip(models, masks, strict=True)):
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        groups = param_groups(params, lora_inputs({n: p.shape for n, p in model.named_parameters()}), settings)
        optimiser = torch.optim.SGD(groups, momentum=settings.momentum)
        for idx in batch_indices(mask, seed, settings.steps, settings.batch_size):
            loss = F.cross_entropy(model(task.private.take(idx)), task.private.labels[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()


def at_once(models, task, masks, settings: FinetuneSettings) -> None:
    train_ensemble(Ensemble.from_models(models), task.private, masks, list(range(len(models))), settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs (the first also warms up)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    task = load_task(TaskSettings())
    torch.manual_seed(0)
    backbone = build_backbone(BackboneSettings(), task.input_shape, task.classes).requires_grad_(False)
    rows = []
    for method in args.methods:
        settings = FinetuneSettings(method=method, rank=8, steps=args.steps, batch_size=32)
        for count in args.models:
            masks = torch.as_tensor(half_masks(count, len(task.private), seed=0))
            sequential = timed(one_by_one, backbone, task, masks, settings, args.repeats)
            ensemble = timed(at_once, backbone, task, masks, settings, args.repeats)
            rows.append((method, count, *sequential, *ensemble))
            print(f"{method} M={count}: one by one {sequential[0]:.1f} s, at once {ensemble[0]:.1f} s (wall)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    table = "\n".join(
        f"| {m} | {c} | {c / sw:.1f} ({st}) | {c / ew:.1f} ({et}) | **{sw / ew:.1f}×** |"
        for m, c, sw, st, ew, et in rows
    )
    write_section(
        "ensemble",
        f"""
## Shadow-model training: M models at once vs one after another

`{command_line()}` on {platform.processor() or platform.machine()}, each side at its best of 1…{THREADS}
torch threads:
digits MLP 64→128→128→10 pretrained, {args.steps} SGD steps of batch 32 per model, each on half the
{len(task.private)} private examples. One by one: an ordinary module and `torch.optim.SGD` per model (no
Lightning, no hooks). At once: `dsire.lab.ensemble.train_ensemble` (stacked parameters, one `vmap`).
Peak memory of the process: {peak:.0f} MB. Load average when it started: {load:.1f}
(other work on the machine slows these wall-clock figures).

| method | models M | one by one (models/s, threads) | at once (models/s, threads) | speed-up |
| --- | ---: | ---: | ---: | ---: |
{table}
""",
    )


if __name__ == "__main__":
    main()
