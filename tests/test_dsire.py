"""DSiRe model: the vote equals a brute-force reference; checkpoints round-trip and refuse tampering."""

from __future__ import annotations

import json
import struct
from collections import defaultdict

import faiss
import numpy as np
import pytest
import torch

from dsire.models import knn as knn_module
from dsire.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dsire.models.features import Features, FeatureSpec
from dsire.models.module import DSiReModule
from dsire.spectra import Spectra


def brute_force(train: dict[str, np.ndarray], labels: np.ndarray, test: dict[str, np.ndarray]) -> list[int]:
    """The paper's method written plainly: global min-max, 1-NN per voter by full distance matrix,
    majority vote; ties to the smallest summed distance, then to the smallest N."""
    low = min(x.min() for x in train.values())
    high = max(x.max() for x in train.values())
    predictions = []
    for q in range(len(next(iter(test.values())))):
        votes, distance = defaultdict(int), defaultdict(float)
        for voter, x in train.items():
            d = np.sqrt((((x - low) / (high - low) - (test[voter][q] - low) / (high - low)) ** 2).sum(axis=1))
            nearest = int(np.argmin(d))
            votes[int(labels[nearest])] += 1
            distance[int(labels[nearest])] += float(d[nearest])
        predictions.append(min(votes, key=lambda n: (-votes[n], distance[n], n)))
    return predictions


def random_features(rng: np.random.Generator, models: int, voters: int = 7, dim: int = 4) -> dict[str, np.ndarray]:
    return {f"layer{v}/delta": np.abs(rng.normal(size=(models, dim))).astype(np.float32) for v in range(voters)}


@pytest.mark.parametrize("seed", range(5))
def test_vote_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    train, test = random_features(rng, 60), random_features(rng, 25)
    labels = rng.integers(1, 7, size=60)
    module = DSiReModule().fit(Features(vectors=train, n=labels, keys=[str(i) for i in range(60)]))
    ours = module.predict_features(Features(vectors=test, n=np.zeros(25, int), keys=[str(i) for i in range(25)]))
    assert ours.n.tolist() == brute_force(train, labels, test)


def test_k_and_distance_weighting_change_the_vote_as_documented():
    train = {"a/delta": np.array([[0.0], [1.0], [1.1], [10.0]], np.float32)}
    labels = np.array([1, 6, 6, 3])
    query = Features(vectors={"a/delta": np.array([[0.2]], np.float32)}, n=np.zeros(1, int), keys=["q"])
    fit = Features(vectors=train, n=labels, keys=list("wxyz"))
    assert DSiReModule(k=1).fit(fit).predict_features(query).n.tolist() == [1]
    assert DSiReModule(k=3).fit(fit).predict_features(query).n.tolist() == [6]  # two of three neighbours
    assert DSiReModule(k=3, weighting="distance").fit(fit).predict_features(query).n.tolist() == [1]


def spectra_for(rank: int, layers: list[str], scale: float) -> dict[str, Spectra]:
    values = torch.linspace(scale, scale / 10, rank)
    return {name: Spectra(values, values / 2, values / 3) for name in layers}


def test_feature_spec_parts_and_truncation():
    spectra = spectra_for(8, ["l1"], 4.0)
    vectors = FeatureSpec(parts=("delta", "norms"), num_sv=3).vectors(spectra)
    assert set(vectors) == {"l1/delta", "l1/norms"}
    assert vectors["l1/delta"].tolist() == pytest.approx(spectra["l1"].delta[:3].tolist())
    torch.testing.assert_close(vectors["l1/norms"][0], torch.linalg.vector_norm(spectra["l1"].delta))
    with pytest.raises(ValueError, match="unknown feature parts"):
        FeatureSpec(parts=("nope",))


def test_featurise_reports_mismatched_layers_ranks_and_shapes():
    module = DSiReModule(parts=("delta",))
    shapes = {"l1": (16, 16), "l2": (16, 8)}
    items = [
        {"key": "a", "n": 1, "concept": "c", "spectra": spectra_for(4, ["l1", "l2"], 1.0), "shapes": shapes},
        {"key": "b", "n": 2, "concept": "c", "spectra": spectra_for(4, ["l1"], 1.0), "shapes": shapes},
        {"key": "c", "n": 3, "concept": "c", "spectra": spectra_for(8, ["l1", "l2"], 1.0), "shapes": shapes},
        {"key": "d", "n": 1, "concept": "c", "error": "truncated"},
        {
            "key": "e",
            "n": 2,
            "concept": "c",
            "spectra": spectra_for(4, ["l1", "l2"], 1.0),
            "shapes": shapes | {"l2": (32, 8)},
        },
    ]
    features = module.featurise(items)
    assert features.keys == ["a"] and features.shapes == shapes
    assert "missing l2/delta" in features.errors["b"]
    assert "another rank" in features.errors["c"]
    assert features.errors["d"] == "truncated"
    assert features.errors["e"].startswith("layer l2 has shape (32, 8), the model's has (16, 8) (out, in)")


@pytest.mark.fault
def test_checkpoint_round_trip_and_tampering(tmp_path):
    rng = np.random.default_rng(0)
    train, test = random_features(rng, 30), random_features(rng, 10)
    module = DSiReModule(k=3, weighting="distance", normalisation="voter", use_faiss_gpu=False)
    module.fit(Features(vectors=train, n=rng.integers(1, 7, size=30), keys=[str(i) for i in range(30)]))
    module.metadata = {"recipe": "tiny"}
    path = save_checkpoint(module, tmp_path / "model.safetensors")
    loaded = load_checkpoint(path, use_faiss_gpu=False)
    query = Features(vectors=test, n=np.zeros(10, int), keys=[str(i) for i in range(10)])
    before, after = module.predict_features(query), loaded.predict_features(query)
    assert after.n.tolist() == before.n.tolist()
    np.testing.assert_allclose(after.share, before.share)
    assert loaded.metadata == {"recipe": "tiny"} and loaded.knn.k == 3 and loaded.knn.normalisation == "voter"

    raw = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[:-50])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated)

    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    inner = json.loads(header["__metadata__"]["dsire_checkpoint"])
    inner["knn"]["voters"] = inner["knn"]["voters"] + ["ghost/delta"]
    header["__metadata__"]["dsire_checkpoint"] = json.dumps(inner)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + header_len :])
    with pytest.raises(CheckpointError, match="not a valid DSiRe checkpoint"):
        load_checkpoint(tampered)


def test_approximate_index_options_round_trip(tmp_path):
    """IVF probing every list is exact: same votes as Flat; the index choice survives the checkpoint."""
    rng = np.random.default_rng(7)
    train, test = random_features(rng, 200), random_features(rng, 30)
    labels = rng.integers(1, 7, size=200)
    fit = Features(vectors=train, n=labels, keys=[str(i) for i in range(200)])
    query = Features(vectors=test, n=np.zeros(30, int), keys=[str(i) for i in range(30)])
    exact = DSiReModule().fit(fit).predict_features(query)
    ivf = DSiReModule(index="IVF4,Flat", index_search="nprobe=4").fit(fit)
    assert ivf.predict_features(query).n.tolist() == exact.n.tolist()
    loaded = load_checkpoint(save_checkpoint(ivf, tmp_path / "ivf.safetensors"))
    assert (loaded.knn.index, loaded.knn.search) == ("IVF4,Flat", "nprobe=4")
    assert loaded.predict_features(query).n.tolist() == exact.n.tolist()
    hnsw = DSiReModule(index="HNSW16", index_search="efSearch=64").fit(fit).predict_features(query)
    assert np.mean(hnsw.n == exact.n) >= 0.9  # approximate: recall is measured in benchmarks/


def test_search_parameters_of_a_gpu_index_go_through_gpu_parameter_space(monkeypatch):
    """faiss.ParameterSpace does not reach GPU IVF indices; where the index went to the GPU, the search
    parameters are set by GpuParameterSpace (faked here: the same calls as on a CUDA machine)."""
    applied = []

    class Space:
        def __init__(self, kind: str):
            self.kind = kind

        def set_index_parameters(self, index, search):
            applied.append((self.kind, search))

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: index)
    monkeypatch.setattr(faiss, "GpuParameterSpace", lambda: Space("gpu"), raising=False)
    monkeypatch.setattr(faiss, "ParameterSpace", lambda: Space("cpu"))
    vectors = np.random.default_rng(0).random((64, 4)).astype(np.float32)
    knn_module._index(vectors, "IVF4,Flat", "nprobe=4", use_gpu=True)
    knn_module._index(vectors, "HNSW16", "efSearch=64", use_gpu=True)  # no GPU HNSW: stays on the CPU
    knn_module._index(vectors, "IVF4,Flat", "nprobe=4", use_gpu=False)
    assert applied == [("gpu", "nprobe=4"), ("cpu", "efSearch=64"), ("cpu", "nprobe=4")]


def test_copies_are_exact_feature_matches_after_the_first():
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 4)), rng.random((2, 4))
    features = Features(
        vectors={
            "v/delta": np.stack([a[0], b[0], a[0], a[0], a[0] + 1e-7]),
            "v/up": np.stack([a[1], b[1], a[1], a[1], a[1]]),
        },
        n=np.array([1, 2, 1, 3, 1]),
        keys=["a", "b", "a-copy", "a-relabelled", "a-nudged"],
        concepts=["x", "y", "z", "x", "x"],
    )
    assert features.copies() == {"a-copy": "a", "a-relabelled": "a"}  # a change in the 7th digit is another LoRA
    assert Features().copies() == {}
