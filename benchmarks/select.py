"""Cost of model selection: `DSiReModule.fit` with `model/select=auto` against the fixed configuration.

    python -m benchmarks.select [--sizes 10000] [--layers 16]

Both fits start from features already computed (selection never reads weights): the bundled zoo's
(spectra of its 180 LoRAs), and spectra-level synthetic zoos of `--sizes` LoRAs with `--layers`
layers of rank 32 (σ(ΔW), σ(down), σ(up) shrinking as N^-1/2 with concept and LoRA noise). The fixed
fit is the paper's voters (indices, size regression, calibration); the `auto` fit adds the inner
concept CV over the grid of configs/model/select/auto.yaml and then fits the chosen configuration.
Times are CPU seconds of this process (a shared machine's wall clock says little); run it with one
thread (OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1) for numbers comparable across machines.
"""

from __future__ import annotations

import argparse
import platform
import time

import faiss
import numpy as np
from omegaconf import OmegaConf

from benchmarks.report import command_line, write_section
from dsire.featurise import zoo_features
from dsire.models.features import Features, FeatureSpec
from dsire.models.module import DSiReModule
from dsire.project import ROOT

GRID = ROOT / "configs" / "model" / "select" / "auto.yaml"


def bundled() -> Features:
    return zoo_features({"kind": "manifest", "path": str(ROOT / "data" / "zoo")})


def synthetic(size: int, layers: int, seed: int = 0) -> Features:
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 7, size)
    concepts = rng.integers(0, max(2, size // 6), size)
    vectors = {}
    for layer in range(layers):
        for part in ("delta", "down", "up"):
            shape = np.sort(rng.uniform(0.05, 1.0, 32))[::-1]
            concept_factor = np.exp(0.2 * rng.normal(size=max(2, size // 6)))[concepts, None]
            values = shape * n[:, None] ** -0.5 * concept_factor * np.exp(0.05 * rng.normal(size=(size, 32)))
            vectors[f"layer{layer}/{part}"] = values.astype(np.float32)
        norms = [np.linalg.norm(vectors[f"layer{layer}/{p}"], axis=1) for p in ("delta", "down", "up")]
        vectors[f"layer{layer}/norms"] = np.stack(norms, axis=1).astype(np.float32)
    return Features(vectors, n, [str(i) for i in range(size)], [f"c{c}" for c in concepts])


def timed(features: Features, select: dict | None) -> tuple[float, DSiReModule]:
    """CPU seconds of one fit, and the fitted module."""
    start = time.process_time()
    module = DSiReModule(use_faiss_gpu=False, select=select)
    if select is None:  # the fixed model featurises the paper's voters only
        features = Features(FeatureSpec().derive(features.vectors), features.n, features.keys, features.concepts)
    module.fit(features)
    return time.process_time() - start, module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000])
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    grid = OmegaConf.to_container(OmegaConf.load(GRID))
    zoos = [("bundled zoo (96 layers)", bundled())]
    zoos += [(f"synthetic, {args.layers} layers", synthetic(size, args.layers)) for size in args.sizes]
    rows = []
    for name, features in zoos:
        fixed, _ = timed(features, None)
        auto, module = timed(features, grid)
        report = module.selection.report()
        chosen = ", ".join(f"{k}={v}" for k, v in report["chosen"].items())
        rows.append(
            f"| {name} | {len(features.keys):,} | {fixed:.2f} | {auto:.2f} | {auto / fixed:.1f}× |"
            f" {report['candidates']} | {chosen} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            "## Model selection: fit time with `model/select=auto` against the fixed configuration",
            "",
            f"`OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 {command_line()}` on {platform.machine()}, FAISS"
            f" {faiss.__version__} with 1 thread, no GPU; CPU seconds. Both fits start"
            " from computed features; auto = inner 3-fold concept CV over the grid of"
            " configs/model/select/auto.yaml (at most `points` = 1000 LoRAs, whole concepts) + the fit of"
            " the chosen configuration.",
            "",
            "| zoo | LoRAs | fixed fit s | auto fit s | ratio | candidates | chosen |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
            *rows,
        ]
    )
    write_section("select", table)


if __name__ == "__main__":
    main()
