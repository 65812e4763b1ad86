"""Model selection by nested concept cross-validation: which DSiRe configuration suits this zoo.

A fixed choice of voters and normalisation suits one zoo's recipe and loses on another (one shared
seed against a seed per LoRA), and a user cannot know which applies to theirs. So, inside a training
set only (the outer split's held-out concepts never reach this module), the training concepts are
split again into `folds` concept folds, and every configuration of a declared grid
(`configs/model/select/*.yaml`) predicts each inner fold from the others. The configuration with the
smallest inner MAE wins; ties go to the higher accuracy, then to the simpler one (the earlier in the
grid's order; the fixed `model.*` configuration comes first).

Everything works on features computed once (`features.ALL`: every part, all singular values):
candidate voter sets are slices of them (`FeatureSpec.derive`), neighbours are found once per voter
set, normalisation and fold with numpy (exact, as FAISS `Flat`), and every k, weighting and voter
weighting is a re-count of those neighbours' votes (`knn.tally`). Under a normalisation fitted per
voter a voter's neighbours do not depend on the rest of its set, so a voter shared by several sets
(`delta` is in `delta,down,up`, which is in `delta,down,up,norms`) is searched once.

Learned voter weights: a voter's weight is the log-odds of its nearest-neighbour accuracy over
chance, log(acc·(S−1)/(1−acc)) for S sizes, zero at or below chance. Within the inner CV each fold's
weights come from the other folds' held-out predictions (cross-fitting), so the scores are not
inflated by the weights having seen the fold; the final weights use every fold.

`answer=estimate` answers with the zoo size nearest the ridge estimate (`regression`) instead of the
vote.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from threadpoolctl import threadpool_limits

from dsire.data.splits import kfold
from dsire.models.features import PARTS, Features, FeatureSpec
from dsire.models.knn import Normalisation, Weighting, bounds, normalise, tally
from dsire.models.regression import SizeRegressor
from dsire.settings import require

VoterWeights = Literal["equal", "learned"]
Answer = Literal["vote", "estimate"]
CHUNK_BYTES = 64 << 20  # most bytes of one block of pairwise distances
PER_VOTER: tuple[Normalisation, ...] = ("voter", "dimension", "standard")  # bounds fitted on each voter alone


def voter_set(text: str) -> FeatureSpec:
    """`delta,down,up`: one voter per part of each layer; `delta+down+up`: one voter per layer, its
    parts concatenated; `delta`: one part. Any of delta, down, up, norms."""
    concat = "+" in text
    parts = tuple(text.split("+" if concat else ","))
    if not parts or any(p not in PARTS for p in parts) or len(set(parts)) != len(parts) or ("," in text and concat):
        raise ValueError(f"{text!r}: parts of {', '.join(PARTS)} joined by ',' (separate voters) or '+' (concatenated)")
    return FeatureSpec(parts, concat=concat)


@dataclass(frozen=True)
class Candidate:
    """One configuration: the voters, their normalisation, the vote, and what answers."""

    voters: str = "delta,down,up"
    num_sv: int | None = None
    normalisation: Normalisation = "global"
    k: int = 1
    weighting: Weighting = "uniform"
    voter_weights: VoterWeights = "equal"
    answer: Answer = "vote"

    def spec(self) -> FeatureSpec:
        spec = voter_set(self.voters)
        return FeatureSpec(spec.parts, self.num_sv, spec.concat)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SelectConfig:
    """`model.select`: `enabled`, inner concept `folds`, at most `points` LoRAs (a seeded sample of whole
    concepts), and the grid: every combination of the listed values is a candidate."""

    enabled: bool = True
    folds: int = 3
    points: int = 1000
    voters: tuple[str, ...] = ("delta,down,up",)
    num_sv: tuple[int | None, ...] = (None,)
    normalisation: tuple[Normalisation, ...] = ("global",)
    k: tuple[int, ...] = (1,)
    weighting: tuple[Weighting, ...] = ("uniform",)
    voter_weights: tuple[VoterWeights, ...] = ("equal",)
    answer: tuple[Answer, ...] = ("vote",)

    def __post_init__(self) -> None:
        require(self.folds >= 2, "folds", f"{self.folds} must be at least 2 (inner concept folds)")
        require(self.points >= 2, "points", f"{self.points} must be at least 2")
        for key in ("voters", "num_sv", "normalisation", "k", "weighting", "voter_weights", "answer"):
            require(len(getattr(self, key)) >= 1, key, "empty; list one value or more")
        for i, text in enumerate(self.voters):
            try:
                voter_set(text)
            except ValueError as exc:
                require(False, f"voters[{i}]", str(exc))
        require(all(s is None or s >= 1 for s in self.num_sv), "num_sv", f"{list(self.num_sv)}: each null or >= 1")
        require(all(k >= 1 for k in self.k), "k", f"{list(self.k)}: each at least 1")

    def candidates(self, fixed: Candidate) -> list[Candidate]:
        """`fixed` first, then the grid in order (simplest first); an answer by estimate ignores the
        vote's settings, so it is tried once per voter set."""
        grid = itertools.product(
            self.voters, self.num_sv, self.normalisation, self.k, self.weighting, self.voter_weights, self.answer
        )
        out = [fixed]
        for voters, num_sv, normalisation, k, weighting, voter_weights, answer in grid:
            if answer == "estimate":
                normalisation, k, weighting, voter_weights = fixed.normalisation, 1, "uniform", "equal"
            out.append(Candidate(voters, num_sv, normalisation, k, weighting, voter_weights, answer))
        return list(dict.fromkeys(out))


@dataclass
class Selection:
    chosen: Candidate
    scores: list[dict] = field(default_factory=list)  # per candidate: settings, inner mae (pooled, per fold), accuracy
    voter_weights: np.ndarray | None = None  # learned, for the chosen voters (None: equal)
    voter_accuracy: dict[str, float] = field(default_factory=dict)  # inner 1-NN accuracy per chosen voter
    note: str = ""

    def report(self, top: int = 5) -> dict:
        """The chosen configuration, its inner scores, and the voters that carried the signal."""
        best = sorted(self.voter_accuracy.items(), key=lambda kv: -kv[1])[:top]
        chosen = next((s for s in self.scores if s["candidate"] == self.chosen.as_dict()), {})
        return {
            "chosen": self.chosen.as_dict(),
            "inner_mae": chosen.get("mae"),
            "inner_accuracy": chosen.get("accuracy"),
            "candidates": len(self.scores),
            "best_voters": dict(best),
            "note": self.note,
        }


def select(features: Features, fixed: Candidate, config: SelectConfig) -> Selection:
    """The grid's best configuration for these LoRAs (a training set), by inner concept-grouped CV.

    One BLAS thread: the many small products gain nothing from more, and on a busy machine idle
    threads spinning for work cost more than the products."""
    with threadpool_limits(1):
        return _select(features, fixed, config)


def _select(features: Features, fixed: Candidate, config: SelectConfig) -> Selection:
    features = _sample(features, config.points)
    concepts = sorted(set(features.concepts))
    if len(concepts) < 2:
        return Selection(fixed, note="fewer than two concepts: no inner cross-validation, the fixed configuration")
    folds = [np.isin(features.concepts, split.test) for split in kfold(concepts, min(config.folds, len(concepts)))]
    candidates = config.candidates(fixed)
    predictions: dict[Candidate, np.ndarray] = {}
    correct: dict[tuple, np.ndarray] = {}  # (voters, num_sv, normalisation): [rows, voters] 1-NN hits
    estimates: dict[tuple, np.ndarray] = {}  # (parts, num_sv): answers by the size estimate
    searched: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # (voter, num_sv, normalisation, k): its neighbours
    for (voters, num_sv), group in itertools.groupby(
        sorted(candidates, key=lambda c: (c.voters, str(c.num_sv))), key=lambda c: (c.voters, c.num_sv)
    ):
        group = list(group)
        derived = Candidate(voters, num_sv).spec().derive(features.vectors)
        if any(c.answer == "estimate" for c in group):
            design = (frozenset(voters.replace("+", ",").split(",")), num_sv)  # same columns, same ridge
            if design not in estimates:
                estimates[design] = _estimate_answers(derived, features.n, folds)
            predictions |= {c: estimates[design] for c in group if c.answer == "estimate"}
        for normalisation in dict.fromkeys(c.normalisation for c in group if c.answer == "vote"):
            votes = [c for c in group if c.answer == "vote" and c.normalisation == normalisation]
            k = max(c.k for c in votes)
            found = _shared_neighbours(derived, features.n, folds, normalisation, k, num_sv, searched)
            hits = features.n[:, None] == found[0][:, :, 0].T
            correct[(voters, num_sv, normalisation)] = hits
            predictions |= {c: _vote(found, features.n, folds, c, hits) for c in votes}
    scores = [
        {
            "candidate": c.as_dict(),
            "mae": float(np.abs(predictions[c] - features.n).mean()),
            "accuracy": float((predictions[c] == features.n).mean()),
            "fold_mae": [float(np.abs(predictions[c] - features.n)[held].mean()) for held in folds],
        }
        for c in candidates
    ]
    best = min(range(len(candidates)), key=lambda i: (round(scores[i]["mae"], 9), -scores[i]["accuracy"], i))
    chosen = candidates[best]
    key = (chosen.voters, chosen.num_sv, chosen.normalisation)
    names = list(chosen.spec().derive({v: x[:1] for v, x in features.vectors.items()}))
    hits = correct.get(key)
    accuracy = dict(zip(names, hits.mean(axis=0).tolist(), strict=True)) if hits is not None else {}
    weights = learned_weights(hits, len(np.unique(features.n))) if chosen.voter_weights == "learned" else None
    return Selection(chosen, scores, weights, accuracy)


def _sample(features: Features, points: int) -> Features:
    """At most about `points` LoRAs: whole concepts in a seeded random order, so folds stay concept-grouped."""
    if len(features.keys) <= points:
        return features
    concepts = np.array(sorted(set(features.concepts)))
    order = np.random.default_rng(0).permutation(concepts)
    counts = np.array([features.concepts.count(c) for c in order])
    keep = order[: max(2, int(np.searchsorted(np.cumsum(counts), points)) + 1)]
    return features.select(np.isin(features.concepts, keep))


def learned_weights(hits: np.ndarray, sizes: int) -> np.ndarray:
    """Per voter, the log-odds of its accuracy over chance (1/sizes), zero at or below chance; equal
    weights when no voter beats chance."""
    rows = len(hits)
    accuracy = np.clip(hits.mean(axis=0), 0.5 / rows, 1 - 0.5 / rows)
    weights = np.maximum(0.0, np.log(accuracy * (sizes - 1) / (1 - accuracy)))
    return weights if weights.sum() > 0 else np.ones(hits.shape[1])


def _estimate_answers(derived: dict[str, np.ndarray], n: np.ndarray, folds: list[np.ndarray]) -> np.ndarray:
    """Per LoRA, the size nearest its ridge estimate, fitted without its fold."""
    answers = np.zeros_like(n)
    for held in folds:
        train = {v: x[~held] for v, x in derived.items()}
        estimate = SizeRegressor().fit(train, n[~held]).predict({v: x[held] for v, x in derived.items()})
        sizes = np.unique(n[~held])
        answers[held] = sizes[np.abs(estimate[:, None] - sizes[None, :]).argmin(axis=1)]
    return answers


def _shared_neighbours(
    derived: dict[str, np.ndarray],
    n: np.ndarray,
    folds: list[np.ndarray],
    normalisation: Normalisation,
    k: int,
    num_sv: int | None,
    searched: dict[tuple, tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """`_neighbours`, searching under a per-voter normalisation only the voters no earlier set had:
    their bounds, and so their neighbours, are the same in every set."""
    if normalisation not in PER_VOTER:
        return _neighbours(derived, n, folds, normalisation, k)
    missing = {v: x for v, x in derived.items() if (v, num_sv, normalisation, k) not in searched}
    if missing:
        labels, distances = _neighbours(missing, n, folds, normalisation, k)
        searched |= {(v, num_sv, normalisation, k): (labels[i], distances[i]) for i, v in enumerate(missing)}
    found = [searched[(v, num_sv, normalisation, k)] for v in derived]
    return np.stack([labels for labels, _ in found]), np.stack([distances for _, distances in found])


def _neighbours(
    derived: dict[str, np.ndarray], n: np.ndarray, folds: list[np.ndarray], normalisation: str, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and distances [voters, rows, k] of each LoRA's k nearest neighbours per voter, among
    the LoRAs outside its fold, normalised with bounds fitted outside its fold."""
    raw = [np.asarray(x, np.float32) for x in derived.values()]
    k = min(k, min(int((~held).sum()) for held in folds))
    labels = np.zeros((len(raw), len(n), k), np.int64)
    distances = np.zeros((len(raw), len(n), k))
    for held in folds:
        low, high = bounds([x[~held] for x in raw], normalisation)
        x = [normalise(x, lo, hi).astype(np.float64) for x, lo, hi in zip(raw, low, high, strict=True)]
        for width in sorted({v.shape[1] for v in x}):  # voters of one width run as one batch
            same = [i for i, v in enumerate(x) if v.shape[1] == width]
            block = np.stack([x[i] for i in same])  # [voters, rows, width]
            found = _nearest(block[:, held], block[:, ~held], k)
            distances[np.ix_(same, np.flatnonzero(held))] = found[0]
            labels[np.ix_(same, np.flatnonzero(held))] = n[~held][found[1]]
    return labels, distances


def _nearest(query: np.ndarray, train: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact Euclidean k nearest (distances, indices), each [voters, queries, k], for query
    [voters, queries, d] and train [voters, rows, d], in blocks of voters of bounded memory."""
    voters, queries, rows = len(query), query.shape[1], train.shape[1]
    step = max(1, CHUNK_BYTES // (8 * queries * rows))
    distances, indices = np.zeros((voters, queries, k)), np.zeros((voters, queries, k), np.int64)
    squared_query, squared_train = (query**2).sum(axis=2), (train**2).sum(axis=2)
    for start in range(0, voters, step):
        v = slice(start, start + step)
        d2 = squared_query[v, :, None] + squared_train[v, None, :] - 2 * query[v] @ train[v].transpose(0, 2, 1)
        d2 = np.maximum(d2, 0)
        part = np.argpartition(d2, k - 1, axis=2)[..., :k] if k < rows else np.broadcast_to(np.arange(rows), d2.shape)
        near = np.take_along_axis(d2, part, axis=2)
        order = near.argsort(axis=2, kind="stable")
        indices[v] = np.take_along_axis(part, order, axis=2)
        distances[v] = np.sqrt(np.take_along_axis(near, order, axis=2))
    return distances, indices


def _vote(
    found: tuple[np.ndarray, np.ndarray], n: np.ndarray, folds: list[np.ndarray], c: Candidate, hits: np.ndarray
) -> np.ndarray:
    """Per LoRA, the candidate's vote from the neighbours outside its fold; learned weights of a fold
    come from the other folds' hits."""
    labels, distances = found[0][:, :, : c.k], found[1][:, :, : c.k]
    answers = np.zeros_like(n)
    sizes = np.unique(n)
    for held in folds:
        weights = np.ones(len(labels))
        if c.voter_weights == "learned":
            weights = learned_weights(hits[~held], len(sizes))
        answers[held] = tally(labels[:, held], distances[:, held], sizes, c.weighting, weights)[0]
    return answers
