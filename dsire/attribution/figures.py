"""Figures of attribution runs: the most helpful and most harmful training images per query."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from dsire.lab.data import Examples


def top_k_grid(scores: torch.Tensor, train: Examples, queries: Examples, k: int, shown: int, title: str) -> Figure:
    """One row per query (the first `shown`): the query, its k highest-scored (helpful) and its k
    lowest-scored (harmful) training images, each titled with its label and score."""
    shown = min(shown, len(queries))
    figure, axes = plt.subplots(shown, 2 * k + 1, figsize=(1.1 * (2 * k + 1), 1.3 * shown), squeeze=False)
    for row in range(shown):
        order = torch.argsort(scores[row], descending=True)
        picks = [("query", None, queries, row)]
        picks += [("+", float(scores[row, i]), train, int(i)) for i in order[:k]]
        picks += [("−", float(scores[row, i]), train, int(i)) for i in order.flip(0)[:k]]
        for axis, (kind, score, examples, index) in zip(axes[row], picks, strict=True):
            axis.imshow(_image(examples, index), cmap="gray")
            label = int(examples.labels[index])
            axis.set_title(f"q {label}" if score is None else f"{kind}{label} {score:.2g}", fontsize=6)
            axis.axis("off")
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    return figure


def _image(examples: Examples, index: int) -> torch.Tensor:
    pixels = examples.take(torch.tensor([index]))[0].float().cpu()
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp_min(1e-12)
    return pixels[0] if pixels.shape[0] == 1 else pixels.permute(1, 2, 0)
