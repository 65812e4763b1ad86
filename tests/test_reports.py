"""What a run reports: valid JSON in metrics.json, and figures that draw what they claim."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from dsire import callbacks, predict
from tests.conftest import bundled_zoo_copy, run_script


def strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_metrics_json_is_valid_when_intervals_are_undefined(tmp_path):
    """3 concepts × N ∈ {1, 6}: each training fold calibrates on 4 held-out LoRAs, too few for 90%, so the
    intervals are infinite. metrics.json says so instead of a coverage of 1 (and holds no Infinity/NaN)."""
    rows = bundled_zoo_copy(tmp_path, ("m0", "m1", "m2"), (1, 6))
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    result = run_script(
        "train.py", f"data.source.path={tmp_path}", "data.split.folds=3", "~logger", "~callbacks",
        f"hydra.run.dir={out}", f"paths.cache_dir={out / 'cache'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = strict_json((out / "metrics.json").read_text())
    assert "coverage_mean" not in metrics["summary"] and "interval_width_mean" not in metrics["summary"]
    assert all("no interval" in split["interval_undefined"] for split in metrics["splits"])
    assert all(row[4] is None for split in metrics["splits"] for row in split["estimates"])  # infinite high bound


@pytest.fixture
def drawn(monkeypatch) -> dict:
    figures = {}
    monkeypatch.setattr(callbacks, "log_figure", lambda trainer, key, figure, out: figures.setdefault(key, figure))
    monkeypatch.setattr(callbacks, "log_table", lambda *args: None)
    return figures


def test_identity_line_is_straight_on_the_log_axis(drawn):
    estimates = [[f"k{n}", n, n * 1.1, n / 2, n * 2, 0.5] for n in (1, 2, 3, 6)]
    module = SimpleNamespace(test_results={"estimates": estimates}, calibration=SimpleNamespace(coverage=0.9))
    callbacks.IntervalCoverage("unused").on_test_end(None, module)
    left = drawn["interval_coverage"].axes[0]
    x, y = next(line.get_data() for line in left.get_lines() if line.get_linestyle() == "--")
    assert len(x) >= 100 and np.array_equal(x, y) and x[0] == 1 and x[-1] == 6


def test_per_layer_colours_span_the_accuracies(drawn):
    accuracy = {f"layer{i}/{part}": 0.2 + 0.01 * i for i in range(30) for part in ("delta", "up")}
    module = SimpleNamespace(test_results={"per_voter_accuracy": accuracy})
    callbacks.PerLayerAccuracy("unused").on_test_end(None, module)
    axis = drawn["per_layer_accuracy"].axes[0]
    assert axis.get_images()[0].get_clim() == pytest.approx((0.2, 0.49))
    assert all(label.get_fontsize() >= 8 for label in axis.get_yticklabels())


PREDICTION = {
    "file": "loras/[v2] cat.safetensors",
    "predicted_n": 55,
    "claimed_n": 120,
    "claimed_images_with_repeats": 1200,
    "estimated_n": 54.2,
    "interval_low": 20.1,
    "interval_high": 140.0,
    "beyond_zoo_sizes": True,
    "mismatch_p": 0.0123,
    "recipe_mismatch": True,
    "vote_share": 0.55,
    "nearest_distance": 0.012345,
    "disagreeing_voters": 55,
}
PREDICT_HEADERS = (
    "claimed N (×repeats)",
    "estimate [interval]",
    "mismatch p",
    "nearest distance",
    "disagreeing voters",
)
CELLS = ("55", "120 (1200)", "54.2 [20.1, 140] (beyond zoo)", "0.012 (!)", "0.55", "0.01235")


@pytest.mark.parametrize("terminal", [False, True])
def test_prediction_table_is_never_cropped(terminal):
    """Piped (or in a terminal narrower than the table), every cell and header is shown whole; `[...]` is text."""
    buffer = io.StringIO()
    predict.print_table([PREDICTION], Console(file=buffer, width=60, force_terminal=terminal, color_system=None))
    shown = buffer.getvalue()
    assert all(len(line) <= 200 for line in shown.splitlines())
    flat = " ".join(shown.replace("│", " ").replace("┃", " ").split())  # cells may span lines: compare words
    for text in (*CELLS, *PREDICT_HEADERS):
        assert all(word in flat for word in text.split()), text
    if not terminal:  # piped: the file name is whole too
        assert "loras/[v2] cat.safetensors" in shown


def test_a_run_logs_its_results_and_settings_everywhere_without_library_noise(tmp_path):
    """`logger=many` (W&B offline, CSV, TensorBoard): every logger gets the data settings, not only `model.*`;
    train.log holds the results; the litlogger advert, torch's LeafSpec warning and W&B's `anonymous`
    warning are not printed."""
    rows = bundled_zoo_copy(tmp_path, ("m0", "m1", "m2", "m3"), (1, 3, 6))
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    result = run_script(
        "train.py", f"data.source.path={tmp_path}", "data.split.folds=2", "logger=many", "~callbacks",
        f"hydra.run.dir={out}", f"paths.cache_dir={out / 'cache'}", env={"HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    for noise in ("litlogger", "LeafSpec", "anonymous"):
        assert noise not in printed, noise
    log = (out / "train.log").read_text()
    assert "spectra: 12 computed from weights, 0 from the cache, 0 not usable" in log
    assert "accuracy_mean" not in log and "accuracy per N:" in log and "regression_mae" in log
    hparams = (out / "csv" / "version_0" / "hparams.yaml").read_text()
    assert str(tmp_path) in hparams and "folds: 2" in hparams and "seed: 0" in hparams
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    records = next((out / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()  # what `wandb sync` sends
    assert str(tmp_path).encode() in records and b"n_train" in records
