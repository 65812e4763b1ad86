"""kill -9 while train.py fills the spectra cache, then the same command again.

The kill lands at the worst moments (see kill_during_cache.py): halfway through writing a cache
entry, and halfway through writing content_hashes.json.
After each, every cache entry loads, finished entries are not recomputed, and the resumed run
saves the same model as a clean run. A damaged checkpoint is refused by predict.py. (kill -9 of
the zoo generator: tests/test_zoo.py; tampered checkpoints in detail: tests/test_dsire.py.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_script

pytestmark = pytest.mark.fault
OVERRIDES = ("data.sizes=[2,3]", "~logger", "~callbacks")  # 60 LoRAs, neighbouring sizes: an imperfect vote
ENTRIES = 60


def train(out: Path, cache: Path, *kill: str) -> subprocess.CompletedProcess:
    """train.py (or, with a kill point, kill_during_cache.py) into `out`, with its spectra cache in `cache`."""
    script = ["tests/kill_during_cache.py", *kill] if kill else ["train.py"]
    return run_script(*script, f"hydra.run.dir={out}", f"paths.cache_dir={cache}", *OVERRIDES)


def entries(cache: Path) -> dict[str, Path]:
    """Cache entries by name; temporary files of interrupted writes start with a dot and are not entries."""
    return {p.name: p for p in (cache / "spectra").glob("*/*.safetensors")}


def assert_entries_load(cache: Path) -> None:
    for name, path in entries(cache).items():
        tensors = load_file(str(path))
        layers = {key.rsplit("/", 1)[0] for key in tensors}
        assert layers and all(f"{layer}/{part}" in tensors for layer in layers for part in ("delta", "order")), name


def assert_same_model(run: Path, clean: Path) -> None:
    ours, theirs = load_file(str(run / "dsire.safetensors")), load_file(str(clean / "dsire.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    summary = json.loads((run / "metrics.json").read_text())["summary"]
    assert summary == json.loads((clean / "metrics.json").read_text())["summary"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, Path]:
    """A run without faults: its output directory and its cache."""
    root = tmp_path_factory.mktemp("clean")
    result = train(root / "run", root / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"spectra: {ENTRIES} computed from weights, 0 from the cache" in result.stdout
    return root / "run", root / "cache"


def test_kill_9_inside_a_cache_entry_write_then_resume(clean, tmp_path):
    killed = train(tmp_path / "killed", tmp_path / "cache", "entry", "25")
    assert killed.returncode == -9, killed.stderr[-3000:]
    done = entries(tmp_path / "cache")
    assert len(done) == 24  # the 25th was being written to a temporary file, never renamed
    assert_entries_load(tmp_path / "cache")
    before = {name: path.stat().st_mtime_ns for name, path in done.items()}
    hashes = json.loads((tmp_path / "cache" / "spectra" / "content_hashes.json").read_text())
    assert {f"{h}.safetensors" for h in hashes.values()} >= done.keys()  # no need to hash those files again

    resumed = train(tmp_path / "run", tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"spectra: {ENTRIES - 24} computed from weights, 24 from the cache" in resumed.stdout
    after = entries(tmp_path / "cache")
    assert after.keys() == entries(clean[1]).keys()
    assert all(after[name].stat().st_mtime_ns == mtime for name, mtime in before.items())  # not redone
    assert_entries_load(tmp_path / "cache")
    for name, path in after.items():
        ours, theirs = load_file(str(path)), load_file(str(entries(clean[1])[name]))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    assert_same_model(tmp_path / "run", clean[0])


def test_kill_9_halfway_through_the_content_hashes_then_resume(clean, tmp_path):
    """The old content_hashes.json survives a torn rewrite; entries written before the kill are all reused."""
    hashes = tmp_path / "cache" / "spectra" / "content_hashes.json"
    hashes.parent.mkdir(parents=True)
    shutil.copy(clean[1] / "spectra" / "content_hashes.json", hashes)
    old = hashes.read_bytes()
    killed = train(tmp_path / "killed", tmp_path / "cache", "hashes", "0")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert hashes.read_bytes() == old
    assert len(entries(tmp_path / "cache")) == ENTRIES
    assert_entries_load(tmp_path / "cache")

    resumed = train(tmp_path / "run", tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"spectra: 0 computed from weights, {ENTRIES} from the cache" in resumed.stdout
    assert json.loads(hashes.read_text()) == json.loads(old)
    assert_same_model(tmp_path / "run", clean[0])


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint"])
def test_predict_refuses_a_damaged_checkpoint(clean, tmp_path, damage):
    """A truncated checkpoint, or a LoRA passed as one: predict.py exits non-zero, naming the file and the problem."""
    lora = sorted((ROOT / "data" / "zoo").glob("*.safetensors"))[0]
    if damage == "truncated":
        ckpt = tmp_path / "dsire.safetensors"
        ckpt.write_bytes((clean[0] / "dsire.safetensors").read_bytes()[:-100])
        problem = f"{ckpt}: truncated"
    else:
        ckpt, problem = lora, f"{lora}: not a valid DSiRe checkpoint"
    result = run_script("predict.py", f"ckpt={ckpt}", f"lora={lora}", timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {problem}")  # one line, no traceback
    assert "Traceback" not in result.stderr
