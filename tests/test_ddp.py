"""Featurisation under Lightning DDP: 2 CPU processes (gloo) read each LoRA once and agree with one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsire import distributed
from dsire.distributed import ShardSampler
from tests.conftest import run_script
from tests.test_train_predict import ZOO


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_item_once(monkeypatch, world):
    shards = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank_and_world", lambda rank=rank: (rank, world))
        sampler = ShardSampler(10)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    assert sorted(i for shard in shards for i in shard) == list(range(10))


def _odd_manifest(tmp_path: Path) -> Path:
    """59 bundled LoRAs (N = 1 or 6, one left out): an odd count, which a padding sampler would repeat."""
    lines = (ZOO / "manifest.csv").read_text().splitlines()
    rows = [line for line in lines[1:] if line.split(",")[1] in ("1", "6")][1:]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join([lines[0], *(f"{ZOO}/{row}" for row in rows)]) + "\n")
    return manifest


def _train(manifest: Path, out: Path, *overrides: str) -> dict:
    common = (f"data.source.path={manifest}", "logger=csv", f"hydra.run.dir={out}", f"paths.cache_dir={out / 'cache'}")
    result = run_script("train.py", *common, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "spectra: 59 computed from weights, 0 from the cache" in result.stdout  # no LoRA read twice
    return json.loads((out / "metrics.json").read_text())


def test_ddp_two_processes_match_one(tmp_path):
    manifest = _odd_manifest(tmp_path)
    single = _train(manifest, tmp_path / "single")
    ddp = _train(manifest, tmp_path / "ddp", "trainer=ddp", "trainer.devices=2")
    assert (tmp_path / "ddp" / "train_ddp_process_1.log").is_file(), "the second process did not run"
    assert ddp["summary"] == single["summary"]
    for one, two in zip(single["splits"], ddp["splits"], strict=True):
        assert two["predictions"] == one["predictions"]
        assert len({key for key, _, _ in two["predictions"]}) == len(two["predictions"])
