"""Attribution cost on the digits MLP: factor fitting, scoring, Source against the EK-FAC influence
function, memory of factors and gradients, and LDS retraining throughput. Writes benchmarks/README.md.

    python -m benchmarks.attribution [--examples 539] [--queries 50] [--segments 3] [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import command_line, write_section
from dsire.attribution.curvature import fit_factors, layer_gradients, negative_margin, tracked_modules
from dsire.attribution.lds import measured_outputs, subset_masks
from dsire.attribution.scores import attribute
from dsire.attribution.trajectory import checkpoint_plan, model_at, train_trajectory
from dsire.lab.backbones import BackboneSettings, build_backbone
from dsire.lab.data import TaskSettings, load_task
from dsire.lab.methods import FinetuneSettings, adapt


def seconds(run) -> tuple[float, object]:
    start = time.perf_counter()
    value = run()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=539)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--segments", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--models", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    task = load_task(TaskSettings(private_limit=args.examples))
    backbone = build_backbone(BackboneSettings(), task.input_shape, task.classes).requires_grad_(False)
    settings = FinetuneSettings(method="full", steps=args.steps, lr=0.05)
    template = adapt(backbone, settings, 0)
    train, queries = task.private, task.test.subset(np.arange(args.queries))
    plan = checkpoint_plan(settings.steps, args.segments, 2)
    train_s, trajectory = seconds(lambda: train_trajectory(template, train, settings, 0, plan, "bench"))
    final = model_at(template, trajectory.final)
    modules = tracked_modules(final)
    fit_s, (factors, _) = seconds(lambda: fit_factors([final], train, modules, 0))
    grads_s, grads = seconds(lambda: layer_gradients(final, train, modules))
    query_s, _ = seconds(lambda: layer_gradients(final, queries, modules, loss=negative_margin))
    source_s, _ = seconds(lambda: attribute(template, trajectory, train, queries, ("source",), None, 0))
    influence_s, _ = seconds(lambda: attribute(template, trajectory, train, queries, ("influence",), None, 0))
    factor_bytes = sum(
        t.numel() * 4 for f in factors.values() for t in (f.activation_basis, f.gradient_basis, f.eigenvalues)
    )
    gradient_bytes = sum(g.numel() * 4 for g in grads.values())
    masks = subset_masks(args.models, len(train), 0.5, 0)
    build = lambda seed: adapt(backbone, settings, seed)  # noqa: E731
    with tempfile.TemporaryDirectory() as scratch:
        retrain_s, _ = seconds(
            lambda: measured_outputs(build, train, queries, settings, masks, 1, args.models, Path(scratch))
        )
    n, q = len(train), len(queries)
    rows = [
        ("train the attributed run with checkpoints", train_s, f"{args.steps} steps, {2 * args.segments} checkpoints"),
        ("EK-FAC factors at one checkpoint (kronfluence)", fit_s, f"{n} examples"),
        ("per-example training gradients at one checkpoint", grads_s, f"{1e6 * grads_s / n:.0f} µs per example"),
        ("query measurement gradients", query_s, f"{1e3 * query_s / q:.1f} ms per query"),
        (f"Source, L = {args.segments}, all of it", source_s, f"{1e6 * source_s / (n * q):.1f} µs per pair"),
        ("EK-FAC influence function, all of it", influence_s, f"{1e6 * influence_s / (n * q):.1f} µs per pair"),
        (f"LDS retraining, {args.models} models at once", retrain_s, f"{args.models / retrain_s:.1f} models/s"),
    ]
    table = "\n".join(f"| {name} | {s:.2f} | {note} |" for name, s, note in rows)
    markdown = f"""## Attribution: Source vs the EK-FAC influence function

`{command_line()}` on {platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s),
torch {torch.__version__}; 1-minute load average when it started: {os.getloadavg()[0]:.1f}. Digits MLP
(64 → 128 → 128 → 10, every layer tracked: {sum(g[0].numel() for g in grads.values())} parameters), {n}
training examples, {q} queries, full fine-tune.

| step | seconds | per unit |
| --- | ---: | --- |
{table}

Source / influence function: **{source_s / influence_s:.1f}×** the time (L = {args.segments} factor fits
and 2L checkpoints' gradients against one of each). Memory: EK-FAC factors {factor_bytes / 1e6:.2f} MB per
checkpoint (float32 equivalent; L times that for Source), per-example gradients {gradient_bytes / 1e6:.1f} MB
per checkpoint (Source keeps one segment mean per segment: L times that).
"""
    write_section("attribution", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
