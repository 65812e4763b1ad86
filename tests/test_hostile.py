"""Hostile files and directories the basic corpus (test_safety.py) does not cover, and a batch run over them.

Disguised pickles, unsupported dtypes, symlink loops, FIFOs and devices, duplicates, unreadable
files: each gets a clear error naming it, nothing executes, and `predict.py` over a directory
mixing them with good LoRAs predicts the good ones, names every bad one and exits non-zero.
Damaged spectra cache entries are recomputed, not a crash.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsire.data.cache import SpectraCache
from dsire.data.datamodule import ZooDataset
from dsire.data.sources import ZooEntry, from_labels_dir, from_manifest, scan_directory
from dsire.lora import LoRAError, load_lora
from dsire.lora.load import WEIGHT_SUFFIXES
from dsire.models.checkpoint import save_checkpoint
from dsire.models.module import DSiReModule
from dsire.spectra import lora_spectra
from tests.conftest import ROOT, run_script, tiny_unet
from tests.test_safety import CANARY, Exploit, good_state

ZOO = ROOT / "data" / "zoo"
pytestmark = pytest.mark.hostile


@pytest.fixture(autouse=True)
def no_canary():
    CANARY.unlink(missing_ok=True)
    yield
    assert not CANARY.exists(), "a hostile pickle ran code"


class Hung(Exception):
    """Not an OSError, so that no `except OSError` in the code under test can swallow it."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail instead of hanging: opening a FIFO or reading /dev/zero never returns."""

    def expire(signum, frame):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def expect_error(path: Path, problem: str, **kwargs) -> None:
    with pytest.raises(LoRAError, match=problem) as info:
        load_lora(path, **kwargs)
    assert path.name in str(info.value)


def save_state(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file(state, str(path))
    return path


def test_torch_zip_named_safetensors(tmp_path):
    """torch.save's zip archive starts with `PK\\x03\\x04`: read as a header length, that is terabytes."""
    path = tmp_path / "evil.safetensors"
    torch.save({"x.lora_down.weight": Exploit()}, path)
    expect_error(path, "over the .*-byte limit")


def test_pickle_named_parquet(tmp_path):
    path = tmp_path / "low_4.parquet"
    path.write_bytes(pickle.dumps(Exploit()))
    expect_error(path, "unreadable parquet file")


@pytest.mark.parametrize("allow_torch_load", [False, True])
def test_pickle_in_a_peft_directory(tmp_path, allow_torch_load):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    torch.save({"base_model.model.x.lora_A.weight": Exploit()}, tmp_path / "adapter_model.bin")
    problem = "refused or unreadable" if allow_torch_load else "refused by default"
    expect_error(tmp_path / "adapter_model.bin", problem, allow_torch_load=allow_torch_load)
    with pytest.raises(LoRAError, match=problem):
        load_lora(tmp_path, allow_torch_load=allow_torch_load)


@pytest.mark.parametrize(
    ("dtype", "problem"),
    [
        (torch.bool, "dtype BOOL, not a float or integer type"),
        (torch.complex64, "dtype C64, not a float or integer type"),
        (torch.int8, "expected floating point"),
        (torch.uint8, "expected floating point"),
        (torch.int64, "expected floating point"),
    ],
)
def test_factor_of_a_wrong_dtype(tmp_path, dtype, problem):
    state = good_state()
    key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    state[key] = torch.ones(state[key].shape, dtype=dtype)
    expect_error(save_state(tmp_path / "w.safetensors", state), problem)


def test_symlink_loops(tmp_path):
    (tmp_path / "a.safetensors").symlink_to("b.safetensors")
    (tmp_path / "b.safetensors").symlink_to("a.safetensors")
    expect_error(tmp_path / "a.safetensors", "too many levels of symbolic links")
    (tmp_path / "adapter").symlink_to("adapter")
    expect_error(tmp_path / "adapter", "too many levels of symbolic links")
    (tmp_path / "gone.safetensors").symlink_to("nowhere.safetensors")
    expect_error(tmp_path / "gone.safetensors", "no such file or directory")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_and_device_are_refused_without_reading(tmp_path):
    """Read by the loader or hashed by the spectra cache, a FIFO or /dev/zero would block or never end."""
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    cache = SpectraCache(tmp_path / "cache", {})
    with deadline(20):
        for path in (fifo, zero):
            expect_error(path, "not a regular file")
            with pytest.raises(LoRAError, match="not a regular file"):
                cache.get(ZooEntry(str(path), n=1, concept="c"))


WITHOUT_OVERRIDE = "--bounding-set=-dac_override,-dac_read_search"  # root, minus reading what it may not


def test_unreadable_file_and_directory(tmp_path):
    """As root, chmod 000 stops nothing: the test then runs itself again under setpriv, without the
    capabilities that let root read any file, so the check is real."""
    locked = save_state(tmp_path / "locked.safetensors", good_state())
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_state(adapter / "adapter_model.safetensors", good_state())
    locked.chmod(0)
    adapter.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            setpriv = shutil.which("setpriv")
            if setpriv is None or os.environ.get("DSIRE_WITHOUT_OVERRIDE"):
                pytest.skip("root reads chmod 000 files, and setpriv cannot take that away here")
            this_test = f"{__file__}::test_unreadable_file_and_directory"
            result = subprocess.run(
                [setpriv, WITHOUT_OVERRIDE, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", this_test],
                cwd=ROOT,
                env={**os.environ, "DSIRE_WITHOUT_OVERRIDE": "1"},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:]
            return
        expect_error(locked, "permission denied")
        expect_error(adapter, "permission denied")
        found, errors = scan_directory(tmp_path, WEIGHT_SUFFIXES)
        assert found == [locked]  # listed: the reader says why it cannot be read
        assert "permission denied" in errors[str(adapter)]
    finally:
        adapter.chmod(0o755)


def hostile_directory(directory: Path, good: list[Path]) -> dict[str, str]:
    """Good LoRAs copied into `directory` beside hostile entries; returns {bad name: expected error}."""
    for source in good:
        (directory / source.name).write_bytes(source.read_bytes())
    torch.save({"x.lora_down.weight": Exploit()}, directory / "evil.pt")
    (directory / "evil_raw.bin").write_bytes(pickle.dumps(Exploit()))
    (directory / "evil.safetensors").write_bytes(pickle.dumps(Exploit()))
    torch.save({"x.lora_down.weight": Exploit()}, directory / "evil_zip.safetensors")
    nan = good_state()
    nan["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"][0, 0] = float("nan")
    save_state(directory / "nan.safetensors", nan)
    half = good_state()
    del half["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]
    save_state(directory / "half.safetensors", half)
    save_state(directory / "unet_full.safetensors", tiny_unet().state_dict())
    save_state(directory / "other_layers.safetensors", good_state())
    (directory / "loop_a.safetensors").symlink_to("loop_b.safetensors")
    (directory / "loop_b.safetensors").symlink_to("loop_a.safetensors")
    (directory / "dangling.safetensors").symlink_to("nowhere.safetensors")
    os.mkfifo(directory / "fifo.safetensors")
    (directory / "z_same_symlink.safetensors").symlink_to(good[0].name)
    os.link(directory / good[1].name, directory / "z_same_hardlink.safetensors")
    (directory / "notes.txt").write_text("not a LoRA: ignored")
    (directory / "sub_loop").symlink_to(".")  # a directory loop: not descended into
    return {
        "evil.pt": "refused or unreadable torch checkpoint",
        "evil_raw.bin": "refused or unreadable torch checkpoint",
        "evil.safetensors": "safetensors header",
        "evil_zip.safetensors": "over the .*-byte limit",
        "nan.safetensors": "contains NaN or Inf",
        "half.safetensors": "has a down without its up",
        "unet_full.safetensors": "no LoRA weights found",
        "other_layers.safetensors": "layers do not match the model",
        "loop_a.safetensors": "too many levels of symbolic links",
        "loop_b.safetensors": "too many levels of symbolic links",
        "dangling.safetensors": "no such file or directory",
        "fifo.safetensors": "not a regular file",
        "z_same_symlink.safetensors": f"same file as {good[0].name}",
        "z_same_hardlink.safetensors": f"same file as {good[1].name}",
    }


def test_scan_directory_names_each_bad_entry(tmp_path):
    good = sorted(ZOO.glob("*.safetensors"))[:3]
    expected = hostile_directory(tmp_path, good)
    found, errors = scan_directory(tmp_path, WEIGHT_SUFFIXES)
    listing_problems = {"loop_a", "loop_b", "dangling", "fifo", "z_same_symlink", "z_same_hardlink"}
    assert {Path(k).name for k in errors} == {f"{name}.safetensors" for name in listing_problems}
    assert {p.name for p in found} == {p.name for p in good} | (expected.keys() - {Path(k).name for k in errors})
    for key, problem in errors.items():
        assert re.search(expected[Path(key).name], problem), problem


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A DSiRe model fitted in-process on 24 bundled LoRAs (no train.py run needed)."""
    entries = from_manifest(ZOO / "manifest.csv")[:24]
    module = DSiReModule(use_faiss_gpu=False)
    items = [{"key": e.key, "n": e.n, "concept": e.concept, "lora": e.load()} for e in entries]
    module.fit(module.featurise(items))
    return save_checkpoint(module, tmp_path_factory.mktemp("model") / "dsire.safetensors")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_predict_over_a_hostile_directory(small_checkpoint, tmp_path, request):
    good = sorted(ZOO.glob("*.safetensors"))[30:33]
    expected = hostile_directory(tmp_path, good)
    request.node.user_properties.append(("inputs", len(expected)))
    result = run_script(
        "predict.py",
        f"ckpt={small_checkpoint}",
        f"lora={tmp_path}",
        "output=json",
        "allow_torch_load=true",  # the harder case: pickles reach torch.load(weights_only=True)
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert sorted(Path(row["file"]).name for row in report["predictions"]) == [p.name for p in good]
    assert all(row["predicted_n"] in range(1, 7) for row in report["predictions"])
    assert {Path(key).name for key in report["errors"]} == set(expected)
    stderr = {line.split(": ", 2)[1]: line for line in result.stderr.splitlines() if line.startswith("error: ")}
    for name, problem in expected.items():
        line = stderr[str(tmp_path / name)]
        assert re.search(problem, line), line


def test_labels_dir_bad_entries_are_per_file_errors(tmp_path):
    """A labels.csv row naming a symlink loop or a FIFO is skipped with its error, through the cache too."""
    good = sorted(ZOO.glob("*.safetensors"))[0]
    (tmp_path / "good.safetensors").write_bytes(good.read_bytes())
    (tmp_path / "loop.safetensors").symlink_to("loop.safetensors")
    os.mkfifo(tmp_path / "fifo.safetensors")
    rows = ["file,n,concept", "good.safetensors,1,a", "loop.safetensors,2,b", "fifo.safetensors,3,c", "gone,4,d"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    entries = from_labels_dir(tmp_path)
    dataset = ZooDataset(entries, SpectraCache(tmp_path / "cache", {}))
    with deadline(20):
        items = [dataset[i] for i in range(len(entries))]
    assert "lora" in items[0] and "error" not in items[0]
    assert [item.get("error") for item in items[1:]] == [
        "too many levels of symbolic links",
        "not a regular file or directory (a FIFO, socket or device?)",
        "no such file or directory",
    ]


@pytest.mark.parametrize("second", ["good.safetensors", "link.safetensors", "hard.safetensors"])
def test_labels_dir_naming_one_file_twice_is_refused(tmp_path, second):
    """One LoRA under two rows would sit in training and test splits at once."""
    (tmp_path / "good.safetensors").write_bytes(sorted(ZOO.glob("*.safetensors"))[0].read_bytes())
    (tmp_path / "link.safetensors").symlink_to("good.safetensors")
    os.link(tmp_path / "good.safetensors", tmp_path / "hard.safetensors")
    (tmp_path / "labels.csv").write_text(f"file,n,concept\ngood.safetensors,1,a\n{second},6,b\n")
    with pytest.raises(LoRAError, match=r"labels.csv: rows 1 and 2 name the same file"):
        from_labels_dir(tmp_path)


@pytest.mark.parametrize(
    "damage", ["foreign", "no order", "order not a scalar", "no shape", "torn", "hashes not a dict", "hashes torn"]
)
def test_damaged_cache_entries_are_misses(tmp_path, damage):
    """The cache promises that a torn, foreign or tampered entry is recomputed, not a crash."""
    entry = from_manifest(ZOO / "manifest.csv")[0]
    lora = entry.load()
    SpectraCache(tmp_path, {}).put(
        entry, lora_spectra(lora), {name: layer.shape for name, layer in lora.layers.items()}
    )
    [path] = tmp_path.glob("*/*.safetensors")
    tensors = load_file(str(path))
    if damage == "foreign":
        save_file({"x": torch.ones(2)}, str(path))
    elif damage == "no order":
        save_file({k: v for k, v in tensors.items() if not k.endswith("/order")}, str(path))
    elif damage == "no shape":  # an entry written before shapes were stored
        save_file({k: v for k, v in tensors.items() if not k.endswith("/shape")}, str(path))
    elif damage == "order not a scalar":
        save_file({k: v.repeat(2) if k.endswith("/order") else v for k, v in tensors.items()}, str(path))
    elif damage == "torn":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        (tmp_path / "content_hashes.json").write_text("[1, 2]" if damage == "hashes not a dict" else '{"a": ')
    cached = SpectraCache(tmp_path, {}).get(entry)
    if damage.startswith("hashes"):
        assert cached is not None and list(cached[0]) == list(lora.layers)
    else:
        assert cached is None
