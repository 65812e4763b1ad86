"""Model selection (`dsire.models.select`): it finds the part that carries the signal, it never sees an
outer split's held-out concepts, and the chosen configuration survives the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from dsire.data.splits import kfold
from dsire.models.checkpoint import load_checkpoint, save_checkpoint
from dsire.models.features import Features
from dsire.models.knn import tally
from dsire.models.module import DSiReModule
from dsire.models.select import Candidate, SelectConfig, learned_weights, select
from dsire.train import fit_split

SIZES = np.arange(1, 7)
PARTS_ONLY = {"voters": ["delta", "down", "up"], "normalisation": ["global"], "k": [1]}


def zoo(concepts: int, signal: str, seed: int = 0, layers: int = 4) -> Features:
    """Every concept at every N; spectra of 4 values per part. Only `signal`'s values follow N (as
    N^-1/2, with a concept factor and noise); the other parts are noise of the same scale."""
    rng = np.random.default_rng(seed)
    n = np.tile(SIZES, concepts)
    names = [f"c{i // len(SIZES):02d}" for i in range(len(n))]
    factor = np.exp(0.05 * rng.normal(size=concepts)).repeat(len(SIZES))[:, None]
    vectors = {}
    for layer in range(layers):
        for part in ("delta", "down", "up"):
            base = np.sort(rng.uniform(0.2, 1.0, 4))[::-1]
            scale = n[:, None] ** -0.5 if part == signal else rng.uniform(0.4, 1.0, (len(n), 1))
            vectors[f"l{layer}/{part}"] = (base * scale * factor * np.exp(0.02 * rng.normal(size=(len(n), 4)))).astype(
                np.float32
            )
        vectors[f"l{layer}/norms"] = np.stack(
            [np.linalg.norm(vectors[f"l{layer}/{p}"], axis=1) for p in ("delta", "down", "up")], axis=1
        )
    return Features(vectors, n, [f"{c}-{i}" for i, c in enumerate(names)], names)


@pytest.mark.parametrize("signal", ["down", "up"])
def test_selection_picks_the_part_that_carries_the_signal(signal: str):
    selection = select(zoo(12, signal), Candidate("delta"), SelectConfig(**PARTS_ONLY))
    assert selection.chosen.voters == signal
    scores = {s["candidate"]["voters"]: s for s in selection.scores}
    assert scores[signal]["accuracy"] > 0.9 and scores["delta"]["accuracy"] < 0.4  # chance is 1/6


def test_learned_weights_find_the_informative_voters():
    """Separate voters, learned weights: every voter of the signal part outweighs every noise voter."""
    grid = SelectConfig(voters=("delta,down,up",), voter_weights=("learned",))
    selection = select(zoo(12, "down"), Candidate(), grid)
    assert selection.chosen.voter_weights == "learned"
    names = list(selection.voter_accuracy)
    weights = dict(zip(names, selection.voter_weights, strict=True))
    assert min(w for v, w in weights.items() if v.endswith("/down")) > max(
        w for v, w in weights.items() if not v.endswith("/down")
    )
    assert set(selection.report(top=4)["best_voters"]) == {f"l{i}/down" for i in range(4)}


def test_learned_weights_are_log_odds_over_chance():
    hits = np.array([[1, 0, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)  # accuracies 3/4, 1/4, 1/4
    # 6 sizes: chance 1/6, so weight log(acc·5/(1−acc)); at chance or below, 0; 1/4 > 1/6: log(5/3)
    np.testing.assert_allclose(learned_weights(hits, 6), [np.log(15), np.log(5 / 3), np.log(5 / 3)])
    np.testing.assert_allclose(learned_weights(hits, 2), [np.log(3), 0, 0])
    np.testing.assert_allclose(learned_weights(np.zeros((4, 2), bool), 6), [1, 1])  # none beats chance: equal


def test_weighted_tally_by_hand():
    """Two voters for N=2 (weight 1 each), one for N=5 with weight 3: 5 wins with share 3/5."""
    labels = np.array([[[2]], [[2]], [[5]]])
    n, share = tally(labels, np.ones((3, 1, 1)), np.array([2, 5]), "uniform", np.array([1.0, 1.0, 3.0]))
    assert n.tolist() == [5] and share.tolist() == [0.6]
    n, share = tally(labels, np.ones((3, 1, 1)), np.array([2, 5]), "uniform", np.ones(3))
    assert n.tolist() == [2] and share == pytest.approx([2 / 3])


def test_outer_held_out_concepts_never_reach_the_inner_choice():
    """Held-out concepts made unmistakable (their `up` part is N itself, no noise) leave the inner scores
    and choice of every outer split exactly as they were; fitting on them as well would change them."""
    features = zoo(12, "down")
    grid = dict(PARTS_ONLY, normalisation=["global", "dimension"], answer=["vote", "estimate"])
    splits = kfold(sorted(set(features.concepts)), 3)
    for split in splits:
        leaky = Features(
            {v: x.copy() for v, x in features.vectors.items()}, features.n, features.keys, features.concepts
        )
        held = np.isin(features.concepts, split.test)
        for layer in range(4):
            leaky.vectors[f"l{layer}/up"][held] = features.n[held, None].astype(np.float32)
        clean = fit_split(DSiReModule(select=grid, use_faiss_gpu=False), features, split, None).selection
        marked = fit_split(DSiReModule(select=grid, use_faiss_gpu=False), leaky, split, None).selection
        assert marked.scores == clean.scores and marked.chosen == clean.chosen
    everything = DSiReModule(select=grid, use_faiss_gpu=False).fit(leaky).selection
    assert everything.scores != clean.scores  # the test can fail: these concepts would change the scores


def test_chosen_configuration_is_saved_and_used(tmp_path):
    features, queries = zoo(12, "down"), zoo(3, "down", seed=1)
    grid = OmegaConf.create(dict(PARTS_ONLY, voter_weights=["learned"]))  # as Hydra passes it
    module = DSiReModule(select=grid, use_faiss_gpu=False).fit(features)
    assert module.chosen.voters == "down" and module.knn.voters == [f"l{i}/down" for i in range(4)]
    loaded = load_checkpoint(save_checkpoint(module, tmp_path / "model.safetensors"), use_faiss_gpu=False)
    assert loaded.chosen == module.chosen
    np.testing.assert_array_equal(loaded.knn.voter_weights, module.knn.voter_weights)
    assert loaded.predict_features(queries).n.tolist() == module.predict_features(queries).n.tolist()
