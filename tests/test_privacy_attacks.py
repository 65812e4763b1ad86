"""Membership-inference attacks against hand-computed Gaussians, softmax and cosines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dsire.privacy.attacks import (
    SIGMA_FLOOR,
    gradient_alignment,
    lira_offline,
    lira_online,
    logit_confidence,
    loss_attack,
)


def log_normal(x: float, mu: float, sigma: float) -> float:
    return -0.5 * math.log(2 * math.pi * sigma**2) - (x - mu) ** 2 / (2 * sigma**2)


def log_phi(z: float) -> float:
    return math.log(0.5 * (1 + math.erf(z / math.sqrt(2))))


# Five shadow models (rows), two examples (columns).
# Example 0: IN φ = [1, 3, 2] → μ_in = 2, σ_in² = (1 + 1 + 0) / 2 = 1;  OUT φ = [-1, 1] → μ_out = 0, σ_out² = 2.
# Example 1: IN φ = [4, 8]    → μ_in = 6, σ_in² = (4 + 4) / 1 = 8;      OUT φ = [0, 4, 2] → μ_out = 2, σ_out² = 4.
# Pooled over examples: σ_in² = (2 + 8) / (5 − 2) = 10/3 and σ_out² = (2 + 8) / (5 − 2) = 10/3.
SHADOW = np.array([[1.0, 0.0], [3.0, 4.0], [-1.0, 4.0], [1.0, 8.0], [2.0, 2.0]])
SHADOW_IN = np.array([[True, False], [True, False], [False, True], [False, True], [True, False]])
TARGET = np.array([2.0, 1.0])


def test_lira_online_per_example_gaussians():
    expected = [
        log_normal(2, 2, 1) - log_normal(2, 0, math.sqrt(2)),
        log_normal(1, 6, math.sqrt(8)) - log_normal(1, 2, 2),
    ]
    scores = lira_online(TARGET, SHADOW, SHADOW_IN)
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    np.testing.assert_allclose(scores, [0.5 * math.log(2) + 1, -0.5 * math.log(2) - 23 / 16], rtol=1e-12)


def test_lira_online_fixed_variance_pools_deviations_from_each_example_mean():
    sigma = math.sqrt(10 / 3)
    expected = [log_normal(2, 2, sigma) - log_normal(2, 0, sigma), log_normal(1, 6, sigma) - log_normal(1, 2, sigma)]
    scores = lira_online(TARGET, SHADOW, SHADOW_IN, fixed_variance=True)
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    np.testing.assert_allclose(scores, [0.6, -3.6], rtol=1e-12)


def test_lira_offline_is_one_sided_in_the_out_gaussian():
    expected = [log_phi((2 - 0) / math.sqrt(2)), log_phi((1 - 2) / 2)]
    np.testing.assert_allclose(lira_offline(TARGET, SHADOW, SHADOW_IN), expected, rtol=1e-12)
    sigma = math.sqrt(10 / 3)
    expected = [log_phi(2 / sigma), log_phi(-1 / sigma)]
    np.testing.assert_allclose(lira_offline(TARGET, SHADOW, SHADOW_IN, fixed_variance=True), expected, rtol=1e-12)


@pytest.mark.parametrize("attack", [lira_online, lira_offline])
@pytest.mark.parametrize("fixed_variance", [False, True])
def test_lira_scores_several_target_models_row_by_row(attack, fixed_variance):
    targets = np.array([[2.0, 1.0], [-3.0, 9.0], [0.5, 0.5]])
    scores = attack(targets, SHADOW, SHADOW_IN, fixed_variance=fixed_variance)
    rows = [attack(row, SHADOW, SHADOW_IN, fixed_variance=fixed_variance) for row in targets]
    np.testing.assert_array_equal(scores, np.stack(rows))


def test_lira_floors_sigma_of_an_example_with_constant_confidence():
    shadow = np.array([[5.0], [5.0], [3.0], [3.0]])
    shadow_in = np.array([[True], [True], [False], [False]])
    # log N(5; 5, f) − log N(5; 3, f) = 4 / (2 f²)
    np.testing.assert_allclose(lira_online(np.array([5.0]), shadow, shadow_in), [2 / SIGMA_FLOOR**2], rtol=1e-9)
    np.testing.assert_allclose(lira_offline(np.array([3.0]), shadow, shadow_in), [math.log(0.5)], rtol=1e-12)


def test_lira_offline_needs_no_in_models():
    shadow_in = np.zeros_like(SHADOW_IN)
    sigma = np.std(SHADOW, axis=0, ddof=1)
    expected = [log_phi((t - m) / s) for t, m, s in zip(TARGET, SHADOW.mean(axis=0), sigma, strict=True)]
    np.testing.assert_allclose(lira_offline(TARGET, SHADOW, shadow_in), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="example 0 \\(and 1 more examples\\) has 0 IN"):
        lira_online(TARGET, SHADOW, shadow_in)


@pytest.mark.parametrize("seed", [0, 1])
def test_lira_beats_a_global_threshold_when_examples_differ_in_difficulty(seed):
    """Per-example calibration removes each example's own offset, which a global threshold on φ cannot."""
    rng = np.random.default_rng(seed)
    models, examples = 32, 2000
    offset = rng.normal(0, 3, examples)
    shadow_in = rng.random((models, examples)) < 0.5
    shadow = offset + shadow_in + rng.normal(0, 1, (models, examples))
    members = rng.random(examples) < 0.5
    target = offset + members + rng.normal(0, 1, examples)
    assert roc_auc_score(members, target) < 0.65
    assert roc_auc_score(members, lira_online(target, shadow, shadow_in)) > 0.7
    assert roc_auc_score(members, lira_online(target, shadow, shadow_in, fixed_variance=True)) > 0.7
    assert roc_auc_score(members, lira_offline(target, shadow, shadow_in)) > 0.7


def test_lira_names_the_example_short_of_shadow_models():
    shadow_in = SHADOW_IN.copy()
    shadow_in[1, 0] = False  # example 0: IN only in models 0 and 4 → 2 IN, 3 OUT; still fine
    lira_online(TARGET, SHADOW, shadow_in)
    shadow_in[4, 0] = False  # example 0: 1 IN
    with pytest.raises(ValueError, match=r"at least 2 IN and 2 OUT .* example 0 has 1 IN: train more shadow models"):
        lira_online(TARGET, SHADOW, shadow_in)
    lira_online(TARGET, SHADOW, shadow_in, fixed_variance=True)  # one per example is enough when pooled
    shadow_in = SHADOW_IN.copy()
    shadow_in[[0, 4], 1] = True  # example 1: 1 OUT
    with pytest.raises(ValueError, match="example 1 has 1 OUT"):
        lira_online(TARGET, SHADOW, shadow_in)
    with pytest.raises(ValueError, match="LiRA offline needs at least 2 OUT shadow models per example; example 1"):
        lira_offline(TARGET, SHADOW, shadow_in)
    lira_offline(TARGET, SHADOW, shadow_in, fixed_variance=True)
    shadow_in[:, 1] = True  # example 1: 0 OUT
    with pytest.raises(ValueError, match=r"at least 1 IN and 1 OUT .* example 1 has 0 OUT"):
        lira_online(TARGET, SHADOW, shadow_in, fixed_variance=True)


def test_lira_fixed_variance_needs_some_example_with_two_models_on_a_side():
    shadow = SHADOW[:2]
    shadow_in = np.array([[True, False], [False, True]])
    for attack in (lira_online, lira_offline):
        with pytest.raises(ValueError, match="every example has exactly 1: train more shadow models"):
            attack(TARGET, shadow, shadow_in, fixed_variance=True)


@pytest.mark.parametrize(
    ("target", "shadow", "shadow_in", "message"),
    [
        (TARGET, SHADOW[:, 0], SHADOW_IN[:, 0], "shadow must be \\[K, E\\]"),
        (TARGET, SHADOW, SHADOW_IN[:4], "shadow_in must be a boolean array of shadow's shape"),
        (TARGET, SHADOW, SHADOW_IN.astype(int), "shadow_in must be a boolean array"),
        (TARGET[:1], SHADOW, SHADOW_IN, "target must be \\[E\\] or \\[T, E\\] with E = 2"),
        (TARGET[None, None], SHADOW, SHADOW_IN, "target must be \\[E\\] or \\[T, E\\]"),
        (np.array([2.0, np.nan]), SHADOW, SHADOW_IN, "target scores must be finite"),
        (TARGET, np.where(SHADOW_IN, SHADOW, np.inf), SHADOW_IN, "shadow scores must be finite"),
    ],
)
@pytest.mark.parametrize("attack", [lira_online, lira_offline])
def test_lira_rejects_malformed_inputs(attack, target, shadow, shadow_in, message):
    with pytest.raises(ValueError, match=message):
        attack(target, shadow, shadow_in)


def test_logit_confidence_is_log_odds_of_the_softmax():
    logits = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.tensor([0, 4, 2, 2])
    p = torch.softmax(logits, dim=-1).gather(-1, labels.expand(3, 4).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logit_confidence(logits, labels), torch.log(p / (1 - p)), rtol=1e-10, atol=1e-10)
    per_model = torch.stack([logit_confidence(row, labels) for row in logits])
    torch.testing.assert_close(logit_confidence(logits, labels.expand(3, 4)), per_model)


def test_logit_confidence_stays_exact_where_the_softmax_saturates():
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [50.0, 0.0, 0.0]])
    phi = logit_confidence(logits, torch.tensor([0, 0]))
    assert phi.dtype == torch.float32
    torch.testing.assert_close(phi, torch.tensor([1000.0, 50.0 - math.log(2)]))
    torch.testing.assert_close(logit_confidence(logits, torch.tensor([2, 1])), torch.tensor([-2000.0, -50.0]))


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), "at least 2 classes"),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), "logits must be finite"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]), "floating-point"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), "labels must be integer class indices"),
        (torch.zeros(2, 3), torch.tensor([0, 1, 2]), "labels need the shape of logits without its last"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), "labels must lie in \\[0, 2\\]"),
        (torch.zeros(2, 3), torch.tensor([-1, 0]), "labels must lie in \\[0, 2\\]"),
    ],
)
def test_logit_confidence_rejects_malformed_inputs(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        logit_confidence(logits, labels)


def test_loss_attack_scores_low_loss_as_member():
    np.testing.assert_array_equal(loss_attack(np.array([0.25, 2.0, 0.0])), [-0.25, -2.0, 0.0])
    with pytest.raises(ValueError, match="losses must be finite"):
        loss_attack(np.array([0.25, np.inf]))


def test_gradient_alignment_is_the_cosine_of_the_descent_direction_and_the_update():
    grads = torch.tensor([[-1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [1.0, 1.0], [-2.0, -2.0]])
    delta = torch.tensor([3.0, 0.0])
    expected = torch.tensor([1.0, 0.0, 0.0, -1 / math.sqrt(2), 1 / math.sqrt(2)])
    torch.testing.assert_close(gradient_alignment(grads, delta), expected)
    torch.testing.assert_close(gradient_alignment(grads, torch.zeros(2)), torch.zeros(5))


@pytest.mark.parametrize(
    ("grads", "delta", "message"),
    [
        (torch.zeros(3, 2), torch.zeros(3), "example_grads must be \\[E, P\\] and delta \\[P\\] with the same P"),
        (torch.zeros(2), torch.zeros(2), "example_grads must be \\[E, P\\]"),
        (torch.zeros(3, 2), torch.zeros(1, 2), "example_grads must be \\[E, P\\]"),
        (torch.tensor([[0.0, float("inf")]]), torch.zeros(2), "example_grads must be finite"),
        (torch.zeros(1, 2), torch.tensor([float("nan"), 0.0]), "delta must be finite"),
        (torch.zeros(1, 2, dtype=torch.long), torch.zeros(2), "example_grads must be finite floating-point"),
    ],
)
def test_gradient_alignment_rejects_malformed_inputs(grads, delta, message):
    with pytest.raises(ValueError, match=message):
        gradient_alignment(grads, delta)
