"""Training through the lab: the public backbone (cached by recipe hash) and groups of fine-tunes
(one record per model, resumable, shared out over DDP ranks)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from safetensors.torch import save_file
from torch import nn

from dsire.atomic import atomic_path
from dsire.distributed import rank_and_world
from dsire.errors import UserError
from dsire.hashing import json_hash
from dsire.lab.backbones import BackboneSettings, build_backbone
from dsire.lab.data import Task
from dsire.lab.ensemble import Ensemble, train, train_on_all
from dsire.lab.methods import FinetuneSettings, adapt
from dsire.lab.records import TrainingRecord, load_record, save_record
from dsire.lora.files import read_safetensors
from dsire.lora.model import LoRAError


def pretrained_backbone(
    task: Task, backbone: BackboneSettings, pretrain: FinetuneSettings, path: Path, device: torch.device
) -> nn.Module:
    """The backbone trained on the public split only (`pretrain.method`: full or head_only), cached
    at `path` (named by the recipe's hash, which also seeds the initialisation), on `device`."""
    torch.manual_seed(int(json_hash(path.name), 16) % 2**31)
    model = build_backbone(backbone, task.input_shape, task.classes)
    try:
        state, _ = read_safetensors(path)
        model.load_state_dict(state)
        return model.to(device).requires_grad_(False)
    except (LoRAError, RuntimeError):
        model = model.to(device)  # not cached yet, or damaged: train it
    model = train_on_all(adapt(model, pretrain, seed=0), task.public, pretrain, seed=0)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    return model.requires_grad_(False)


def train_group(
    models: Sequence[nn.Module],
    task: Task,
    settings: FinetuneSettings,
    masks: np.ndarray,
    seeds: Sequence[int],
    directory: Path,
    ensemble_size: int,
    progress: Progress | None = None,
) -> list[TrainingRecord]:
    """Fine-tune model m (prepared by `adapt`) on the private examples in `masks[m]`, `ensemble_size`
    models at a time, and return every model's record. Models with a valid record in `directory`
    are not trained again; under DDP each rank trains models rank, rank + world, …"""
    rank, world = rank_and_world()
    records = [load_record(_path(directory, m)) for m in range(len(models))]
    missing = [m for m, record in enumerate(records) if record is None]
    todo = missing[rank::world]
    task_id = progress.add_task(settings.label, total=len(todo)) if progress else None
    for start in range(0, len(todo), ensemble_size):
        chunk = todo[start : start + ensemble_size]
        mask = torch.as_tensor(masks[chunk])
        ensemble, epsilons = train([models[m] for m in chunk], task.private, mask, [seeds[m] for m in chunk], settings)
        _save_chunk(ensemble, chunk, epsilons, task, settings, masks, seeds, directory)
        if progress:
            progress.advance(task_id, len(chunk))
    if world > 1:
        torch.distributed.barrier()
    for m in missing:  # read once: the models trained here or by the other ranks
        records[m] = load_record(_path(directory, m))
    if any(r is None for r in records):
        raise RuntimeError(f"{directory}: records missing after training")
    return records  # type: ignore[return-value]


def _save_chunk(
    ensemble: Ensemble,
    chunk: list[int],
    epsilons: list[float | None],
    task: Task,
    settings: FinetuneSettings,
    masks: np.ndarray,
    seeds: Sequence[int],
    directory: Path,
) -> None:
    private_logits = ensemble.logits(task.private)
    if not torch.isfinite(private_logits).all():
        raise UserError(
            "finetune.lr", f"{settings.label} diverged at lr {settings.lr} (NaN or infinite outputs): lower the lr"
        )
    test_accuracy = (ensemble.logits(task.test).argmax(-1) == task.test.labels).float().mean(1)
    for i, m in enumerate(chunk):
        metrics = {"test_accuracy": float(test_accuracy[i])}
        if epsilons[i] is not None:
            metrics["epsilon"] = epsilons[i]
        record = TrainingRecord(
            model=m,
            seed=seeds[m],
            settings=dataclasses.asdict(settings),
            mask=masks[m],
            metrics=metrics,
            state={n: t[i].cpu() for n, t in ensemble.stacked.items()},
            initial={n: t[i].cpu() for n, t in ensemble.initial.items()},
            private_logits=private_logits[i],
        )
        save_record(record, _path(directory, m))


def _path(directory: Path, model: int) -> Path:
    return Path(directory) / f"model_{model:05d}.safetensors"
