"""`audit.py` end to end: the tiny membership audit and noise study, their files, and one-line errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsire.privacy.metrics import auc
from tests.conftest import ROOT, run_dir, run_job, run_script


@pytest.fixture(scope="module")
def mia_tiny(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("mia")
    result = run_job("audit.py", tmp_path, "+experiment=mia_rank_tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir(tmp_path, "mia_rank_tiny")


def test_mia_rank_tiny_headline_numbers(mia_tiny: Path) -> None:
    report = json.loads((mia_tiny / "mia.json").read_text())
    assert list(report) == ["lora_r1", "lora_fa_r4", "full", "dpsgd_full_s0.0383"]
    expected_auc = {"lora_r1": 0.618, "lora_fa_r4": 0.619, "full": 0.649, "dpsgd_full_s0.0383": 0.570}
    for config, value in expected_auc.items():
        assert report[config]["auc"] == pytest.approx(value, abs=0.02), config
        assert report[config]["test_accuracy"] == pytest.approx(0.955, abs=0.02), config
    assert report["full"]["auc_ci"][0] > 0.55  # fully fine-tuned models leak clearly even at this size
    assert report["dpsgd_full_s0.0383"]["dpsgd_epsilon"] > 100  # LoRA's noise level buys no meaningful ε
    assert set(report["full"]["attacks"]) == {"lira_online", "lira_offline", "lira_fixed_variance", "loss", "white_box"}
    assert (mia_tiny / "figures" / "mia_roc.png").is_file() and (mia_tiny / "figures" / "mia_auc_vs_rank.png").is_file()


def test_mia_scores_csv_recomputes_the_report(mia_tiny: Path) -> None:
    report = json.loads((mia_tiny / "mia.json").read_text())
    with (mia_tiny / "mia_scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 5 * 2 * 120  # configurations × attacks × targets × private examples
    for config in report:
        for attack, summary in report[config]["attacks"].items():
            chosen = [r for r in rows if r["config"] == config and r["attack"] == attack]
            scores = np.array([float(r["score"]) for r in chosen])
            members = np.array([r["member"] == "1" for r in chosen])
            assert auc(scores, members) == pytest.approx(summary["auc"], abs=1e-12)
            assert members.mean() == 0.5


def test_lora_noise_tiny_matches_the_theory(tmp_path: Path) -> None:
    result = run_job("audit.py", tmp_path, "+experiment=lora_noise_tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir(tmp_path, "lora_noise_tiny") / "noise.json").read_text())
    rows = report["per_rank"]
    assert len(rows) == 2 * 2 * 2  # steps × inits × ranks, one layer
    for row in rows:
        assert row["variance_ratio"] == pytest.approx(1.0, abs=0.15), row  # 400 draws: a loose check
    high = [r["ks_distance"] for r in rows if r["rank"] == 8]
    low = [r["ks_distance"] for r in rows if r["rank"] == 1]
    assert max(high) < min(low)  # closer to Gaussian at higher rank
    whole = report["whole_run"]["fc2"]
    assert 0 < whole["cosine"] < 1 and whole["predicted_cosine"] == pytest.approx(1 / np.sqrt(1 + (128 + 1) / 4))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("mia.shadow_models=3", "error: mia.shadow_models: 3: LiRA needs an even number ≥ 4"),
        ("finetune.rank=0", "error: finetune.rank: 0 must be at least 1"),
        ("analysis=attribution", "error: analysis: 'attribution' is not one of mia, noise"),
        ("task=image_folder", "error: task.path: image_folder needs task.path=DIR"),
        ("task.backbone.hidden=wide", "error: task.backbone.hidden: 'wide' is not an integer"),
        ("+mia.shadows=8", "error: mia.shadows: unknown setting"),
        ("noise.layers=[conv9]", "error: noise.layers: ['conv9'] are not linear layers"),
    ],
)
def test_user_mistakes_are_one_line(tmp_path: Path, override: str, message: str) -> None:
    extra = ["analysis=noise"] if override.startswith("noise.") else []
    result = run_job("audit.py", tmp_path, override, *extra, "task.pretrain.steps=5")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-500:]


@pytest.mark.fault
def test_kill_9_then_rerun_resumes_and_matches(mia_tiny: Path, tmp_path: Path) -> None:
    """kill -9 once the first configuration's records exist; the rerun trains only what is missing
    and reports exactly what an uninterrupted run reports."""
    command = [sys.executable, str(ROOT / "audit.py"), "+experiment=mia_rank_tiny", "logger=csv"]
    command += [f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/run"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = tmp_path / "cache" / "lab" / "records"
    deadline = time.monotonic() + 300
    while len(list(records.glob("*/model_*.safetensors"))) < 10 and process.poll() is None:
        assert time.monotonic() < deadline, "no records written in 300 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "run" / "mia.json").exists()
    finished = {p: p.stat().st_mtime_ns for p in records.glob("*/model_*.safetensors")}
    assert len(finished) >= 10
    result = run_script(*command[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # finished records were not retrained
    resumed = json.loads((tmp_path / "run" / "mia.json").read_text())
    assert resumed == json.loads((mia_tiny / "mia.json").read_text())


def test_ddp_shares_out_the_models_and_reports_the_same(mia_tiny: Path, tmp_path: Path) -> None:
    """lab.devices=2: two processes each train half the models; rank 0 reports what one process reports."""
    result = run_job("audit.py", tmp_path, "+experiment=mia_rank_tiny", "lab.devices=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr  # Lightning started the second process
    report = json.loads((run_dir(tmp_path, "mia_rank_tiny") / "mia.json").read_text())
    assert report == json.loads((mia_tiny / "mia.json").read_text())
    records = list((tmp_path / "cache" / "lab" / "records").glob("*/model_*.safetensors"))
    assert len(records) == 4 * 10  # every model trained once, by one of the ranks
