"""One LoRA fine-tune: N images of a concept, fixed steps, snapshots saved as they are reached."""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from dsire.zoo.base import BaseModel
from dsire.zoo.harness import NoisePrediction, fit

ADAPTER = "zoo"
Snapshot = Callable[[int, dict[str, torch.Tensor]], None]


def lora_config(cfg: DictConfig) -> LoraConfig:
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), init_lora_weights=True)


def add_lora(unet: torch.nn.Module, cfg: DictConfig, seed: int) -> None:
    """Attach a fresh adapter whose A-initialisation is drawn from `seed` (the seed policy's, never N's)."""
    torch.manual_seed(seed)
    unet.add_adapter(lora_config(cfg), adapter_name=ADAPTER)


class SnapshotCallback(pl.Callback):
    """Hands the LoRA state to `save` at each configured global step."""

    def __init__(self, steps: list[int], save: Snapshot):
        self.steps, self.save = set(steps), save

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args) -> None:
        if trainer.global_step in self.steps:
            self.save(trainer.global_step, get_peft_model_state_dict(module.unet, adapter_name=ADAPTER))


def finetune(
    base: BaseModel, images: torch.Tensor, token_ids: torch.Tensor, cfg: DictConfig, seed: int, save: Snapshot
) -> None:
    """Train one adapter on `images` (image i conditioned on `token_ids[i]`); `seed` sets init, order, noise."""
    base.unet.requires_grad_(False)
    add_lora(base.unet, cfg.lora, seed)
    try:
        module = NoisePrediction(base, lr=cfg.train.lr, seed=seed)
        snapshots = SnapshotCallback(OmegaConf.to_container(cfg.train.snapshot_steps), save)
        fit(module, images, token_ids, cfg.train.steps, cfg.train.batch_size, seed, callbacks=[snapshots])
    finally:
        base.unet.delete_adapters(ADAPTER)
