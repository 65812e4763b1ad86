"""The zoo generator: reproducible entries, seed policy, resume after kill -9, true kohya alpha."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from peft.utils import get_peft_model_state_dict
from rich.console import Console
from safetensors.torch import load_file

from dsire.errors import UserError
from dsire.lora import load_lora
from dsire.zoo.finetune import ADAPTER, add_lora
from dsire.zoo.manifest import COLUMNS, read_manifest, write_manifest
from dsire.zoo.plan import plan
from dsire.zoo.quality import vote
from dsire.zoo.recipes import load_base
from dsire.zoo.seeds import model_seed
from dsire.zoo.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "data" / "zoo"


def zoo_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("zoo_sweep", overrides=[f"paths.root_dir={ROOT}", *overrides])


def test_regenerated_entries_match_the_bundled_zoo(tmp_path):
    """Two bundled checkpoints, trained again from the bundled base (one thread, fixed seeds, deterministic
    algorithms), match the bundled files: per tensor, ‖ours − bundled‖ ≤ 1e-3 ‖bundled‖ (fp16 storage;
    on the machine that made the zoo they are bitwise equal, the slack is for other CPUs' kernels)."""
    cfg = zoo_config(f"zoo.out_dir={tmp_path}", "zoo.data.concepts=[m3]", "zoo.sizes=[1,5]")
    rows = run_sweep(cfg.zoo, workers=1, console=Console(quiet=True))
    bundled_rows = {row["path"]: row for row in read_manifest(BUNDLED)}
    assert len(rows) == 2
    for row in rows:
        assert {k: v for k, v in row.items() if k != "seconds"} == {
            k: v for k, v in bundled_rows[row["path"]].items() if k != "seconds"
        }
        ours, bundled = load_file(str(tmp_path / row["path"])), load_file(str(BUNDLED / row["path"]))
        assert ours.keys() == bundled.keys()
        for key in ours:
            error = torch.linalg.vector_norm(ours[key].float() - bundled[key].float())
            assert error <= 1e-3 * torch.linalg.vector_norm(bundled[key].float()), key


def test_seeds_are_never_a_function_of_n():
    """The seed policy never sees N: the plan's seeds do not change when the sizes do."""
    assert "n" not in inspect.signature(model_seed).parameters
    cfg = zoo_config()
    concepts = [f"m{k}" for k in range(30)]
    fixed = plan(cfg.zoo, concepts)
    assert {job.seed for job in fixed} == {cfg.zoo.seeds.zoo_seed}  # one init for the whole zoo
    cfg.zoo.sizes = [6, 3]
    assert {job.seed for job in plan(cfg.zoo, concepts)} == {cfg.zoo.seeds.zoo_seed}
    cfg.zoo.seeds.policy = "per_model"
    per_model = plan(cfg.zoo, concepts)
    assert len({job.seed for job in per_model}) == len(per_model)  # independent: no size class shares an init


def test_default_policy_gives_every_n_the_same_a_init():
    """Under the fixed policy the LoRA A-initialisation of a concept is the same for every N."""
    cfg = zoo_config()
    base = load_base(cfg.zoo)
    inits = []
    for job in plan(cfg.zoo, ["m0"]):
        add_lora(base.unet, cfg.zoo.lora, job.seed)
        inits.append({k: v.clone() for k, v in get_peft_model_state_dict(base.unet, adapter_name=ADAPTER).items()})
        base.unet.delete_adapters(ADAPTER)
    assert len(inits) == len(cfg.zoo.sizes)
    for init in inits[1:]:
        assert init.keys() == inits[0].keys()
        assert all(torch.equal(init[k], inits[0][k]) for k in init)


def test_a_zoo_directory_holds_one_recipe(tmp_path):
    """Resuming into a zoo made with another recipe is refused, not silently mixed."""
    write_manifest(tmp_path, [dict.fromkeys(COLUMNS, "0") | {"path": "x", "recipe_hash": "another"}])
    cfg = zoo_config(f"zoo.out_dir={tmp_path}", "zoo.data.concepts=[m0]", "zoo.sizes=[1]")
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises(UserError, match=r"^zoo\.out_dir: .*another"):
            run_sweep(cfg.zoo, workers=1, console=Console(quiet=True))
        assert torch.get_num_threads() == 3  # the sweep's one thread is its own, not its caller's
    finally:
        torch.set_num_threads(threads)


def test_sd15_ranges_are_lorawise_ranges():
    sizes = {r: list(zoo_config("zoo=sd15", f"zoo.range={r}").zoo.sizes) for r in ("low", "medium", "high")}
    assert sizes == {"low": [1, 2, 3, 4, 5, 6], "medium": [1, 10, 20, 30, 40, 50], "high": [1, 10, 100, 500, 1000]}


def test_sd15_recipe_needs_a_local_model():
    cfg = zoo_config("zoo=sd15", "zoo.base.path=/nonexistent/sd15")
    with pytest.raises(UserError, match=r"^zoo\.base\.path: Stable Diffusion 1\.5 not found"):
        load_base(cfg.zoo)


def wait_for_rows(manifest: Path, rows: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if manifest.is_file() and len(manifest.read_text().splitlines()) > rows:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{manifest} did not reach {rows} rows")


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie nobody reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.fault
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_then_resume(tmp_path):
    """kill -9 of the sweep process mid-way (its two workers die with it), then the same command again."""
    out = tmp_path / "zoo"
    args = [
        sys.executable,
        "-m",
        "dsire.zoo",
        f"zoo.out_dir={out}",
        "zoo.data.concepts=[m0,m7]",
        "zoo.sizes=[1,2]",
        "zoo.lora.alpha=4",
        "workers=2",
        f"paths.root_dir={ROOT}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:
        sweep = subprocess.Popen(args, env=env, stdout=log, stderr=log)
        wait_for_rows(out / "manifest.csv", 2, timeout=180)
        workers = children(sweep.pid)
        sweep.kill()
        sweep.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers), "pool workers outlived the killed sweep"

    done = read_manifest(out)
    assert 2 <= len(done) < 4
    before = {row["path"]: (out / row["path"]).stat().st_mtime_ns for row in done}
    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]

    rows = read_manifest(out)
    assert list(rows[0]) == list(COLUMNS)
    assert sorted((r["concept"], int(r["n"])) for r in rows) == [(c, n) for c in ("m0", "m7") for n in (1, 2)]
    assert all((out / path).stat().st_mtime_ns == mtime for path, mtime in before.items())  # not redone
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    for row in rows:
        lora = load_lora(out / row["path"])
        assert lora.format == "kohya"
        assert {layer.alpha for layer in lora.layers.values()} == {4.0}  # the true alpha, not the rank
        assert {layer.scale for layer in lora.layers.values()} == {0.5}
        assert lora.metadata["dsire_n"] == row["n"] and lora.metadata["dsire_concept"] == row["concept"]
        assert lora.metadata["dsire_seed"] == row["seed"] == "0"


def test_vote_is_majority_with_ties_to_the_smaller_summed_distance_then_smallest_n():
    """The documented tie rule, in cases the old one (ties to the smaller N) gets wrong. Features 0..10
    normalise to 0..1; the zoo has N = 1 at 0 and N = 6 at 10 in both voters."""
    train = {"a": np.array([[0.0], [10.0]], np.float32), "b": np.array([[0.0], [10.0]], np.float32)}
    test = {
        "a": np.array([[1.0], [3.0], [0.5], [8.0]], np.float32),
        "b": np.array([[9.0], [9.0], [7.0], [9.0]], np.float32),
    }
    # 1: a votes 1 at 0.1, b votes 6 at 0.1: equal distances, the smaller N wins
    # 2: a votes 1 at 0.3, b votes 6 at 0.1: 6 is nearer and wins (the old rule said 1)
    # 3: a votes 1 at 0.05, b votes 6 at 0.3: 1 is nearer and wins
    # 4: both vote 6: a majority
    assert vote(train, np.array([1, 6]), test).tolist() == [1, 6, 1, 6]
