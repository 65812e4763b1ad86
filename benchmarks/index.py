"""Fit and predict time, peak memory and recall versus zoo size, for exact and approximate indices.

    python -m benchmarks.index [--sizes 100 1000 10000 100000] [--voters 16] [--queries 500] [--gpu]

Spectra-level data (no files): each zoo LoRA has `--voters` voters of 32 decreasing "singular values"
that shrink as N^-1/2 with concept and LoRA noise, like real spectra. Every (size, index) runs in a
fresh process, so its peak resident memory is its own. `DSiReModule.fit` (vote indices, size
regression, calibration) is timed with each index; predict times one batch of `--queries` LoRAs.
Recall: the share of queries whose nearest zoo LoRA (per voter) and whose voted N equal the exact
`Flat` index's. Cost grows linearly with voters (a full SD 1.5 model has 384). `--gpu` puts the
Flat and IVF indices on the GPU (FAISS has no GPU HNSW) and writes the section `index_gpu`.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import platform
import resource
import time

import faiss
import numpy as np

from benchmarks.report import command_line, write_section
from dsire.errors import UserError, report_user_errors
from dsire.models.features import Features
from dsire.models.module import DSiReModule


def zoo(size: int, voters: int, seed: int) -> Features:
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 7, size)
    concepts = rng.integers(0, max(2, size // 6), size)
    shape = np.sort(rng.uniform(0.05, 1.0, (voters, 32)), axis=1)[:, ::-1]
    concept_factor = np.exp(0.2 * np.random.default_rng(0).normal(size=(max(2, size // 6), voters, 1)))
    noise = np.exp(0.05 * rng.normal(size=(size, voters, 32)))
    values = shape[None] * n[:, None, None] ** -0.5 * concept_factor[concepts] * noise
    vectors = {f"layer{v}/delta": values[:, v].astype(np.float32) for v in range(voters)}
    return Features(vectors, n, [str(i) for i in range(size)], [f"c{c}" for c in concepts])


def indices(size: int) -> list[tuple[str, str]]:
    """(FAISS factory, search parameters): exact, HNSW, and IVF once there is enough to train it."""
    options = [("Flat", ""), ("HNSW32", "efSearch=64")]
    if size >= 10_000:
        options.append((f"IVF{4 * int(math.sqrt(size))},Flat", "nprobe=16"))
    return options


def run_one(size: int, voters: int, queries: int, factory: str, search: str, gpu: bool, out: mp.Queue) -> None:
    faiss.omp_set_num_threads(1)  # one core for FAISS, as on the CI machine; the other runs the benchmark
    train, test = zoo(size, voters, seed=1), zoo(queries, voters, seed=2)
    start = time.perf_counter()
    module = DSiReModule(index=factory, index_search=search, use_faiss_gpu=gpu).fit(train)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    prediction = module.predict_features(test)
    predict = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    nearest = next(module.knn.neighbours(test.vectors, 1))[1][:, 0]  # voter 0's nearest zoo LoRA
    out.put((fit, predict, peak, prediction.n, nearest))


def measure(size: int, voters: int, queries: int, factory: str, search: str, gpu: bool) -> tuple:
    context = mp.get_context("spawn")
    out = context.Queue()
    process = context.Process(target=run_one, args=(size, voters, queries, factory, search, gpu, out))
    process.start()
    result = out.get()
    process.join()
    return result


@report_user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10_000, 100_000])
    parser.add_argument("--voters", type=int, default=16)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--gpu", action="store_true", help="Flat and IVF indices on the GPU (faiss-gpu)")
    args = parser.parse_args()
    if args.gpu and (not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0):
        raise UserError("--gpu", "this FAISS has no GPU (faiss-cpu, or no CUDA device); install faiss-gpu-cu12")
    rows = []
    for size in args.sizes:
        exact = None
        for factory, search in indices(size):
            if args.gpu and factory.startswith("HNSW"):
                continue
            fit, predict, peak, voted, nearest = measure(size, args.voters, args.queries, factory, search, args.gpu)
            if exact is None:  # the first index is Flat: the reference, no recall of its own
                exact, recall = (voted, nearest), "exact (reference) | exact (reference)"
            else:
                recall = f"{np.mean(nearest == exact[1]):.3f} | {np.mean(voted == exact[0]):.3f}"
            rows.append(
                f"| {size:,} | `{factory}` {search} | {fit:.2f} | {1000 * predict / args.queries:.2f} | {peak:.0f} |"
                f" {recall} |"
            )
            print(rows[-1], flush=True)
    command = command_line()
    table = "\n".join(
        [
            f"## Fit and predict versus zoo size: exact and approximate FAISS indices{' on the GPU' * args.gpu}",
            "",
            f"`{command}` on {platform.machine()}, FAISS {faiss.__version__} with 1 thread,"
            f" {'indices on the GPU' if args.gpu else 'no GPU'}. Spectra-level"
            f" zoos, {args.voters} voters × 32 values; fit = `DSiReModule.fit` (indices, size regression and its"
            f" calibration); predict = one batch of {args.queries} LoRAs. Recall against `Flat` (exact).",
            "",
            "| zoo LoRAs | index | fit s | predict ms / LoRA | peak MiB | 1-NN recall (voter 0) | same voted N |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
            *rows,
        ]
    )
    write_section("index_gpu" if args.gpu else "index", table)


if __name__ == "__main__":
    main()
