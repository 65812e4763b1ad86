"""Size regression, conformal intervals and the recipe-mismatch score: exact where math allows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dsire.models.calibration import Calibration, calibrate
from dsire.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dsire.models.features import Features
from dsire.models.module import DSiReModule
from dsire.models.regression import SizeRegressor


def power_law(n: np.ndarray, rng: np.random.Generator, noise: float = 0.0, voters: int = 4) -> dict[str, np.ndarray]:
    """Spectra that shrink as N^-1/2 (with a per-LoRA multiplicative noise): linear in log-log."""
    base = np.linspace(1.0, 0.1, 8)
    jitter = np.exp(noise * rng.normal(size=(len(n), voters, 1)))
    return {f"layer{v}/delta": base * n[:, None] ** -0.5 * jitter[:, v] for v in range(voters)}


def test_regression_interpolates_and_extrapolates_a_power_law():
    rng = np.random.default_rng(0)
    seen = np.array([1, 3, 5] * 4)
    model = SizeRegressor().fit(power_law(seen, rng), seen)
    unseen = np.array([2, 4, 6, 8])
    np.testing.assert_allclose(model.predict(power_law(unseen, rng)), unseen, rtol=0.02)


def test_regression_refuses_negative_features():
    with pytest.raises(ValueError, match="non-negative"):
        SizeRegressor().fit({"a/delta": np.array([[-1.0], [1.0]])}, np.array([1, 2]))


def test_conformal_quantile_and_interval_exact():
    errors = np.arange(1, 20) / 10.0  # 19 held-out errors in log N: 0.1 … 1.9
    calibration = Calibration(errors, np.zeros(1), coverage=0.9, false_alarm=0.05)
    assert calibration.log_half_width == pytest.approx(1.8)  # ⌈20 · 0.9⌉ = 18th smallest
    low, high = calibration.interval(np.array([4.0]))
    assert low[0] == pytest.approx(4 * math.exp(-1.8)) and high[0] == pytest.approx(4 * math.exp(1.8))
    tight = Calibration(errors[:5], np.zeros(1), coverage=0.9, false_alarm=0.05)
    assert tight.interval(np.array([4.0]))[1][0] == math.inf  # 5 points cannot promise 90%


def test_mismatch_p_value_exact():
    calibration = Calibration(np.zeros(1), np.array([1.0, 2.0, 3.0, 4.0]), coverage=0.9, false_alarm=0.25)
    # (1 + held-out zoo LoRAs at least as far) / (1 + 4)
    np.testing.assert_allclose(calibration.mismatch_p(np.array([0.5, 2.0, 3.5, 9.0])), [1.0, 0.8, 0.4, 0.2])


def synthetic_zoo(rng: np.random.Generator, concepts: int, sizes=(1, 2, 3, 4, 5, 6)) -> Features:
    """Concepts shift every spectrum by their own factor; within a concept, spectra follow N^-1/2."""
    n = np.array([s for _ in range(concepts) for s in sizes])
    names = [f"c{c}" for c in range(concepts) for _ in sizes]
    shift = np.repeat(np.exp(0.15 * rng.normal(size=(concepts, 1, 1))), len(sizes), axis=0)
    vectors = {v: x * shift[:, 0] for v, x in power_law(n, rng, noise=0.1).items()}
    return Features(vectors=vectors, n=n, keys=[f"{c}-{i}" for i, c in enumerate(names)], concepts=names)


SEEDS = range(30)  # one zoo is one draw of the calibration: a single seed proves little either way


@pytest.fixture(scope="module")
def over_seeds() -> dict[str, np.ndarray]:
    """Per seed: a 40-concept zoo, 200 unseen concepts of its recipe and 20 of another (3× the spectra);
    the interval coverage on the unseen concepts and the share of each set flagged as another recipe."""
    coverage, same, other = [], [], []
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        module = DSiReModule(coverage=0.8, false_alarm=0.05).fit(synthetic_zoo(rng, 40))
        test, foreign = synthetic_zoo(rng, 200), synthetic_zoo(rng, 20)
        foreign.vectors = {v: x * 3.0 for v, x in foreign.vectors.items()}  # e.g. 3x the learning rate
        estimate = module.estimate(test, module.predict_features(test))
        coverage.append(np.mean((estimate.low <= test.n) & (test.n <= estimate.high)))
        same.append(estimate.mismatch.mean())
        other.append(module.estimate(foreign, module.predict_features(foreign)).mismatch.mean())
    return {"coverage": np.array(coverage), "same": np.array(same), "other": np.array(other)}


def test_interval_coverage_on_unseen_concepts_near_target(over_seeds):
    """Averaged over 30 zoos (standard error about 0.008), coverage is at the 0.8 target, two-sided: the
    cross-fit's models see fewer concepts than the final one, so it errs slightly high, never low."""
    assert 0.79 <= over_seeds["coverage"].mean() <= 0.83


def test_mismatch_false_alarm_rate_near_design_and_another_recipe_flagged(over_seeds):
    """In-recipe unseen concepts are flagged at about `false_alarm` (0.05) on average, two-sided (standard
    error about 0.003; conservative for the same reason as the coverage); another recipe is flagged
    in most cases, in every zoo."""
    assert 0.025 <= over_seeds["same"].mean() <= 0.06
    assert over_seeds["other"].mean() >= 0.85 and over_seeds["other"].min() >= 0.7


def test_calibration_predicts_at_most_max_points():
    rng = np.random.default_rng(4)
    zoo = synthetic_zoo(rng, 10)
    module = DSiReModule(calibration_points=7).fit(zoo)
    assert len(module.calibration.errors) == len(module.calibration.distances) == 7
    assert len(DSiReModule().fit(zoo).calibration.errors) == len(zoo.keys)


def test_calibration_needs_two_concepts():
    assert calibrate(["a", "a"], np.array([1, 2]), lambda train, held: (None, None), 5, 0.9, 0.05) is None


def test_checkpoint_keeps_estimates_and_refuses_bad_calibration(tmp_path):
    rng = np.random.default_rng(3)
    module = DSiReModule().fit(synthetic_zoo(rng, 12))
    test = synthetic_zoo(rng, 3)
    path = save_checkpoint(module, tmp_path / "model.safetensors")
    loaded = load_checkpoint(path)
    for a, b in zip(
        vars(module.estimate(test, module.predict_features(test))).values(),
        vars(loaded.estimate(test, loaded.predict_features(test))).values(),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    module.calibration.errors[0] = np.nan
    with pytest.raises(CheckpointError, match="calibration tensors must be finite"):
        load_checkpoint(save_checkpoint(module, tmp_path / "tampered.safetensors"))
