"""Membership-attack metrics against sklearn, scipy, hand-made cases and constructions of known ε."""

from __future__ import annotations

import json
import math
from functools import partial

import numpy as np
import pytest
from scipy.stats import binomtest, norm
from sklearn.metrics import roc_auc_score, roc_curve

from dsire.privacy import metrics
from dsire.privacy.metrics import (
    auc,
    bootstrap_ci,
    clopper_pearson,
    eps_lower_bound,
    roc,
    summarise,
    tpr_at_fpr,
)


def gaussian_scores(rng: np.random.Generator, per_class: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Members ~ N(shift, 1), non-members ~ N(0, 1): AUC = Φ(shift / √2)."""
    members = np.repeat([True, False], per_class)
    return rng.normal(0, 1, 2 * per_class) + shift * members, members


def test_roc_keeps_every_threshold():
    fpr, tpr = roc(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0]))
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 1, 1])


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(0, 1, 301), 1)  # rounding makes ties
    members = rng.random(301) < 0.3
    assert auc(scores, members) == pytest.approx(roc_auc_score(members, scores), abs=1e-12)


def test_auc_and_tpr_at_fpr_score_each_row_of_a_batch():
    rng = np.random.default_rng(0)
    scores, members = rng.normal(0, 1, (4, 50)), rng.random(50) < 0.5
    np.testing.assert_allclose(auc(scores, members), [roc_auc_score(members, row) for row in scores], atol=1e-12)
    np.testing.assert_array_equal(tpr_at_fpr(scores, members, 0.1), [tpr_at_fpr(row, members, 0.1) for row in scores])


def test_tpr_at_fpr_allows_exactly_the_false_positives_the_fpr_permits():
    # 1,000 non-members scoring 0..999: FPR ≤ 0.1% allows one false positive (999), so the threshold sits
    # just above 998 and the members above it count.
    scores = np.concatenate([np.arange(1000.0), [999.5, 998.5, 998.2, 500.0]])
    members = np.arange(scores.size) >= 1000
    assert tpr_at_fpr(scores, members, 0.001) == 0.75
    assert tpr_at_fpr(scores, members, 0.0009) == 0.25  # no false positive allowed
    assert tpr_at_fpr(scores, members, 0.0) == 0.25
    assert tpr_at_fpr(scores, members, 0.5) == 1.0  # 500 allowed: above 499
    assert tpr_at_fpr(scores, members, 0.4) == 0.75  # 400 allowed: above 599
    assert tpr_at_fpr(scores, members, 1.0) == 1.0


def test_tpr_at_fpr_gives_nothing_for_a_member_tied_with_a_non_member():
    # The only threshold that admits the member at 1 also admits both non-members at 1 (FPR 2/3).
    assert tpr_at_fpr(np.array([1.0, 1.0, 0.0, 1.0, 0.5]), np.array([0, 0, 0, 1, 1]), 1 / 3) == 0.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.07, 0.29, 0.5])
def test_tpr_at_fpr_is_the_best_point_of_the_roc_curve(seed, fpr):
    rng = np.random.default_rng(seed)
    members = np.arange(300) < 200  # 100 non-members: 0.29 allows 29 false positives (0.29 · 100 < 29 in floats)
    scores = np.round(rng.normal(0, 1, 300) + members, 1)
    false_positive_rate, true_positive_rate, _ = roc_curve(members, scores, drop_intermediate=False)
    assert tpr_at_fpr(scores, members, fpr) == true_positive_rate[false_positive_rate <= fpr].max()


def test_bootstrap_intervals_cover_the_true_auc_across_seeds():
    true_auc = norm.cdf(1 / math.sqrt(2))
    per_class, seeds = 300, 40
    covered, widths = 0, []
    for seed in range(seeds):
        scores, members = gaussian_scores(np.random.default_rng(seed), per_class)
        low, high = bootstrap_ci(auc, scores, members, resamples=500, seed=seed)
        covered += low <= true_auc <= high
        widths.append(high - low)
    # Hanley & McNeil's standard error of the AUC for these class sizes.
    q1, q2 = true_auc / (2 - true_auc), 2 * true_auc**2 / (1 + true_auc)
    variance = true_auc * (1 - true_auc) + (per_class - 1) * (q1 - true_auc**2 + q2 - true_auc**2)
    expected_width = 2 * norm.ppf(0.975) * math.sqrt(variance / per_class**2)
    assert covered >= 34  # 95% intervals: 38 of 40 expected
    assert 0.85 < np.mean(widths) / expected_width < 1.15


def test_bootstrap_intervals_cover_the_true_tpr_at_fpr_across_seeds():
    true_tpr = norm.sf(norm.isf(0.1) - 1)
    covered = 0
    for seed in range(40):
        scores, members = gaussian_scores(np.random.default_rng(seed), 300)
        low, high = bootstrap_ci(partial(tpr_at_fpr, fpr=0.1), scores, members, resamples=500, seed=seed)
        covered += low <= true_tpr <= high
    assert covered >= 34


def test_bootstrap_in_chunks_gives_the_same_interval_statistically(monkeypatch):
    scores, members = gaussian_scores(np.random.default_rng(0), 300)
    whole = bootstrap_ci(auc, scores, members, resamples=1000)
    monkeypatch.setattr(metrics, "_BOOTSTRAP_CHUNK", 3 * scores.size)  # 3 resamples per chunk
    chunked = bootstrap_ci(auc, scores, members, resamples=1000)
    np.testing.assert_allclose(chunked, whole, atol=0.01)
    assert chunked != whole  # other draws, so the chunks really ran


def test_bootstrap_resamples_within_each_class():
    scores, members = np.array([0.0, 1.0, 2.0, 10.0, 11.0]), np.array([0, 0, 0, 1, 1])

    def member_mean(batch, batch_members):
        assert batch.shape == (7, 5) and batch_members.sum() == 2
        assert (batch[:, batch_members] >= 10).all() and (batch[:, ~batch_members] <= 2).all()
        return batch[:, batch_members].mean(axis=1)

    low, high = bootstrap_ci(member_mean, scores, members, resamples=7)
    assert 10 <= low <= high <= 11


@pytest.mark.parametrize(("successes", "trials"), [(0, 10), (3, 10), (10, 10), (37, 200), (199, 200)])
@pytest.mark.parametrize("confidence", [0.95, 0.975])
def test_clopper_pearson_matches_scipy_exact_one_sided_intervals(successes, trials, confidence):
    low, high = clopper_pearson(np.array([successes]), np.array([trials]), confidence)
    greater = binomtest(successes, trials, alternative="greater").proportion_ci(confidence, method="exact")
    less = binomtest(successes, trials, alternative="less").proportion_ci(confidence, method="exact")
    assert low[0] == pytest.approx(greater.low, abs=1e-12)
    assert high[0] == pytest.approx(less.high, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_eps_lower_bound_is_zero_when_scores_ignore_membership(seed):
    rng = np.random.default_rng(seed)
    members = rng.random(2000) < 0.5
    assert eps_lower_bound(rng.normal(0, 1, 2000), members, seed=seed).epsilon == 0


@pytest.mark.parametrize("seed", range(5))
def test_eps_lower_bound_of_randomised_response_is_below_and_near_its_epsilon(seed):
    """A member reports 1 with probability e/(1+e), a non-member with 1/(1+e): exactly 1-DP."""
    rng = np.random.default_rng(seed)
    members = np.repeat([True, False], 10_000)
    reports = rng.random(members.size) < np.where(members, math.e, 1) / (1 + math.e)
    bound = eps_lower_bound(reports.astype(float), members, seed=seed)
    assert 0.85 < bound.epsilon < 1
    assert bound.threshold == 1.0


def test_eps_lower_bound_of_separable_scores_follows_from_the_counts():
    members = np.repeat([True, False], [1001, 1000])
    bound = eps_lower_bound(members.astype(float), members, delta=1e-5, confidence=0.95)
    # Second half: 501 of 501 members and 0 of 500 non-members above the threshold 1; each bound at 97.5%.
    tpr_low, fpr_high = 0.025 ** (1 / 501), 1 - 0.025 ** (1 / 500)
    assert (bound.threshold, bound.true_positives, bound.members, bound.false_positives, bound.non_members) == (
        1.0,
        501,
        501,
        0,
        500,
    )
    assert bound.tpr_low == pytest.approx(tpr_low, rel=1e-12)
    assert bound.fpr_high == pytest.approx(fpr_high, rel=1e-12)
    expected = max(math.log((tpr_low - 1e-5) / fpr_high), math.log((1 - fpr_high - 1e-5) / (1 - tpr_low)))
    assert bound.epsilon == pytest.approx(expected, rel=1e-12)
    assert (bound.delta, bound.confidence) == (1e-5, 0.95)


def test_eps_lower_bound_takes_the_complement_term_when_it_is_larger():
    # Every member and half the non-members score 1: TPR ≈ 1 and FPR ≈ 1/2, so (1 − FPR) / (1 − TPR) wins.
    members = np.repeat([True, False], 1000)
    scores = np.where(members, 1.0, np.arange(2000) % 2)
    bound = eps_lower_bound(scores, members)
    assert (bound.threshold, bound.true_positives, bound.members, bound.non_members) == (1.0, 500, 500, 500)
    tpr = binomtest(bound.true_positives, bound.members, alternative="greater").proportion_ci(0.975, method="exact")
    fpr = binomtest(bound.false_positives, bound.non_members, alternative="less").proportion_ci(0.975, method="exact")
    assert math.log((tpr.low - 1e-5) / fpr.high) < 1
    assert bound.epsilon == pytest.approx(math.log((1 - fpr.high - 1e-5) / (1 - tpr.low)), rel=1e-12)


def test_eps_lower_bound_split_depends_on_the_seed_only():
    scores, members = gaussian_scores(np.random.default_rng(0), 500, shift=2.0)
    assert eps_lower_bound(scores, members, seed=3) == eps_lower_bound(scores, members, seed=3)
    assert eps_lower_bound(scores, members, seed=3) != eps_lower_bound(scores, members, seed=4)


def test_summarise_reports_each_metric_with_its_interval():
    scores, members = gaussian_scores(np.random.default_rng(0), 1000, shift=2.0)
    summary = summarise(scores, members, resamples=200, seed=1)
    assert list(summary) == [
        "auc",
        "auc_ci",
        "tpr_at_1pct_fpr",
        "tpr_at_1pct_fpr_ci",
        "tpr_at_0.1pct_fpr",
        "tpr_at_0.1pct_fpr_ci",
        "eps_lower_bound",
    ]
    assert summary["auc"] == auc(scores, members)
    assert summary["auc_ci"] == list(bootstrap_ci(auc, scores, members, resamples=200, seed=1))
    assert summary["tpr_at_1pct_fpr"] == tpr_at_fpr(scores, members, 0.01)
    tpr_ci = bootstrap_ci(partial(tpr_at_fpr, fpr=0.001), scores, members, resamples=200, seed=1)
    assert summary["tpr_at_0.1pct_fpr_ci"] == list(tpr_ci)
    assert summary["eps_lower_bound"] == eps_lower_bound(scores, members, seed=1).epsilon
    assert json.loads(json.dumps(summary)) == summary


@pytest.mark.parametrize(
    ("scores", "members", "message"),
    [
        ([0.1, 0.2, 0.3], [1, 0], "same length; got 3 scores and 2 members"),
        ([0.1, 0.2], [1, 1], "both members and non-members; got 2 of 2"),
        ([0.1, 0.2], [0, 0], "both members and non-members; got 0 of 2"),
        ([0.1, np.nan], [1, 0], "scores must be finite"),
        ([0.1, -np.inf], [1, 0], "scores must be finite"),
        ([0.1, 0.2], [1, 2], "members must be boolean, or 0/1"),
        ([0.1, 0.2], [[1, 0]], "members must be one vector"),
        (0.1, [1, 0], "same length; got 0 scores"),
    ],
)
@pytest.mark.parametrize(
    "function",
    [roc, auc, partial(tpr_at_fpr, fpr=0.1), partial(bootstrap_ci, auc), eps_lower_bound, summarise],
)
def test_metrics_reject_malformed_inputs(function, scores, members, message):
    with pytest.raises(ValueError, match=message):
        function(np.array(scores), np.array(members))


@pytest.mark.parametrize("function", [roc, partial(bootstrap_ci, auc), eps_lower_bound, summarise])
def test_one_vector_metrics_reject_batches(function):
    with pytest.raises(ValueError, match="takes one score per example, \\[N\\]; got scores of shape \\(2, 4\\)"):
        function(np.zeros((2, 4)), np.array([1, 0, 1, 0]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, m: tpr_at_fpr(s, m, 1.5), "fpr must lie in \\[0, 1\\]; got 1.5"),
        (lambda s, m: tpr_at_fpr(s, m, float("nan")), "fpr must lie in \\[0, 1\\]"),
        (lambda s, m: bootstrap_ci(auc, s, m, resamples=0), "resamples must be at least 1; got 0"),
        (lambda s, m: bootstrap_ci(auc, s, m, level=1.0), "level must lie strictly between 0 and 1"),
        (lambda s, m: eps_lower_bound(s, m, delta=1.0), "delta must lie in \\[0, 1\\)"),
        (lambda s, m: eps_lower_bound(s, m, confidence=0.0), "confidence must lie strictly between 0 and 1"),
        (lambda s, m: eps_lower_bound(s[1:], m[1:]), "at least 2 members \\(one per half\\); got 1"),
        (lambda s, m: eps_lower_bound(s[:-1], m[:-1]), "at least 2 non-members \\(one per half\\); got 1"),
    ],
)
def test_metrics_reject_bad_settings(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.array([0.9, 0.8, 0.1, 0.2]), np.array([True, True, False, False]))
