"""The lab from a Hydra config: the task's splits, the public backbone and the fine-tune settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.fabric import Fabric
from omegaconf import DictConfig
from torch import nn

from dsire.distributed import one_rank_at_a_time
from dsire.errors import UserError
from dsire.hashing import json_hash
from dsire.lab.backbones import BackboneSettings, weights_sha256
from dsire.lab.data import Task, TaskSettings, load_task
from dsire.lab.methods import FinetuneSettings
from dsire.lab.train import pretrained_backbone
from dsire.settings import from_config, require_device

NESTED = ("backbone", "pretrain")  # task.backbone.*, task.pretrain.*: settings of their own


@dataclass
class Lab:
    task: Task
    backbone: nn.Module  # pretrained on the public split, frozen
    finetune: FinetuneSettings
    recipe: str  # hash of task, backbone and pretraining: records of other recipes never mix
    records_dir: Path


def build_lab(cfg: DictConfig, device: torch.device | str = "cpu") -> Lab:
    """Validate `task.*` and `finetune.*`, load the splits, pretrain (or reuse) the backbone on
    `device`; under DDP rank 0 pretrains first and the others read its cache."""
    task_settings = from_config(TaskSettings, {k: v for k, v in cfg.task.items() if k not in NESTED}, "task")
    backbone = from_config(BackboneSettings, cfg.task.get("backbone"), "task.backbone")
    pretrain = from_config(FinetuneSettings, cfg.task.get("pretrain"), "task.pretrain")
    finetune = from_config(FinetuneSettings, cfg.finetune, "finetune")
    task = load_task(task_settings)
    weights = weights_sha256(backbone)  # of the file's bytes: its path alone would not tell a new file
    recipe = json_hash([task_settings, backbone, pretrain] + ([weights] if weights else []))
    lab_dir = Path(cfg.paths.cache_dir) / "lab"
    for _ in one_rank_at_a_time():
        model = pretrained_backbone(task, backbone, pretrain, lab_dir / f"backbone_{recipe}.safetensors", device)
    return Lab(task, model, finetune, recipe, lab_dir / "records")


def launch(cfg: DictConfig) -> Fabric:
    """`lab.devices` × `lab.num_nodes` processes (Lightning DDP) that share out the models to train."""
    processes = cfg.devices * cfg.num_nodes
    if cfg.devices < 1 or cfg.num_nodes < 1:
        raise UserError("lab.devices", f"{cfg.devices} devices × {cfg.num_nodes} nodes: both must be ≥ 1")
    require_device("lab.accelerator", cfg.accelerator)
    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy="ddp" if processes > 1 else "auto",
    )
    fabric.launch()
    return fabric
