"""A recipe's base model and concepts, by `zoo.base.kind` (tiny | sd15)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from dsire.errors import UserError
from dsire.zoo.base import BaseModel, load_sd15, load_tiny
from dsire.zoo.data import concept_class, digit_concepts, folder_concepts, mixed_concepts
from dsire.zoo.pretrain import pretrain_tiny, prompt

Concepts = dict[str, tuple[torch.Tensor, torch.Tensor]]  # concept -> (ordered image pool, token ids per image)


def load_base(cfg: DictConfig) -> BaseModel:
    if cfg.base.kind == "tiny":
        return load_tiny(cfg.base, pretrain_tiny(cfg.base))
    if cfg.base.kind == "sd15":
        return load_sd15(cfg.base.path)
    raise UserError("zoo.base.kind", f"{cfg.base.kind!r} is not one of tiny, sd15")


def load_concepts(cfg: DictConfig) -> Concepts:
    if cfg.data.kind == "digits":
        pools = digit_concepts(cfg.data.pools_per_class)
        concepts = {
            name: (images, prompt(concept_class(name), identifier=True).expand(len(images), -1))
            for name, images in pools.items()
        }
    elif cfg.data.kind == "mixed":
        pools = mixed_concepts(cfg.data.count, cfg.data.pool_size, cfg.data.seed)
        concepts = {
            name: (images, torch.cat([prompt(int(c), identifier=True) for c in classes]))
            for name, (images, classes) in pools.items()
        }
    elif cfg.data.kind == "folders":
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(Path(cfg.base.path) / "tokenizer", local_files_only=True)
        concepts = {}
        for name, images in folder_concepts(cfg.data.root, cfg.data.resolution).items():
            text = cfg.data.prompt.format(concept=name.replace("_", " "))
            ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
            concepts[name] = (images, ids.input_ids.expand(len(images), -1))
    else:
        raise UserError("zoo.data.kind", f"{cfg.data.kind!r} is not one of digits, mixed, folders")
    if cfg.data.get("concepts"):
        concepts = {name: concepts[name] for name in cfg.data.concepts}
    too_small = {name: len(images) for name, (images, _) in concepts.items() if len(images) < max(cfg.sizes)}
    if too_small:
        raise UserError("zoo.sizes", f"concepts with fewer images than the largest size {max(cfg.sizes)}: {too_small}")
    return concepts
