"""Exact unlearning: clustering and routing, forget ≡ retrain bit for bit, receipts, kill -9, bad ids."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dsire.errors import UserError
from dsire.hashing import file_sha256
from dsire.lab.build import Lab, build_lab
from dsire.lab.methods import FinetuneSettings, adapt
from dsire.lab.prompts import PadPrompted
from dsire.unlearn import read_ids, unlearn
from dsire.unlearning.adapters import deterministic, fit, forget, predict_logits
from dsire.unlearning.clusters import ClusterSettings, fit_prototypes, merge_small, route
from dsire.unlearning.evaluation import EvaluationSettings, deletion_sets
from dsire.unlearning.membership import ATTACKS, GROUPS, MembershipSettings, audit_forget
from dsire.unlearning.model import UnlearnableModel, load_model, save_model
from tests.conftest import ROOT, run_script


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("unlearning_cache")


def run_unlearn(cache: Path, run: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_script("unlearn.py", f"paths.cache_dir={cache}", f"hydra.run.dir={run}", "logger=csv", *overrides)


@pytest.fixture(scope="module")
def fitted(cache: Path, tmp_path_factory) -> Path:
    """The tiny experiment fitted through the command line: its run directory."""
    run = tmp_path_factory.mktemp("fit")
    result = run_unlearn(cache, run, "+experiment=unlearn_tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def config(*overrides: str) -> DictConfig:
    """unlearn.py's config in this process (the job then runs without a subprocess's start-up)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("unlearn", overrides=["logger=csv", *overrides])


@pytest.fixture(scope="module")
def lab(cache: Path, fitted: Path) -> Lab:
    """The tiny experiment's lab in this process (its backbone read from the cache the fit wrote)."""
    return build_lab(config("+experiment=unlearn_tiny", f"paths.cache_dir={cache}", "paths.output_dir=."))


def test_tiny_fit_headline_numbers(fitted: Path) -> None:
    report = json.loads((fitted / "fit.json").read_text())
    assert report["members"] == {"0": 69, "1": 27, "2": 12, "3": 12}  # 120 private digits, public prototypes
    assert report["test_accuracy"] == pytest.approx(0.9583, abs=0.006)
    assert report["parameters_per_cluster"] == 2 * (64 + 128) + 2 * (128 + 128) + 128 * 10 + 10  # LoRA r=2 + head
    assert report["parameters_backbone"] == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10


def test_prototypes_are_the_centroids_of_average_linkage_clusters() -> None:
    blobs = [torch.tensor([0.0, 0.0]), torch.tensor([10.0, 0.0]), torch.tensor([0.0, 10.0])]
    offsets = torch.tensor([[0.1, 0.0], [-0.1, 0.2], [0.0, -0.3]], dtype=torch.float64)
    points = torch.cat([b.double() + offsets for b in blobs])
    prototypes = fit_prototypes(points, ClusterSettings(n_clusters=3))
    expected = torch.stack([b.double() + offsets.mean(0) for b in blobs])
    assert sorted(prototypes.tolist()) == sorted(expected.tolist())
    for settings in (
        ClusterSettings(n_clusters=None, distance_threshold=5.0),
        ClusterSettings(n_clusters=None, adaptive_quantile=0.2),
    ):
        assert len(fit_prototypes(points, settings)) == 3  # within-blob distances < 1, between-blob ≥ 10
    assert len(fit_prototypes(points, ClusterSettings(n_clusters=None, adaptive_quantile=0.9))) == 1


def test_routing_picks_the_nearest_living_prototype() -> None:
    prototypes = torch.tensor([[0.0, 0.0], [4.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    points = torch.tensor([[1.0, 0.0], [2.0, 0.0], [9.0, 0.0], [6.0, 0.0]], dtype=torch.float64)
    assert route(points, prototypes, [0, 1, 2]).tolist() == [0, 0, 2, 1]  # a tie (2.0) goes to the lower index
    assert route(points, prototypes, [0, 2]).tolist() == [0, 0, 2, 2]  # cluster 1 removed: next nearest
    assert route(points, prototypes, []).tolist() == [-1] * 4  # nothing left: the public backbone


def test_small_clusters_merge_smallest_first_into_the_nearest_served_prototype() -> None:
    prototypes = torch.tensor([[0.0], [1.0], [5.0], [6.0], [20.0]], dtype=torch.float64)
    nearest = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 4, 4])  # sizes 3, 1, 4, 0, 2
    assert merge_small(nearest, prototypes, 1) == [0, 1, 2, -1, 4]  # only the empty one goes
    assert merge_small(nearest, prototypes, 2) == [0, 0, 2, -1, 4]  # 1 -> 0 (distance 1, not 4)
    assert merge_small(nearest, prototypes, 3) == [0, 0, 2, -1, 2]  # then 4 -> 2: prototype 3 serves no one
    assert merge_small(nearest, prototypes, 5) == [2, 2, 2, -1, 2]  # and 0 (4 < 5) -> 2, its nearest served
    assert merge_small(nearest, prototypes, 11) == [2, 2, 2, -1, 2]  # one cluster left, however small
    assert merge_small(torch.tensor([], dtype=torch.long), prototypes, 3) == [-1] * 5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"n_clusters": 4, "adaptive_quantile": 0.5}, "set exactly one of"),
        ({"min_size": 0}, "0 must be ≥ 1"),
        ({"n_clusters": 0}, "0 must be ≥ 1"),
        ({"n_clusters": None, "adaptive_quantile": 1.5}, "1.5 is not in (0, 1)"),
    ],
)
def test_clustering_settings_are_checked(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ClusterSettings(**values)


def same_model(a: UnlearnableModel, b: UnlearnableModel, tmp_path: Path) -> bool:
    """Bit for bit: the two models' files are the same bytes."""
    save_model(a, tmp_path / "a.safetensors")
    save_model(b, tmp_path / "b.safetensors")
    return file_sha256(tmp_path / "a.safetensors") == file_sha256(tmp_path / "b.safetensors")


def test_forget_equals_retrain_bitwise(lab: Lab, fitted: Path, tmp_path: Path) -> None:
    model = load_model(fitted / "model.safetensors")
    clustering = ClusterSettings(**model.config["unlearning"]["clustering"])
    single = ["digits/56"]
    batch = ["digits/90", *model.members[3], model.members[1][0]]  # two clusters touched, cluster 3 emptied
    for request in (single, batch):
        with deterministic():
            result = forget(model, lab, clustering, request)
            retrained = fit(lab, clustering, model.config, set(request))
        assert same_model(result.model, retrained, tmp_path)
        untouched = set(model.alive) - set(result.retrained) - set(result.removed)
        for cluster in untouched:  # the other clusters are the very same tensors, not retrained
            assert all(result.model.states[cluster][n] is t for n, t in model.states[cluster].items())
        for cluster in result.retrained:
            assert not torch.equal(
                result.model.states[cluster]["base_model.model.head.weight"],
                model.states[cluster]["base_model.model.head.weight"],
            )
    assert (result.retrained, result.removed) == ([0, 1], [3])
    assert 3 not in result.model.alive and result.examples_reprocessed == 68 + 26
    logits = predict_logits(result.model, lab, lab.task.test)
    assert torch.isfinite(logits).all() and len(logits) == len(lab.task.test)


def test_pad_prompt_adapters_forget_equals_retrain_bitwise(lab: Lab, tmp_path: Path) -> None:
    """The paper's adapter: a learnable 2-pixel border of the 8×8 input plus a head per cluster."""
    pad = dataclasses.replace(lab, finetune=FinetuneSettings(method="pad_prompt", pad=2, steps=5, batch_size=8))
    clustering = ClusterSettings(n_clusters=4)
    config = {"finetune": dataclasses.asdict(pad.finetune)}
    with deterministic():
        model = fit(pad, clustering, config)
        result = forget(model, pad, clustering, ["digits/56"])
        retrained = fit(pad, clustering, config, {"digits/56"})
    assert same_model(result.model, retrained, tmp_path) and len(result.retrained) == 1
    (cluster,) = result.retrained
    strips = {"pad_top": (1, 2, 8), "pad_bottom": (1, 2, 8), "pad_left": (1, 4, 2), "pad_right": (1, 4, 2)}
    state = result.model.states[cluster]
    assert {n: tuple(state[n].shape) for n in strips} == strips and all(state[n].any() for n in strips)
    assert set(state) - set(strips) == {"backbone.head.weight", "backbone.head.bias"}
    assert result.model.adapter_parameters(cluster) == 2 * 16 + 2 * 8 + 128 * 10 + 10
    assert not torch.equal(state["pad_top"], model.states[cluster]["pad_top"])


def test_a_pad_prompt_changes_only_the_border() -> None:
    prompted = PadPrompted(torch.nn.Identity(), (3, 224, 224), 30)  # the paper's ViT-B/16 input and border
    assert sum(p.numel() for p in prompted.parameters()) == 3 * (2 * 30 * 224 + 2 * 30 * 164)
    for parameter in prompted.parameters():
        torch.nn.init.normal_(parameter)
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(prompted(x)[..., 30:-30, 30:-30], x[..., 30:-30, 30:-30])
    border = prompted(torch.zeros(1, 3, 224, 224))[0]
    assert torch.equal(border[:, :30], prompted.pad_top) and torch.equal(border[:, -30:], prompted.pad_bottom)
    assert torch.equal(border[:, 30:-30, :30], prompted.pad_left)
    assert torch.equal(border[:, 30:-30, -30:], prompted.pad_right)
    with pytest.raises(UserError, match=r"finetune\.pad: 4: a border must leave an inside on 8×8 images"):
        PadPrompted(torch.nn.Identity(), (1, 8, 8), 4)
    with pytest.raises(UserError, match=r"finetune\.method: pad_prompt is a per-cluster adapter of unlearn\.py only"):
        adapt(torch.nn.Linear(2, 2), FinetuneSettings(method="pad_prompt"), seed=0)


def test_forget_below_the_minimum_size_merges_and_still_equals_retrain(lab: Lab, fitted: Path, tmp_path: Path) -> None:
    """Cluster 3 (12 members) falls to 11 < 12: it merges into its neighbour, which alone retrains."""
    model = load_model(fitted / "model.safetensors")
    settings = {**model.config["unlearning"]["clustering"], "min_size": 12}
    clustering = ClusterSettings(**settings)
    # no cluster is below 12 at fit time, so the fitted adapters are those of min_size 12
    model = dataclasses.replace(model, config={**model.config, "unlearning": {"clustering": settings}})
    request = [model.members[3][0]]
    with deterministic():
        result = forget(model, lab, clustering, request)
        retrained = fit(lab, clustering, model.config, set(request))
    assert same_model(result.model, retrained, tmp_path)
    (target,) = result.retrained
    assert result.removed == [3] and result.model.owner == [0, 1, 2, 0] and target == 0  # prototype 0 is nearest 3
    assert result.model.members[target] == sorted(
        model.members[target] + model.members[3][1:], key=lab.task.private.ids.index
    )
    assert result.examples_reprocessed == 69 + 11


def test_forget_everything_falls_back_to_the_public_backbone(lab: Lab, fitted: Path, tmp_path: Path) -> None:
    model = load_model(fitted / "model.safetensors")
    clustering = ClusterSettings(**model.config["unlearning"]["clustering"])
    everything = [e for ids in model.members.values() for e in ids]
    empty = forget(model, lab, clustering, everything).model
    assert empty.alive == [] and empty.forgotten == sorted(everything)
    with torch.no_grad():
        assert torch.equal(
            predict_logits(empty, lab, lab.task.test), lab.backbone(lab.task.test.take(torch.arange(360)))
        )
    again = forget(model, lab, clustering, [])
    assert again.retrained == [] and same_model(again.model, model, tmp_path)


def test_ids_are_ids_or_unique_file_names(lab: Lab, tmp_path: Path) -> None:
    ids = lab.task.private.ids
    request = tmp_path / "ids.csv"
    request.write_text(f"example\n{ids[0]}\n{ids[0]}\n{Path(ids[1]).name}\n")
    assert read_ids(request, ids) == [ids[0], ids[0], ids[1]]
    request.write_text("example\ndigits/99999\n")
    with pytest.raises(UserError, match="line 2: 'digits/99999' is not a private example"):
        read_ids(request, ids)
    request.write_text("id\ndigits/1\n")
    with pytest.raises(UserError, match="no `example` column"):
        read_ids(request, ids)
    request.write_text("example\nx.png\n")
    with pytest.raises(UserError, match=r"'x\.png' names 2 private examples; give its id"):
        read_ids(request, ["a/x.png", "b/x.png"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["forget=ids.csv"], "forget: needs ckpt=MODEL"),
        (["ckpt=nowhere.safetensors", "forget=ids.csv"], "ckpt: nowhere.safetensors is not a file"),
        (["mode=erase"], "mode: 'erase' is not one of forget, retrain"),
        (["unlearning.clustering.adaptive_quantile=0.5"], "unlearning.clustering.n_clusters: set exactly one of"),
        (["evaluation={fractions:[0.5,1.5]}"], "evaluation.fractions: [0.5, 1.5]: each in (0, 1)"),
        (["membership={shadow_models:3}"], "membership.shadow_models: 3: LiRA needs an even number ≥ 4"),
    ],
)
def test_user_mistakes_name_their_key(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as error:
        unlearn(config(*overrides, f"paths.cache_dir={tmp_path}", f"paths.output_dir={tmp_path}"))
    assert str(error.value).startswith(message)


def test_unknown_id_names_the_file_and_line(cache: Path, fitted: Path, tmp_path: Path) -> None:
    request = tmp_path / "forget.csv"
    request.write_text("example\ndigits/56\ndigits/0\n")  # digits/0 is a public example
    overrides = (f"ckpt={fitted / 'model.safetensors'}", f"forget={request}", f"paths.cache_dir={cache}")
    with pytest.raises(UserError) as error:
        unlearn(config(*overrides, f"paths.output_dir={tmp_path}"))
    assert str(error.value) == f"{request}: line 3: 'digits/0' is not a private example of the model's task"
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.fault
def test_forget_killed_then_rerun_writes_the_retrained_model_and_its_receipt(
    cache: Path, fitted: Path, tmp_path: Path
) -> None:
    """Forget in place (out=ckpt), killed with -9 while it retrains: the old file is whole. The rerun
    completes, its receipt says what happened, and `mode=retrain` writes the same bytes."""
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(fitted / "model.safetensors", ckpt)
    before = file_sha256(ckpt)
    request = tmp_path / "forget.csv"
    request.write_text("example\ndigits/56\ndigits/56\n90\ndigits/48\n")  # a duplicate, a file name; 2 clusters
    arguments = [f"ckpt={ckpt}", f"forget={request}", f"out={ckpt}", "logger=csv", f"paths.cache_dir={cache}"]
    command = [sys.executable, str(ROOT / "unlearn.py"), *arguments, f"hydra.run.dir={tmp_path / 'run'}"]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "run" / "unlearn.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and "training cluster" in log.read_text()) and process.poll() is None:
        assert time.monotonic() < deadline, "forget did not start training in 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert file_sha256(ckpt) == before and load_model(ckpt).forgotten == []
    rerun = run_unlearn(cache, tmp_path / "rerun", *arguments[:3])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not list(tmp_path.glob(".*.tmp"))
    receipt = json.loads((tmp_path / "receipt.json").read_text())  # beside the new model
    assert receipt["old_model_sha256"] == before and receipt["new_model_sha256"] == file_sha256(ckpt)
    assert receipt["examples_forgotten"] == ["digits/56", "digits/90", "digits/48"]
    assert load_model(ckpt).forgotten == sorted(receipt["examples_forgotten"])
    assert receipt["duplicates_ignored"] == 1 and receipt["already_forgotten"] == []
    per_cluster = 2 * (64 + 128) + 2 * (128 + 128) + 128 * 10 + 10
    assert receipt["clusters_retrained"] == [0, 1] and receipt["clusters_removed"] == []
    assert receipt["parameters_retrained"] == 2 * per_cluster
    assert receipt["parameters_total"] == 4 * per_cluster + 26122
    assert receipt["examples_reprocessed"] == 67 + 26  # clusters 0 and 1 (69 and 27 members) less the forgotten
    retrain = (f"ckpt={fitted / 'model.safetensors'}", f"forget={request}", "mode=retrain", f"paths.cache_dir={cache}")
    full = unlearn(config(*retrain, f"paths.output_dir={tmp_path / 'retrain'}"))
    assert full["new_model_sha256"] == receipt["new_model_sha256"]
    assert full["clusters_retrained"] == [0, 1, 2, 3] and full["examples_reprocessed"] == 117
    assert full["test_accuracy"] == receipt["test_accuracy"]


def test_deletion_sets_are_seeded_random_samples_and_whole_classes(lab: Lab) -> None:
    settings = EvaluationSettings(fractions=(0.1, 0.5), seed=3)
    sets = deletion_sets(lab, settings)
    assert [kind for kind, _ in sets] == ["random", "class", "random", "class"]
    ids, labels = lab.task.private.ids, lab.task.private.labels.tolist()
    assert len(sets[0][1]) == 12 and len(sets[2][1]) == 60 and set(sets[0][1]) <= set(ids)
    for (_, chosen), classes in ((sets[1], 1), (sets[3], 5)):
        gone = {labels[ids.index(e)] for e in chosen}
        assert len(gone) == classes and chosen == [e for e, y in zip(ids, labels, strict=True) if y in gone]
    assert deletion_sets(lab, settings) == sets and deletion_sets(lab, EvaluationSettings(seed=4))[0] != sets[0]


def test_lira_audit_of_a_forget_request(lab: Lab, fitted: Path) -> None:
    """The audit's forget equals a retrain, so the forgotten score like never-seen examples by construction:
    here the tiny recipe's headline AUCs are pinned (a regression in the shadows or the attacks moves them)."""
    model = load_model(fitted / "model.safetensors")
    clustering = ClusterSettings(**model.config["unlearning"]["clustering"])
    with deterministic():
        report = audit_forget(lab, clustering, model.config, MembershipSettings(shadow_models=4, resamples=100))
    assert report["examples"] == {"never_seen": 12, "forgotten": 12, "remaining": 96}
    assert report["shadow_models"] == 4
    assert {k for k in report if k.count("/") == 2} == {
        f"{a}/{g}/{m}" for a in ATTACKS for g in GROUPS for m in ("before", "after")
    }
    for key, cell in report.items():
        if key.count("/") == 2:
            assert cell["auc_ci"][0] <= cell["auc"] <= cell["auc_ci"][1], key
    pinned = {  # 12 forgotten and 12 never-seen digits: wide intervals, the tiny recipe barely leaks
        "lira_online/forgotten/before": 0.5625,
        "lira_online/remaining/before": 0.4592,
        "lira_online/forgotten/after": 0.5417,
        "loss/forgotten/after": 0.4931,
        "white_box/remaining/after": 0.5790,
    }
    assert {k: round(report[k]["auc"], 4) for k in pinned} == pytest.approx(pinned, abs=0.01)
    assert report["lira_online/remaining/after"]["auc"] == pytest.approx(0.4601, abs=0.01)  # R keeps its score
