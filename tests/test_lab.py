"""The fine-tuning lab: ensembles train each model exactly as alone, records resume, settings fail clearly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from dsire.errors import UserError
from dsire.lab import train as lab_train
from dsire.lab.backbones import BackboneSettings, build_backbone
from dsire.lab.data import TaskSettings, load_task, split_examples
from dsire.lab.ensemble import Ensemble, batch_indices, train
from dsire.lab.methods import FinetuneSettings, adapt, effective_weights, lora_inputs, param_groups
from dsire.lab.records import load_record
from dsire.lab.subsets import half_masks
from dsire.lab.train import train_group
from dsire.settings import from_config

TASK = load_task(TaskSettings(private_limit=60))


@pytest.fixture(scope="module")
def backbone() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone(BackboneSettings(hidden=16), TASK.input_shape, TASK.classes).requires_grad_(False)


def plain_sgd(model: nn.Module, mask: torch.Tensor, seed: int, settings: FinetuneSettings) -> nn.Module:
    """The reference: one ordinary module, torch's SGD, the same batches."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = param_groups(params, lora_inputs({n: p.shape for n, p in model.named_parameters()}), settings)
    optimiser = torch.optim.SGD(groups, momentum=settings.momentum, weight_decay=settings.weight_decay)
    for idx in batch_indices(mask, seed, settings.steps, settings.batch_size):
        loss = F.cross_entropy(model(TASK.private.take(idx)), TASK.private.labels[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model


@pytest.mark.parametrize("method", ["lora", "lora_fa", "full", "head_only"])
def test_ensemble_equals_models_trained_one_by_one(backbone: nn.Module, method: str) -> None:
    settings = FinetuneSettings(
        method=method, rank=3, steps=25, batch_size=8, weight_decay=1e-3, target_modules=("fc1", "head")
    )
    seeds = [3, 5, 7]
    masks = torch.as_tensor(half_masks(4, len(TASK.private), seed=1)[:3])
    ensemble, epsilons = train([adapt(backbone, settings, s) for s in seeds], TASK.private, masks, seeds, settings)
    assert epsilons == [None] * 3
    for m, seed in enumerate(seeds):
        reference = effective_weights(plain_sgd(adapt(backbone, settings, seed), masks[m], seed, settings))
        trained = effective_weights(ensemble.model(m))
        for name, weight in reference.items():
            torch.testing.assert_close(trained[name], weight, rtol=1e-5, atol=1e-6)
    moved = effective_weights(ensemble.model(0))["head.weight"] - backbone.state_dict()["head.weight"]
    assert moved.abs().max() > 1e-3  # the comparison is not between untrained models


def test_lora_fa_trains_only_b_and_keeps_the_drawn_a(backbone: nn.Module) -> None:
    settings = FinetuneSettings(method="lora_fa", rank=2, steps=5, batch_size=4)
    models = [adapt(backbone, settings, seed) for seed in (0, 1)]
    ensemble = Ensemble.from_models(models)
    assert all("lora_B" in name for name in ensemble.trainable)
    a = "base_model.model.fc1.lora_A.default.weight"
    assert a in ensemble.stacked and not torch.equal(ensemble.stacked[a][0], ensemble.stacked[a][1])
    assert "base_model.model.fc1.base_layer.weight" in ensemble.shared


def test_half_masks_put_every_example_in_half_the_models() -> None:
    masks = half_masks(6, 50, seed=3)
    assert masks.shape == (6, 50) and (masks.sum(axis=0) == 3).all()
    assert not np.array_equal(masks, half_masks(6, 50, seed=4))
    np.testing.assert_array_equal(masks, half_masks(6, 50, seed=3))
    with pytest.raises(ValueError, match="even number"):
        half_masks(5, 10, seed=0)


def test_splits_are_disjoint_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(4), 50)
    public, private, test = split_examples(labels, TaskSettings(public_fraction=0.5, test_fraction=0.2))
    assert len(set(public) | set(private) | set(test)) == 200 == len(public) + len(private) + len(test)
    assert (np.bincount(labels[test]) == 10).all() and (np.bincount(labels[public]) == 25).all()
    again = split_examples(labels, TaskSettings(public_fraction=0.5, test_fraction=0.2, split_seed=1))
    assert not np.array_equal(private, again[1])


def test_records_resume_and_damaged_ones_are_retrained(backbone: nn.Module, tmp_path, monkeypatch) -> None:
    settings = FinetuneSettings(method="lora", rank=2, steps=5, batch_size=4)
    masks = half_masks(4, len(TASK.private), seed=0)
    models = [adapt(backbone, settings, seed) for seed in range(4)]
    first = train_group(models, TASK, settings, masks, list(range(4)), tmp_path, ensemble_size=3)
    assert [r.model for r in first] == [0, 1, 2, 3]
    np.testing.assert_array_equal(first[2].mask, masks[2])
    assert first[0].private_logits.shape == (len(TASK.private), TASK.classes)
    (tmp_path / "model_00001.safetensors").unlink()  # a damaged record, as a disk (not kill -9) can leave it
    (tmp_path / "model_00001.safetensors").write_bytes(b"torn")
    trained = []
    original = lab_train.train
    monkeypatch.setattr(lab_train, "train", lambda models, *a: trained.append(len(models)) or original(models, *a))
    again = train_group(models, TASK, settings, masks, list(range(4)), tmp_path, ensemble_size=3)
    assert trained == [1]  # only the damaged record
    for before, after in zip(first, again, strict=True):
        torch.testing.assert_close(before.private_logits, after.private_logits)
    assert load_record(tmp_path / "missing.safetensors") is None


def test_settings_name_the_key_value_and_what_is_allowed() -> None:
    cases = [
        ({"rank": 0}, "finetune.rank", "must be at least 1"),
        ({"rank": "eight"}, "finetune.rank", "'eight' is not an integer"),
        ({"method": "adapters"}, "finetune.method", "not one of lora, lora_fa, full, head_only, dpsgd"),
        ({"momentum": 1.0}, "finetune.momentum", "not in [0, 1)"),
        ({"ranks": 4}, "finetune.ranks", "unknown setting"),
    ]
    for values, key, problem in cases:
        with pytest.raises(UserError) as caught:
            from_config(FinetuneSettings, values, "finetune")
        assert caught.value.where == key and problem in caught.value.problem
    settings = from_config(FinetuneSettings, {"lr": 1, "target_modules": ["fc1"]}, "finetune")
    assert settings.lr == 1.0 and settings.target_modules == ("fc1",)


def test_unknown_target_module_is_a_user_error(backbone: nn.Module) -> None:
    with pytest.raises(UserError, match=r"\['qkv'\] are not layers of the backbone; it has \['fc1', 'fc2', 'head'\]"):
        adapt(backbone, FinetuneSettings(target_modules=("qkv",)), seed=0)


def test_target_modules_inside_blocks_are_found_by_their_last_name() -> None:
    """As in a ViT (`blocks.0.attn.qkv`): `qkv` names every such layer, as it does for peft itself."""
    block = nn.Module()
    block.qkv, block.proj = nn.Linear(4, 12), nn.Linear(4, 4)
    backbone = nn.Module()
    backbone.blocks, backbone.head = nn.ModuleList([block]), nn.Linear(4, 2)
    model = adapt(backbone, FinetuneSettings(target_modules=("qkv",), rank=2), seed=0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "base_model.model.blocks.0.qkv.lora_A.default.weight",
        "base_model.model.blocks.0.qkv.lora_B.default.weight",
    ]
    with pytest.raises(UserError, match=r"\['attn'\] are not layers of the backbone; it has \['head', 'proj', 'qkv'\]"):
        adapt(backbone, FinetuneSettings(target_modules=("attn",)), seed=0)


def test_image_folder_task_reads_local_images(tmp_path) -> None:
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(12):
            Image.new("RGB", (20, 10), (i * 20, 100 if label == "cat" else 0, 0)).save(tmp_path / label / f"{i}.png")
    task = load_task(TaskSettings(name="image_folder", path=str(tmp_path), image_size=16, private_limit=None))
    assert task.classes == 2 and task.input_shape == (3, 16, 16)
    assert len(task.public) + len(task.private) + len(task.test) == 24
    batch = task.private.take(torch.tensor([[0, 1], [2, 3]]))
    assert batch.shape == (2, 2, 3, 16, 16) and torch.isfinite(batch).all()
    assert all(i.split("/")[0] in ("cat", "dog") for i in task.private.ids)
    with pytest.raises(UserError, match=r"task\.path"):
        load_task(TaskSettings(name="image_folder", path=str(tmp_path / "cat")))


def test_dpsgd_reports_the_accountants_epsilon_for_its_sampling(backbone: nn.Module) -> None:
    from opacus.accountants import RDPAccountant

    settings = FinetuneSettings(method="dpsgd", dp_params="lora", rank=2, steps=20, batch_size=8, noise_multiplier=1.3)
    mask = torch.zeros(1, len(TASK.private), dtype=torch.bool)
    mask[0, :30] = True
    model = adapt(backbone, settings, seed=0)
    ensemble, (epsilon,) = train([model], TASK.private, mask, [0], settings)
    accountant = RDPAccountant()
    for _ in range(20):
        accountant.step(noise_multiplier=1.3, sample_rate=1 / math.ceil(30 / 8))  # opacus' Poisson rate
    assert epsilon == pytest.approx(accountant.get_epsilon(settings.delta), rel=1e-9)
    assert set(ensemble.trainable) == {n for n, p in model.named_parameters() if p.requires_grad}
    moved = ensemble.stacked["base_model.model.fc1.lora_B.default.weight"][0]
    assert moved.abs().max() > 0  # the noisy steps changed B


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_accelerator_without_cuda_is_one_error_line():
    """The GPU recipes' lab.accelerator=gpu on a CPU machine: the key named, not Lightning's traceback."""
    from dsire.lab.build import launch

    with pytest.raises(UserError, match="no CUDA device") as info:
        launch(OmegaConf.create({"accelerator": "gpu", "devices": 1, "num_nodes": 1}))
    assert info.value.where == "lab.accelerator"
