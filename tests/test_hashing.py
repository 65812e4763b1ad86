"""One way to hash each kind of thing; the digests recorded in the bundled zoo are still the ones computed."""

from __future__ import annotations

import csv
import hashlib

import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from dsire.data.cache import SpectraCache
from dsire.hashing import file_sha256, json_hash, tensors_sha256
from dsire.lab.methods import FinetuneSettings
from dsire.zoo.base import fingerprint
from dsire.zoo.plan import recipe_hash
from tests.conftest import ROOT


def test_bundled_zoo_digests_are_reproduced(tmp_path):
    """The manifest's recipe hash and base fingerprint (so resuming the bundled zoo is not refused)."""
    with (ROOT / "data" / "zoo" / "manifest.csv").open(newline="") as f:
        row = next(csv.DictReader(f))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("zoo_sweep", overrides=[f"paths.root_dir={ROOT}"])
    assert recipe_hash(cfg.zoo) == row["recipe_hash"] == "c1afb60061fb91b8"
    assert fingerprint(load_file(str(ROOT / "data" / "base" / "tiny.safetensors"))) == row["base_fingerprint"]
    assert SpectraCache(tmp_path, {"dtype": "float32"}).dir.name == "7497c097427d"  # existing caches stay valid


def test_digests_see_every_change():
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor(3)}
    digest = tensors_sha256(tensors)
    assert tensors_sha256(dict(reversed(tensors.items()))) == digest  # order of the dict does not matter
    for changed in (
        {"a": torch.arange(6.0).reshape(3, 2), "b": torch.tensor(3)},  # shape
        {"a": torch.arange(6.0).reshape(2, 3).double(), "b": torch.tensor(3)},  # dtype
        {"a": torch.arange(6.0).reshape(2, 3), "c": torch.tensor(3)},  # name
        {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor(4)},  # a value
    ):
        assert tensors_sha256(changed) != digest
    assert json_hash({"x": 1, "y": [2]}) == json_hash({"y": [2], "x": 1}) != json_hash({"x": 2, "y": [2]})


def test_file_digest_is_sha256_of_the_bytes(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * (5 << 20))  # more than one read block
    assert file_sha256(tmp_path / "f") == hashlib.sha256(b"x" * (5 << 20)).hexdigest()


def test_a_setting_added_later_leaves_earlier_recipes_hashes_alone():
    """`finetune.pad` came after every lab recipe was hashed (backbone caches, records, per-cluster seeds)."""
    assert json_hash(FinetuneSettings()) == "4dc01f0bc01b90fc"  # the hash from before `pad` existed
    assert json_hash(FinetuneSettings(method="pad_prompt")) != json_hash(FinetuneSettings(method="pad_prompt", pad=2))
