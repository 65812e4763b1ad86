"""`train.py` and `predict.py` end to end, run as users run them, on the bundled zoo and on parquet."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from dsire.lora import load_lora
from dsire.lora.save import save_lora
from tests.conftest import ROOT, bundled_zoo_copy, make_finetune, run_script, tiny_unet, write_lorawise

ZOO = ROOT / "data" / "zoo"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """`python train.py` with its defaults (bundled zoo, W&B logger), into a temporary run dir."""
    out = tmp_path_factory.mktemp("train")
    result = run_script(
        "train.py", f"hydra.run.dir={out}", f"paths.cache_dir={out / 'cache'}", env={"HOME": str(out / "home")}
    )  # no W&B login anywhere: must run offline, no prompt
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy" in result.stdout
    assert "spectra: 180 computed from weights, 0 from the cache" in result.stdout
    return out


def test_train_reports_metrics_and_figures(trained: Path):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert len(metrics["splits"]) == 5 and not metrics["skipped"]
    summary = metrics["summary"]
    # the README's headline figures; the run is deterministic, and one LoRA predicted otherwise moves a
    # fold-averaged rate by 1/36/5 = 0.0056, so the tolerance lets at most one through
    readme = {"accuracy": 0.689, "mae": 0.328, "regression_mae": 0.428, "coverage": 0.928, "mismatch_rate": 0.006}
    for name, value in readme.items():
        assert summary[f"{name}_mean"] == pytest.approx(value, abs=0.006), name
    assert summary["interval_width_mean"] == pytest.approx(2.02, abs=0.02)
    # model/select=auto (the default): each split's inner choice and the saved model's are reported
    assert [s["selection"]["chosen"]["answer"] for s in metrics["splits"]] == ["estimate"] * 5
    assert metrics["selection"]["chosen"]["voters"] == "delta,down,up,norms"
    expected = {"confusion_matrix.png", "per_layer_accuracy.png", "spectrum_vs_n.png"}
    assert expected <= {p.name for p in (trained / "figures").iterdir()}
    assert (trained / "dsire.safetensors").is_file()


def test_wandb_offline_run_has_the_metrics(trained: Path):
    runs = list((trained / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "expected one offline W&B run in the run directory"
    records = next(runs[0].glob("run-*.wandb")).read_bytes()  # W&B's record log, synced by `wandb sync`
    for key in (b"accuracy_mean", b"mae_mean", b"split/accuracy"):
        assert key in records
    images = {p.name.split("_")[0] for p in runs[0].rglob("*.png")}
    assert {"confusion", "per", "spectrum"} <= images, "figures were not logged to W&B"


def test_second_run_reads_no_weights(trained: Path, tmp_path):
    """Every spectrum is cached: the second run computes none from weights and gets the same metrics."""
    cache = trained / "cache"
    entries = sorted(cache.rglob("*.safetensors"))
    assert len(entries) == len(list(ZOO.glob("*.safetensors")))
    first = json.loads((trained / "metrics.json").read_text())["summary"]
    result = run_script("train.py", f"hydra.run.dir={tmp_path}", f"paths.cache_dir={cache}", "logger=csv")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"spectra: 0 computed from weights, {len(entries)} from the cache" in result.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["summary"] == first


def test_predict_same_answer_for_peft_and_kohya(trained: Path, tmp_path):
    kohya = sorted(ZOO.glob("*.safetensors"))[7]
    lora = load_lora(kohya)
    state = {}
    for name, layer in lora.layers.items():
        state[f"{name.removeprefix('unet.')}.lora_A.weight"] = layer.down
        state[f"{name.removeprefix('unet.')}.lora_B.weight"] = layer.up
    rank = next(iter(lora.layers.values())).rank
    alpha = next(iter(lora.layers.values())).alpha
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"]).to_dict()
    peft_dir = save_lora(state, tmp_path / "peft_adapter", "peft", config).parent
    answers = []
    for path in (kohya, peft_dir):
        result = run_script("predict.py", f"ckpt={trained / 'dsire.safetensors'}", f"lora={path}", "output=json")
        assert result.returncode == 0, result.stderr[-2000:]
        answers.append(json.loads(result.stdout)["predictions"][0])
    assert answers[0]["predicted_n"] == answers[1]["predicted_n"]
    assert answers[0]["vote_share"] == answers[1]["vote_share"]


def test_predict_directory_with_a_bad_file(trained: Path, tmp_path):
    for source in sorted(ZOO.glob("*.safetensors"))[:3]:
        (tmp_path / source.name).write_bytes(source.read_bytes())
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 3)
    result = run_script("predict.py", f"ckpt={trained / 'dsire.safetensors'}", f"lora={tmp_path}", "output=csv")
    assert result.returncode == 1
    assert len(result.stdout.strip().splitlines()) == 4  # header + the three good files
    assert "broken.safetensors: truncated" in result.stderr


def test_copies_in_a_zoo_are_left_out(tmp_path):
    """The same file under a second name and another concept is trained once, and reported."""
    rows = bundled_zoo_copy(tmp_path, ("m0", "m1", "m2", "m3"), (1, 3, 6))
    (tmp_path / "reupload.safetensors").write_bytes((ZOO / "m0_n3_r0_step200.safetensors").read_bytes())
    rows.append("reupload.safetensors,3,m9")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    result = run_script(
        "train.py",
        f"data.source.path={tmp_path}",
        "data.split.folds=2",
        "logger=csv",
        f"hydra.run.dir={out}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shown = "".join(result.stdout.split())  # rich wraps long paths
    assert "reupload.safetensors:thesamespectraas" in shown and "m0_n3_r0_step200.safetensors:acopy" in shown
    metrics = json.loads((out / "metrics.json").read_text())
    assert [Path(k).name for k in metrics["skipped"]] == ["reupload.safetensors"]
    tested = [Path(p[0]).name for s in metrics["splits"] for p in s["predictions"]]
    assert len(tested) == 12 and "reupload.safetensors" not in tested


def test_an_unreadable_file_changes_nothing_for_the_others(tmp_path):
    """Splits come from the readable LoRAs' concepts: a listed file that is missing (the only one of its
    concept) leaves the other concepts' folds and results as they were, and the counts say what happened."""
    rows = bundled_zoo_copy(tmp_path, ("m0", "m1", "m2", "m3"), (1, 3, 6))
    results = {}
    for label, extra in (("complete", []), ("with_missing", ["gone.safetensors,2,m9"])):
        (tmp_path / "manifest.csv").write_text("\n".join(rows + extra) + "\n")
        out = tmp_path / label
        result = run_script(
            "train.py", f"data.source.path={tmp_path}", "data.split.folds=2", "~logger", "~callbacks",
            f"hydra.run.dir={out}", f"paths.cache_dir={out / 'cache'}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        results[label] = (result.stdout, json.loads((out / "metrics.json").read_text()))
    assert "spectra: 12 computed from weights, 0 from the cache, 0 not usable" in results["complete"][0]
    assert "spectra: 12 computed from weights, 0 from the cache, 1 not usable" in results["with_missing"][0]
    complete, with_missing = results["complete"][1], results["with_missing"][1]
    assert [Path(k).name for k in with_missing["skipped"]] == ["gone.safetensors"]
    assert with_missing["splits"] == complete["splits"] and with_missing["summary"] == complete["summary"]


def test_lorawise_parquet_trains(tmp_path):
    """A parquet in the LoRA-WiSE schema goes through `datasets` and trains end to end."""
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"])
    rows = [
        (make_finetune(tiny_unet(), config, "unet", seed=10 * c + n), n, f"concept{c}")
        for c in range(4)
        for n in (1, 3, 6)
    ]
    parquet = write_lorawise(rows, tmp_path / "low_4.parquet")
    out = tmp_path / "run"
    result = run_script(
        "train.py",
        "data=lorawise",
        f"data.source.path={parquet}",
        "data.source.subset=null",
        "data.source.rank=4",
        "data.split.protocol=kfold",
        "data.split.folds=2",
        "logger=csv",
        f"hydra.run.dir={out}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["splits"]) == 2
    assert sum(len(s["predictions"]) for s in metrics["splits"]) == 12


def test_unseen_sizes_experiment(tmp_path):
    """Fit on N ∈ {1,3,5}, test on all N: on 2, 4, 6 no classifier over {1,3,5} can err by less than 1."""
    result = run_script("train.py", "+experiment=unseen_sizes", "logger=csv", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "metrics.json").read_text())["summary"]
    assert summary["regression_mae_unseen_mean"] < 1.0
    assert summary["regression_mae_between_mean"] < summary["regression_mae_beyond_mean"]  # 2, 4 vs 6
    assert abs(summary["coverage_unseen_mean"] - 0.9) <= 0.05
    assert summary["mae_seen_mean"] < summary["mae_mean"]  # the classifier is fine on the sizes it knows


ENTRY_CONFIGS = {"mia_rank": "audit", "lora_noise": "audit", "source_": "attribute", "unlearn_": "unlearn"}
"""Experiment name prefix -> the entry point's config it is for (the rest are train.py's)."""


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment: str):
    """A typo in an experiment (a key, an override, an interpolation) fails here, not in a user's run:
    each composed with the config of the entry point it is for."""
    entry = next((config for prefix, config in ENTRY_CONFIGS.items() if experiment.startswith(prefix)), "train")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(entry, overrides=[f"+experiment={experiment}", f"paths.root_dir={ROOT}"])
    assert cfg.task_name == experiment
    if entry == "train":
        assert cfg.data.source.path or cfg.data.source.kind != "manifest"
    if experiment == "unseen_sizes_wide":  # every other size of 1..9: all unseen sizes lie between trained ones
        assert list(cfg.data.train_sizes) == [1, 3, 5, 7, 9]
        assert cfg.data.source.path == str(ROOT / "data" / "zoo_wide")


@pytest.mark.parametrize(("folder", "flagged"), [("in_recipe", (0, 1)), ("lr_3x", (12, 12)), ("steps_2x", (12, 12))])
def test_recipe_mismatch_flags(trained: Path, folder: str, flagged: tuple[int, int]):
    """New concepts from the zoo's recipe pass (false-alarm rate 5%); 3x the learning rate or 2x the steps
    are flagged, every one (data/zoo_check, made by `python -m dsire.zoo`: see the README)."""
    ckpt = trained / "dsire.safetensors"
    result = run_script("predict.py", f"ckpt={ckpt}", f"lora={ROOT / 'data' / 'zoo_check' / folder}", "output=json")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)["predictions"]
    assert len(rows) == 12
    assert flagged[0] <= sum(row["recipe_mismatch"] for row in rows) <= flagged[1]
    for row in rows:  # the bundled zoo has N = 1..6: an estimate outside is marked as an extrapolation
        if abs(row["estimated_n"] - 1) > 0.01 and abs(row["estimated_n"] - 6) > 0.01:  # rounding aside
            assert row["beyond_zoo_sizes"] == (not 1 <= row["estimated_n"] <= 6)


def test_lora_of_another_base_is_refused(trained: Path, tmp_path):
    """Same layer names and rank, another width (twice the UNet's): a per-file error naming the first layer
    and both shapes, not a prediction; the zoo's own LoRA next to it is still predicted."""
    source = ZOO / "m0_n1_r0_step200.safetensors"
    (tmp_path / "ours.safetensors").write_bytes(source.read_bytes())
    tensors = {
        key: torch.cat([value, value], dim=0 if "lora_up" in key else 1) if value.dim() == 2 else value
        for key, value in load_file(source).items()
    }
    save_file(tensors, tmp_path / "wider.safetensors")
    result = run_script("predict.py", f"ckpt={trained / 'dsire.safetensors'}", f"lora={tmp_path}", "output=json")
    assert result.returncode == 1
    assert [Path(row["file"]).name for row in json.loads(result.stdout)["predictions"]] == ["ours.safetensors"]
    first = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert f"wider.safetensors: layer {first} has shape (64, 64), the model's has (32, 32)" in result.stderr


def test_predict_scores_a_labelled_set(trained: Path, tmp_path):
    """`labels=labels.csv`: accuracy, MAE, per-N accuracy and the confusion matrix, as computed by hand
    from the predictions, printed and written (new concepts of the zoo's recipe, N ∈ {1, 3, 6})."""
    folder = ROOT / "data" / "zoo_check" / "in_recipe"
    truth = {Path(r["path"]).name: int(r["n"]) for r in csv.DictReader((folder / "manifest.csv").open())}
    labels = tmp_path / "labels.csv"
    labels.write_text("file,n,concept\n" + "".join(f"{folder / f},{n},{f[:2]}\n" for f, n in truth.items()))
    result = run_script(
        "predict.py", f"ckpt={trained / 'dsire.safetensors'}", f"lora={folder}", f"labels={labels}",
        "output=json", f"evaluation_dir={tmp_path / 'eval'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    pairs = [(truth[Path(r["file"]).name], r["predicted_n"]) for r in json.loads(result.stdout)["predictions"]]
    assert len(pairs) == 12
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(sum(t == p for t, p in pairs) / 12)
    assert evaluation["mae"] == pytest.approx(sum(abs(t - p) for t, p in pairs) / 12)
    for n in (1, 3, 6):
        hits = [p == n for t, p in pairs if t == n]
        assert evaluation["per_size_accuracy"][str(n)] == pytest.approx(sum(hits) / len(hits))
    sizes = [1, 2, 3, 4, 5, 6]
    counts = [[sum(1 for t, p in pairs if (t, p) == (a, b)) for b in sizes] for a in sizes]
    assert evaluation["confusion"] == {"sizes": sizes, "counts": counts}
    table = list(csv.reader((tmp_path / "eval" / "confusion.csv").open()))
    assert table[0] == ["true_n", *(f"predicted_{s}" for s in sizes), "accuracy"]
    assert [[int(x) for x in row[:-1]] for row in table[1:]] == [[n, *counts[n - 1]] for n in (1, 3, 6)]
    assert f"accuracy {evaluation['accuracy']:.3f}, MAE {evaluation['mae']:.3f}" in result.stderr
