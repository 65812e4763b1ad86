"""User mistakes end in one `error: <key or file>: <problem>` line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dsire.data.datamodule import LoRAZooDataModule
from dsire.data.sources import from_labels_dir, from_manifest
from dsire.errors import UserError
from dsire.lora import LoRAError
from dsire.models.checkpoint import save_checkpoint
from dsire.models.features import Features, gather_features
from dsire.models.module import DSiReModule
from tests.conftest import ROOT, run_dsire, run_script

ZOO = ROOT / "data" / "zoo"
KFOLD = {"protocol": "kfold", "folds": 2, "n_train": 1, "repeats": 1, "seed": 0}


def one_error_line(result: subprocess.CompletedProcess, starts: str) -> str:
    """The run failed with exit code 2 and one `error:` line (stderr may hold library chatter, no traceback)."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {starts}"), result.stderr[-2000:]
    return errors[0]


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={ROOT}", *overrides])


# --- config values: checked when built, one message per key ---------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("num_sv", 0, "model.num_sv: 0 must be at least 1"),
        ("num_sv", -1, "model.num_sv: -1 must be at least 1"),
        ("num_sv", "x", "model.num_sv: 'x' is not an integer"),
        ("k", -1, "model.k: -1 must be at least 1"),
        ("k", 1.5, "model.k: 1.5 is not an integer"),
        ("weighting", "cosine", "model.weighting: 'cosine' is not one of uniform, distance"),
        ("normalisation", "none", "model.normalisation: 'none' is not one of global, voter, dimension, standard"),
        ("parts", ["delta", "sideways"], "model.parts[1]: 'sideways' is not one of delta, down, up, norms"),
        ("parts", [], "model.parts: []: name one or more of"),
        ("parts", ["up", "up"], "model.parts: ['up', 'up']: name one or more of"),
        ("spectra_dtype", "float16", "model.spectra_dtype: 'float16' is not one of float32, float64"),
        ("coverage", 1.5, "model.coverage: 1.5 is not in (0, 1)"),
        ("coverage", 0, "model.coverage: 0.0 is not in (0, 1)"),
        ("false_alarm", -1, "model.false_alarm: -1.0 is not in (0, 1)"),
        ("false_alarm", 1, "model.false_alarm: 1.0 is not in (0, 1)"),
        ("calibration_folds", 1, "model.calibration_folds: 1 must be at least 2"),
        ("calibration_points", 0, "model.calibration_points: 0 must be at least 1"),
        ("index_search", "efSearch=64=3", "model.index_search: 'efSearch=64=3' is not name=value"),
        ("index", "", "model.index: empty"),
    ],
)
def test_model_values_are_refused_naming_the_key(key, value, says):
    with pytest.raises(UserError) as error:
        DSiReModule(**{key: value})
    assert str(error.value).startswith(says)


def test_good_model_values_are_kept():
    module = DSiReModule(parts=["delta", "norms"], num_sv=3, k=2, coverage=0.8, index_search="efSearch=64,nprobe=2")
    assert module.config.parts == ("delta", "norms") and module.config.num_sv == 3


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"sizes": [1]}, "data.sizes"),
        ({"sizes": [2, 2]}, "data.sizes"),
        ({"train_sizes": [7]}, "data.train_sizes"),
        ({"sizes": [1, 2], "train_sizes": [1, 3]}, "data.train_sizes"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"split": KFOLD | {"folds": 1}}, "data.split.folds"),
        ({"split": KFOLD | {"protocol": "loo"}}, "data.split.protocol"),
        ({"split": KFOLD | {"repeats": 0}}, "data.split.repeats"),
        ({"split": KFOLD | {"fold": 3}}, "data.split.fold"),
        ({"source": {"kind": "zip", "path": "x"}}, "data.source.kind"),
        ({"source": {"kind": "manifest", "path": None}}, "data.source.path"),
        ({"source": {"kind": "lorawise", "path": "x", "rank": 0}}, "data.source.rank"),
    ],
)
def test_data_values_are_refused_naming_the_key(change, key):
    args = {"source": {"kind": "manifest", "path": str(ZOO)}, "split": KFOLD} | change
    with pytest.raises(UserError) as error:
        LoRAZooDataModule(**args)
    assert error.value.where == key


@pytest.mark.parametrize(
    ("change", "key", "says"),
    [
        ({"train_sizes": [1, 7]}, "data.train_sizes", "[7] not among the zoo's sizes [1, 2, 3, 4, 5, 6]"),
        ({"sizes": [5, 9]}, "data.sizes", "[9] not among the zoo's sizes"),
        ({"split": KFOLD | {"folds": 31}}, "data.split.folds", "31 folds need 31 concepts; the zoo has 30"),
        ({"split": KFOLD | {"protocol": "paper", "n_train": 30}}, "data.split.n_train", "no test concept out of 30"),
    ],
)
def test_values_the_zoo_cannot_meet_are_refused_at_setup(change, key, says):
    args = {"source": {"kind": "manifest", "path": str(ZOO)}, "split": KFOLD} | change
    datamodule = LoRAZooDataModule(**args)
    with pytest.raises(UserError, match=f"^{key}: ") as error:
        datamodule.setup()
    assert says in error.value.problem


def test_labels_dir_without_a_path_names_the_key():
    """`data=labels_dir` without `data.source.path` used to fall back to the bundled zoo's path."""
    cfg = compose_train("data=labels_dir")
    with pytest.raises(Exception) as error:
        instantiate(cfg.data)
    cause = error.value.__cause__ or error.value
    assert isinstance(cause, UserError) and cause.where == "data.source.path"


def test_sd15_experiment_reads_the_folder_the_sd15_zoo_writes():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        zoo = compose("zoo_sweep", overrides=[f"paths.root_dir={ROOT}", "zoo=sd15"]).zoo
    assert compose_train("+experiment=sd15").data.source.path == zoo.out_dir


# --- labels.csv and manifest rows ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "says"),
    [
        ("file,size,concept\na.safetensors,1,c\n", "missing columns n; expected a CSV with columns file, n, concept"),
        ("file,n,concept\n", "no rows"),
        (
            "file,n,concept\na.safetensors,1,c\nb.safetensors,one,c\n",
            "line 3: n must be a whole number >= 1, got 'one'",
        ),
        ("file,n,concept\na.safetensors,2.5,c\n", "line 2: n must be a whole number >= 1, got '2.5'"),
        ("file,n,concept\na.safetensors,0,c\n", "line 2: n must be a whole number >= 1, got '0'"),
        ("file,n,concept\na.safetensors,-3,c\n", "line 2: n must be a whole number >= 1, got '-3'"),
        ("file,n,concept\na.safetensors,3, \n", "line 2: concept is empty"),
        ("file,n,concept\na.safetensors,3\n", "line 2: concept is empty"),
    ],
)
def test_labels_rows_are_checked_naming_file_and_line(tmp_path, rows, says):
    (tmp_path / "labels.csv").write_text(rows)
    with pytest.raises(LoRAError) as error:
        from_labels_dir(tmp_path)
    assert error.value.path == str(tmp_path / "labels.csv") and says in error.value.problem


def test_manifest_rows_are_checked_too(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,n,concept\na.safetensors,0,c\n")
    with pytest.raises(LoRAError, match="line 2: n must be a whole number >= 1"):
        from_manifest(tmp_path / "manifest.csv")


def test_a_manifest_with_several_snapshots_gives_one_step(tmp_path):
    """Snapshots of different steps are different recipes: never mixed, the last by default."""
    rows = "".join(f"s{step}_n{n}.safetensors,{n},c,{step}\n" for step in (100, 200) for n in (1, 2))
    (tmp_path / "manifest.csv").write_text("path,n,concept,step\n" + rows)
    last, first = from_manifest(tmp_path / "manifest.csv"), from_manifest(tmp_path / "manifest.csv", 100)
    assert [Path(e.path).name for e in last] == ["s200_n1.safetensors", "s200_n2.safetensors"]
    assert [Path(e.path).name for e in first] == ["s100_n1.safetensors", "s100_n2.safetensors"]
    with pytest.raises(UserError, match=r"data.source.step: 150 is not among .* snapshot steps \[100, 200\]"):
        from_manifest(tmp_path / "manifest.csv", 150)


# --- entry points, run as users run them ---------------------------------------------------------


def test_predict_without_ckpt():
    one_error_line(run_script("predict.py", "lora=x"), "ckpt: missing")


@pytest.mark.parametrize(
    ("options", "starts"),
    [(["output=xml"], "output: 'xml' is not allowed"), (["output_file=o.txt"], "output_file: the table is for")],
)
def test_predict_refuses_options_it_would_ignore(options, starts):
    one_error_line(run_script("predict.py", "ckpt=x", "lora=y", *options), starts)


def test_train_from_another_directory_resolves_paths_from_the_project(tmp_path):
    """The wide zoo is not bundled: the error names the key, the path under the project root and the command
    that builds it; nothing is left in the directory the run was started from."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "DSIRE_"))}
    env["PYTHONPATH"] = str(ROOT)
    outputs = [f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "+experiment=unseen_sizes_wide", "logger=csv", *outputs],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    line = one_error_line(result, f"data.source.path: {ROOT / 'data' / 'zoo_wide'} does not exist")
    assert "make the zoo with: python -m dsire.zoo zoo=tiny zoo.data.pool_size=9" in line
    assert list(cwd.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_options_on_a_cpu_machine(tmp_path):
    result = run_script("train.py", "+experiment=sd15", f"hydra.run.dir={tmp_path}")
    one_error_line(result, "trainer.accelerator: 'gpu', but this machine has no CUDA device")
    one_error_line(run_dsire("inspect", str(next(ZOO.glob("*.safetensors"))), "--device", "cuda"), "--device: 'cuda'")


def test_lorawise_without_network(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # what a machine without network sees, at once
    result = run_script(
        "train.py", "+experiment=lorawise_low_32", "logger=csv", f"hydra.run.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}", env=env,
    )  # fmt: skip
    line = one_error_line(result, "data.source.path: cannot get the Hugging Face dataset MoSalama98/LoRA-WiSE")
    assert "give a local copy of its parquet files" in line


def test_lorawise_with_the_hub_unreachable(tmp_path):
    """No offline setting, and the Hub's host refuses: one line at once, not huggingface_hub's retries."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # the discard port: nothing listens there
    result = run_script(
        "train.py", "+experiment=lorawise_low_32", "logger=csv", f"hydra.run.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}", env=env,
    )  # fmt: skip
    line = one_error_line(result, "data.source.path: cannot get the Hugging Face dataset MoSalama98/LoRA-WiSE")
    assert "127.0.0.1:9 does not answer" in line and "HF_HUB_OFFLINE=1" in line


def test_bad_labels_csv_in_a_run(tmp_path):
    (tmp_path / "labels.csv").write_text("file,n,concept\na.safetensors,one,c\n")
    result = run_script("train.py", "data=labels_dir", f"data.source.path={tmp_path}", "logger=csv",
                        f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    one_error_line(result, f"{tmp_path / 'labels.csv'}: line 2: n must be a whole number >= 1, got 'one'")


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A model of 4 bundled concepts × N ∈ {1, 3, 6}, fitted in-process (quicker than `train.py`)."""
    source = {"kind": "manifest", "path": str(ZOO)}
    datamodule = LoRAZooDataModule(source, KFOLD, sizes=[1, 3, 6])
    datamodule.setup()
    datamodule.entries = [e for e in datamodule.entries if e.concept in ("m0", "m1", "m2", "m3")]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    features = gather_features(Features.concat(trainer.predict(DSiReModule(), datamodule.predict_dataloader())))
    return save_checkpoint(DSiReModule().fit(features), tmp_path_factory.mktemp("ckpt") / "model.safetensors")


def test_predict_output_file_creates_its_folder(small_checkpoint, tmp_path):
    out = tmp_path / "new" / "folder" / "o.csv"
    lora = ZOO / "m5_n3_r0_step200.safetensors"
    result = run_script("predict.py", f"ckpt={small_checkpoint}", f"lora={lora}", "output=csv", f"output_file={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("file,predicted_n,") and lines[1].startswith(f"{lora},")
    assert [p.name for p in out.parent.iterdir()] == ["o.csv"]  # no temporary file left


def test_checkpoint_with_a_flipped_tensor_byte_is_refused(small_checkpoint, tmp_path):
    raw = bytearray(small_checkpoint.read_bytes())
    raw[-5] ^= 0x01  # inside the last tensor's data: the structure is intact
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(raw))
    result = run_script("predict.py", f"ckpt={damaged}", f"lora={ZOO / 'm5_n3_r0_step200.safetensors'}")
    one_error_line(result, f"{damaged}: not a valid DSiRe checkpoint")
    assert "content hash differs" in result.stderr


def test_readme_index_search_examples_parse():
    """Every `model.index_search` override the README shows parses (shell quoting removed) and is accepted."""
    readme = (ROOT / "README.md").read_text()
    examples = re.findall(r"`([^`]*model\.index_search[^`]*)`", readme)
    assert examples
    for example in examples:
        overrides = [o for o in shlex.split(example) if o.startswith("model.index_search")]
        cfg = compose_train(*overrides)
        assert cfg.model.index_search == "efSearch=64"
        DSiReModule(index_search=cfg.model.index_search)


def test_zoo_sweep_without_its_base_model(tmp_path):
    outputs = [f"zoo.out_dir={tmp_path / 'zoo'}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(
        [sys.executable, "-m", "dsire.zoo", "zoo=sd15", f"zoo.base.path={tmp_path / 'none'}", *outputs],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("DSIRE_")} | {"PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    one_error_line(result, "zoo.base.path: Stable Diffusion 1.5 not found")
