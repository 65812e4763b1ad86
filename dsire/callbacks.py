"""Callbacks that turn test results into figures and tables for any logger (W&B first).

They accumulate over the test runs of one job (one per split), so the figures describe every
held-out prediction made so far; each is re-logged after every split.
"""

from __future__ import annotations

from collections import defaultdict

import lightning.pytorch as pl
import matplotlib.pyplot as plt  # headless machines fall back to the Agg backend by themselves
import numpy as np
from lightning.pytorch.utilities import rank_zero_only

from dsire.loggers import log_figure, log_table
from dsire.models.module import DSiReModule


class ConfusionMatrix(pl.Callback):
    """True N (rows) against predicted N (columns), summed over splits."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.counts: dict[tuple[int, int], int] = defaultdict(int)

    @rank_zero_only  # every rank holds the gathered results; one draws them
    def on_test_end(self, trainer: pl.Trainer, module: DSiReModule) -> None:
        for _, truth, predicted in module.test_results.get("predictions", []):
            self.counts[(truth, predicted)] += 1
        sizes = sorted({s for pair in self.counts for s in pair})
        if not sizes:
            return
        matrix = np.zeros((len(sizes), len(sizes)), np.int64)
        for (truth, predicted), count in self.counts.items():
            matrix[sizes.index(truth), sizes.index(predicted)] = count
        figure, axis = plt.subplots(figsize=(1 + 0.6 * len(sizes), 1 + 0.6 * len(sizes)))
        axis.imshow(matrix, cmap="Blues")
        axis.set(
            xticks=range(len(sizes)),
            yticks=range(len(sizes)),
            xticklabels=sizes,
            yticklabels=sizes,
            xlabel="predicted N",
            ylabel="true N",
            title="held-out predictions",
        )
        for (i, j), count in np.ndenumerate(matrix):
            axis.text(j, i, str(count), ha="center", va="center", fontsize=8)
        log_figure(trainer, "confusion_matrix", figure, self.output_dir)
        plt.close(figure)


class PerLayerAccuracy(pl.Callback):
    """How often each layer's own nearest neighbour had the right N: which layers carry the signal."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.hits: dict[str, list[float]] = defaultdict(list)

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, module: DSiReModule) -> None:
        for voter, accuracy in module.test_results.get("per_voter_accuracy", {}).items():
            self.hits[voter].append(accuracy)
        if not self.hits:
            return
        rows = sorted(([v, round(float(np.mean(a)), 4)] for v, a in self.hits.items()), key=lambda r: -r[1])
        log_table(trainer, "per_layer_accuracy", ["voter", "accuracy"], rows, self.output_dir)
        accuracy = {voter: value for voter, value in rows}
        layers = list(dict.fromkeys(v.rsplit("/", 1)[0] for v in self.hits))  # model order
        parts = list(dict.fromkeys(v.rsplit("/", 1)[1] for v in self.hits))
        grid = np.array([[accuracy.get(f"{layer}/{part}", np.nan) for part in parts] for layer in layers])
        # one image, not one bar per voter: an SD 1.5 model has 384 voters
        shown = range(0, len(layers), -(-len(layers) // 40))  # at most 40 names, each readable; all are in the table
        figure, axis = plt.subplots(figsize=(4 + 1.2 * len(parts), 2 + 0.2 * len(shown)))
        low, high = float(np.nanmin(grid)), float(np.nanmax(grid))  # the colours span the accuracies there are
        image = axis.imshow(
            grid, aspect="auto", cmap="viridis", vmin=low, vmax=max(high, low + 1e-3), interpolation="nearest"
        )
        axis.set(xticks=range(len(parts)), xticklabels=parts, title="per-layer retrieval (1-NN accuracy alone)")
        axis.set_yticks(shown, [layers[i] for i in shown], fontsize=8)
        figure.colorbar(image, ax=axis, fraction=0.05)
        log_figure(trainer, "per_layer_accuracy", figure, self.output_dir)
        plt.close(figure)


class SpectrumVsSize(pl.Callback):
    """Mean singular values of ΔW (over layers and LoRAs) for each N: the paper's spectrum figure."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.seen: dict[str, tuple[int, np.ndarray]] = {}

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, module: DSiReModule) -> None:
        features = module.test_features
        delta = [v for v in features.vectors if v.endswith("/delta")]
        if not delta:
            return
        mean = np.mean([features.vectors[v] for v in delta], axis=0)  # [LoRAs, r]
        self.seen |= {key: (int(n), row) for key, n, row in zip(features.keys, features.n, mean, strict=True)}
        figure, axis = plt.subplots(figsize=(6, 4))
        for n in sorted({n for n, _ in self.seen.values()}):
            values = np.mean([row for m, row in self.seen.values() if m == n], axis=0)
            axis.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3, label=f"N = {n}")
        axis.set(xlabel="singular value index", ylabel="mean σ(ΔW)", yscale="log", title="spectrum vs dataset size")
        axis.legend(fontsize=7)
        log_figure(trainer, "spectrum_vs_n", figure, self.output_dir)
        plt.close(figure)


class IntervalCoverage(pl.Callback):
    """The size regression: estimate and conformal interval against true N, and coverage per N."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.rows: dict[str, list] = {}  # key -> [N, estimate, low, high, mismatch p]

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, module: DSiReModule) -> None:
        self.rows |= {key: rest for key, *rest in module.test_results.get("estimates", [])}
        if not self.rows or module.calibration is None:
            return
        truth, estimate, low, high, _ = np.array(list(self.rows.values()), dtype=float).T
        sizes = np.unique(truth)
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        jitter = np.random.default_rng(0).uniform(-0.2, 0.2, len(truth))
        left.errorbar(truth + jitter, estimate, yerr=[estimate - low, high - estimate], fmt="o", ms=3, alpha=0.5)
        identity = np.linspace(sizes[0], sizes[-1], 200)  # many points: a straight segment is wrong on a log axis
        left.plot(identity, identity, "k--", lw=1)
        left.set(xlabel="true N", ylabel="estimated N", yscale="log", title="size estimate with interval")
        inside = (low <= truth) & (truth <= high)
        right.bar(sizes, [inside[truth == s].mean() for s in sizes])
        right.axhline(module.calibration.coverage, color="k", ls="--", label="target")
        right.set(xlabel="true N", ylabel="coverage", ylim=(0, 1), title=f"coverage {inside.mean():.2f} overall")
        right.legend()
        log_figure(trainer, "interval_coverage", figure, self.output_dir)
        plt.close(figure)


class MismatchScores(pl.Callback):
    """Recipe-mismatch p-values of held-out in-recipe LoRAs: flat above the false-alarm line is healthy."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.p: dict[str, float] = {}

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, module: DSiReModule) -> None:
        self.p |= {key: row[-1] for key, *row in module.test_results.get("estimates", [])}
        if not self.p or module.calibration is None:
            return
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.hist(list(self.p.values()), bins=20, range=(0, 1))
        axis.axvline(module.calibration.false_alarm, color="r", ls="--", label="flagged below")
        axis.set(xlabel="mismatch p-value", ylabel="held-out LoRAs", title="recipe-mismatch score, in-recipe LoRAs")
        axis.legend()
        log_figure(trainer, "mismatch_scores", figure, self.output_dir)
        plt.close(figure)
