"""Pretraining of the tiny base: class-conditioned DDPM on sklearn's digits, cached by recipe hash.

A zoo needs a base that already models the data: LoRAs of a random base carry no dataset-size
signal (the prototype's vote fell to chance). A few thousand steps on the 1,797 digits suffice.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from dsire.hashing import json_hash
from dsire.zoo.base import BOS, EOS, BaseModel, save_tiny, tiny_modules
from dsire.zoo.data import digit_images
from dsire.zoo.harness import NoisePrediction, fit

NULL, IDENTIFIER, FIRST_CLASS = 2, 3, 10  # prompt tokens: pretraining [BOS, NULL, class, EOS]


def prompt(class_id: int, identifier: bool) -> torch.Tensor:
    """[BOS, NULL or IDENTIFIER, class token, EOS]: fine-tunes bind the identifier to their concept."""
    return torch.tensor([[BOS, IDENTIFIER if identifier else NULL, FIRST_CLASS + class_id, EOS]])


def config_hash(cfg: DictConfig) -> str:
    return json_hash(OmegaConf.to_container(cfg, resolve=True))


def _cached_hash(path: Path) -> str | None:
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("recipe_hash")


def pretrain_tiny(cfg: DictConfig) -> Path:
    """Weights of the tiny base for `cfg` (zoo.base): reused when cached with the same recipe hash."""
    path = Path(cfg.path)
    recipe = config_hash(OmegaConf.masked_copy(cfg, ["init_seed", "unet", "text_encoder", "scheduler", "pretrain"]))
    if _cached_hash(path) == recipe:
        return path
    torch.manual_seed(cfg.pretrain.seed)
    unet, text = tiny_modules(cfg)
    images, classes = digit_images()
    token_ids = torch.cat([prompt(int(c), identifier=False) for c in classes])
    base = BaseModel(unet, text, DDPMScheduler(**cfg.scheduler), fingerprint="")
    module = NoisePrediction(base, lr=cfg.pretrain.lr, seed=cfg.pretrain.seed, train_text_encoder=True)
    fit(module, images, token_ids, cfg.pretrain.steps, cfg.pretrain.batch_size, cfg.pretrain.seed, progress=True)
    save_tiny(unet, text, path, recipe)
    return path
