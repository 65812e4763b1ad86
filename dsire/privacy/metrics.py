"""How well membership scores (higher = more likely a member) separate members from non-members.

ROC, AUC and TPR at a low FPR (Carlini et al. 2022: the largest TPR whose FPR is at most the target),
percentile-bootstrap confidence intervals, and an empirical ε lower bound as in DP auditing
(Jagielski et al. 2020, Nasr et al. 2021).

`auc` and `tpr_at_fpr` accept scores of shape [..., N] with one membership vector [N], so that
`bootstrap_ci` evaluates all its resamples in one vectorised call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta, rankdata
from sklearn.metrics import roc_curve

Metric = Callable[[np.ndarray, np.ndarray], float | np.ndarray]

# Scores held in memory at once by bootstrap_ci (resamples × examples per chunk).
_BOOTSTRAP_CHUNK = 10_000_000


@dataclass(frozen=True)
class EpsilonBound:
    """An empirical ε lower bound and what it was computed from, so that a reader can recompute it.

    The threshold was chosen on one half of the examples; the counts are those of the other half,
    predicting "member" when score ≥ threshold.
    """

    epsilon: float
    threshold: float
    true_positives: int
    members: int
    false_positives: int
    non_members: int
    tpr_low: float  # one-sided Clopper–Pearson lower bound on the TPR
    fpr_high: float  # one-sided Clopper–Pearson upper bound on the FPR
    delta: float
    confidence: float


def roc(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, including the ones sklearn would drop as collinear."""
    scores, members = _check_vector("roc", scores, members)
    fpr, tpr, _ = roc_curve(members, scores, drop_intermediate=False)
    return fpr, tpr


def auc(scores: np.ndarray, members: np.ndarray) -> float | np.ndarray:
    """Area under the ROC curve, P(member's score > non-member's) with ties counted half (Mann–Whitney)."""
    scores, members = _check(scores, members)
    positives, negatives = members.sum(), (~members).sum()
    ranks = rankdata(scores, axis=-1)
    wins = ranks[..., members].sum(axis=-1) - positives * (positives + 1) / 2
    return wins / (positives * negatives)


def tpr_at_fpr(scores: np.ndarray, members: np.ndarray, fpr: float) -> float | np.ndarray:
    """The largest TPR among thresholds whose FPR ≤ fpr.

    With n non-members, FPR ≤ fpr allows k false positives (the largest k with k/n ≤ fpr), so the best
    threshold lies just above the (k+1)-th highest non-member score and the TPR is the fraction of
    members scoring strictly above it.
    """
    scores, members = _check(scores, members)
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must lie in [0, 1]; got {fpr}")
    negatives = scores[..., ~members]
    n = negatives.shape[-1]
    allowed = np.searchsorted(np.arange(n + 1) / n, fpr, side="right") - 1
    if allowed == n:
        return np.ones(scores.shape[:-1])[()]
    cut = -np.partition(-negatives, allowed, axis=-1)[..., allowed]
    return (scores[..., members] > cut[..., None]).mean(axis=-1)


def bootstrap_ci(
    metric: Metric,
    scores: np.ndarray,
    members: np.ndarray,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of metric(scores, members) over examples.

    Members and non-members are resampled with replacement separately (a stratified bootstrap), so every
    resample keeps both classes and their counts. metric must accept scores [B, N] with members [N]
    and return [B], as `auc` and `tpr_at_fpr` (with fpr bound, e.g. by functools.partial) do.
    """
    scores, members = _check_vector("bootstrap_ci", scores, members)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1; got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie strictly between 0 and 1; got {level}")
    rng = np.random.default_rng(seed)
    positives, negatives = scores[members], scores[~members]
    resampled_members = np.concatenate([np.ones(positives.size, bool), np.zeros(negatives.size, bool)])
    chunk = max(1, _BOOTSTRAP_CHUNK // scores.size)
    values = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        batch = np.concatenate(
            [rng.choice(positives, (size, positives.size)), rng.choice(negatives, (size, negatives.size))], axis=1
        )
        values.append(np.asarray(metric(batch, resampled_members)))
    low, high = np.quantile(np.concatenate(values), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def clopper_pearson(successes: np.ndarray, trials: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided exact binomial bounds (low, high), each holding on its own with probability ≥ confidence."""
    successes, trials = np.asarray(successes), np.asarray(trials)
    tail = 1 - confidence
    # beta.ppf is NaN for a zero shape parameter (successes == 0 or == trials), where the bounds are 0 and 1.
    low = np.where(successes > 0, beta.ppf(tail, successes, trials - successes + 1), 0.0)
    high = np.where(successes < trials, beta.ppf(confidence, successes + 1, trials - successes), 1.0)
    return low, high


def eps_lower_bound(
    scores: np.ndarray, members: np.ndarray, delta: float = 1e-5, confidence: float = 0.95, seed: int = 0
) -> EpsilonBound:
    """ε that the attack proves with probability ≥ confidence: an (ε, δ)-DP training run could not do better.

    The examples are split in halves (seeded, stratified by membership). On the first half the threshold
    is the one with the largest bound computed as below; choosing by the bound rather than by the raw
    estimate avoids thresholds with zero false positives, whose estimate is infinite. On the second half,
    the one-sided Clopper–Pearson lower bound on the TPR and upper bound on the FPR each hold with
    probability (1 + confidence) / 2, so both hold at once with probability ≥ confidence (union bound),
    and ε ≥ max(log((TPR_lo − δ) / FPR_hi), log((1 − FPR_hi − δ) / (1 − TPR_lo))), clipped at 0.
    """
    scores, members = _check_vector("eps_lower_bound", scores, members)
    if not 0 <= delta < 1:
        raise ValueError(f"delta must lie in [0, 1); got {delta}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1; got {confidence}")
    for name, count in (("members", members.sum()), ("non-members", (~members).sum())):
        if count < 2:
            raise ValueError(f"eps_lower_bound needs at least 2 {name} (one per half); got {count}")
    rng = np.random.default_rng(seed)
    select = np.zeros(scores.size, bool)
    for group in (np.flatnonzero(members), np.flatnonzero(~members)):
        select[rng.permutation(group)[: group.size // 2]] = True
    each = (1 + confidence) / 2

    candidates = np.unique(scores[select])
    epsilons = _epsilon(*_counts(scores[select], members[select], candidates), delta, each)[0]
    threshold = candidates[np.argmax(epsilons)]

    counts = _counts(scores[~select], members[~select], threshold)
    epsilon, tpr_low, fpr_high = _epsilon(*counts, delta, each)
    true_positives, positives, false_positives, negatives = (int(c) for c in counts)
    return EpsilonBound(
        epsilon=float(epsilon),
        threshold=float(threshold),
        true_positives=true_positives,
        members=positives,
        false_positives=false_positives,
        non_members=negatives,
        tpr_low=float(tpr_low),
        fpr_high=float(fpr_high),
        delta=delta,
        confidence=confidence,
    )


def summarise(scores: np.ndarray, members: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict:
    """AUC, TPR at 1% and 0.1% FPR with bootstrap intervals at 95%, and the ε lower bound, as plain numbers."""
    scores, members = _check_vector("summarise", scores, members)
    summary = {}
    for key, metric in (
        ("auc", auc),
        ("tpr_at_1pct_fpr", lambda s, m: tpr_at_fpr(s, m, 0.01)),
        ("tpr_at_0.1pct_fpr", lambda s, m: tpr_at_fpr(s, m, 0.001)),
    ):
        summary[key] = float(metric(scores, members))
        summary[f"{key}_ci"] = list(bootstrap_ci(metric, scores, members, resamples=resamples, seed=seed))
    summary["eps_lower_bound"] = eps_lower_bound(scores, members, seed=seed).epsilon
    return summary


def _counts(scores: np.ndarray, members: np.ndarray, thresholds: np.ndarray | float) -> tuple[np.ndarray, ...]:
    """(true positives, members, false positives, non-members) when predicting member at score ≥ threshold."""
    positives, negatives = np.sort(scores[members]), np.sort(scores[~members])
    true_positives = positives.size - np.searchsorted(positives, thresholds, side="left")
    false_positives = negatives.size - np.searchsorted(negatives, thresholds, side="left")
    return true_positives, positives.size, false_positives, negatives.size


def _epsilon(
    true_positives: np.ndarray, positives: int, false_positives: np.ndarray, negatives: int, delta: float, each: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ε lower bound clipped at 0, TPR lower bound, FPR upper bound), each bound at confidence `each`."""
    tpr_low, _ = clopper_pearson(true_positives, positives, each)
    _, fpr_high = clopper_pearson(false_positives, negatives, each)
    ratios = np.maximum((tpr_low - delta) / fpr_high, (1 - fpr_high - delta) / (1 - tpr_low))
    return np.log(np.maximum(ratios, 1.0)), tpr_low, fpr_high


def _check_vector(function: str, scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`_check`, for functions that take one score per example."""
    scores, members = _check(scores, members)
    if scores.ndim != 1:
        raise ValueError(f"{function} takes one score per example, [N]; got scores of shape {scores.shape}")
    return scores, members


def _check(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores [..., N] as floats and members [N] as bools; both classes present, all finite."""
    scores, members = np.asarray(scores, dtype=float), np.asarray(members)
    if members.ndim != 1:
        raise ValueError(f"members must be one vector of labels; got shape {members.shape}")
    if members.dtype != bool:
        if not np.isin(members, (0, 1)).all():
            raise ValueError("members must be boolean, or 0/1 (1 = member)")
        members = members.astype(bool)
    if scores.ndim < 1 or scores.shape[-1] != members.size:
        raise ValueError(
            f"scores and members must have the same length; got {scores.shape[-1] if scores.ndim else 0} scores "
            f"and {members.size} members"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (NaN or Inf found)")
    if members.all() or not members.any():
        raise ValueError(
            f"members must contain both members and non-members; got {members.sum()} of {members.size} members"
        )
    return scores, members
