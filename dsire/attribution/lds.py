"""The linear datamodeling score: how well summed attributions rank the outputs of retrained models.

M random subsets holding a fraction α of the training examples; R models (seeds) trained on each with
the lab's ensemble trainer; each query's measured output is its margin, averaged over the R seeds. Per
query, LDS is the Spearman correlation over subsets between the measured output and the sum of the
subset's attributions; the reported score is the mean over queries with a percentile-bootstrap 95%
interval over queries. Retraining is cached in chunks of one ensemble each, so a killed run resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.stats import rankdata
from torch import nn

from dsire.atomic import atomic_path
from dsire.lab.data import Examples
from dsire.lab.ensemble import train
from dsire.lab.margins import margin
from dsire.lab.methods import FinetuneSettings
from dsire.lora.files import read_safetensors
from dsire.lora.model import LoRAError


def subset_masks(subsets: int, examples: int, alpha: float, seed: int) -> np.ndarray:
    """[subsets, examples] bool, each row exactly round(α·examples) seeded members."""
    rng = np.random.default_rng(seed)
    size = round(alpha * examples)
    masks = np.zeros((subsets, examples), dtype=bool)
    for row in masks:
        row[rng.choice(examples, size, replace=False)] = True
    return masks


def measured_outputs(
    build: Callable[[int], nn.Module],
    train_examples: Examples,
    queries: Examples,
    settings: FinetuneSettings,
    masks: np.ndarray,
    seeds: int,
    ensemble_size: int,
    directory: Path,
    advance: Callable[[int], None] = lambda n: None,
    measure: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = margin,
) -> torch.Tensor:
    """[subsets, seeds, queries] query outputs (`measure(logits, labels)`: margins unless given) of
    models trained on each subset with each of `seeds` seeds (`build(seed)`: the adapted, untrained
    model), `ensemble_size` models at a time; chunks already in `directory` are read back, not
    retrained (a directory holds one measure's outputs)."""
    jobs = [(s, r) for s in range(len(masks)) for r in range(seeds)]
    out = torch.empty(len(masks), seeds, len(queries))
    for start in range(0, len(jobs), ensemble_size):
        chunk = jobs[start : start + ensemble_size]
        path = directory / f"chunk_{start // ensemble_size:05d}.safetensors"
        values = _read_chunk(path, len(chunk), len(queries))
        if values is None:
            chunk_seeds = [1000 + s * seeds + r for s, r in chunk]
            mask = torch.as_tensor(masks[[s for s, _ in chunk]])
            ensemble, _ = train([build(seed) for seed in chunk_seeds], train_examples, mask, chunk_seeds, settings)
            values = measure(ensemble.logits(queries), queries.labels).float()
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"margins": values.contiguous()}, str(tmp))
        for (s, r), row in zip(chunk, values, strict=True):
            out[s, r] = row
        advance(len(chunk))
    return out


def _read_chunk(path: Path, models: int, queries: int) -> torch.Tensor | None:
    try:
        tensors, _ = read_safetensors(path)
    except (LoRAError, OSError):
        return None
    values = tensors.get("margins")
    return values.clone() if values is not None and tuple(values.shape) == (models, queries) else None


def lds_per_query(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Spearman correlation per query [queries] between each subset's summed scores (`scores`
    [queries, examples], `masks` [subsets, examples]) and its measured outputs [subsets, queries].
    A query whose predictions or outputs are all equal ranks nothing: 0."""
    predicted = masks.astype(np.float64) @ scores.T.astype(np.float64)  # [subsets, queries]
    a = rankdata(predicted, axis=0)
    b = rankdata(outputs, axis=0)
    a, b = a - a.mean(0), b - b.mean(0)
    denominator = np.sqrt((a**2).sum(0) * (b**2).sum(0))
    return np.where(denominator > 0, (a * b).sum(0) / np.where(denominator > 0, denominator, 1), 0.0)


def mean_interval(values: np.ndarray, resamples: int, seed: int, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of `values` and its percentile-bootstrap interval (resampling the values)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)
