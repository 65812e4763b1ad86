"""Base models a zoo is fine-tuned from, behind one small interface.

`tiny`: a small diffusers UNet and CLIP text encoder built from config, whose weights the project
makes itself by a short DDPM pretraining on sklearn's digits (see `pretrain`), so that nothing
is downloaded. `sd15`: a local Stable Diffusion 1.5 directory (diffusers layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from dsire.atomic import atomic_path
from dsire.errors import UserError
from dsire.hashing import tensors_sha256

BOS, EOS = 0, 1  # token ids of the tiny text encoder; a concept's prompt is [BOS, identifier, class, EOS]


@dataclass
class BaseModel:
    """What fine-tuning needs: a UNet, the prompt encoder, the image encoder and the noise schedule."""

    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    scheduler: DDPMScheduler
    fingerprint: str
    vae: AutoencoderKL | None = None  # None: the UNet works on pixels (tiny)


def tiny_modules(cfg: DictConfig) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Fresh tiny modules from the recipe's architecture config (seeded, so the init is reproducible)."""
    torch.manual_seed(cfg.init_seed)
    unet = UNet2DConditionModel(**OmegaConf.to_container(cfg.unet))
    text = CLIPTextModel(CLIPTextConfig(**OmegaConf.to_container(cfg.text_encoder), bos_token_id=BOS, eos_token_id=EOS))
    return unet, text


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: identifies base weights independently of the file."""
    return tensors_sha256(state)[:16]


def save_tiny(unet: UNet2DConditionModel, text: CLIPTextModel, path: Path, recipe_hash: str) -> None:
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    state |= {f"text_encoder.{k}": v for k, v in text.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"recipe_hash": recipe_hash})


def load_tiny(cfg: DictConfig, path: Path) -> BaseModel:
    unet, text = tiny_modules(cfg)
    state = load_file(str(path))
    unet.load_state_dict({k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})
    text.load_state_dict(
        {k.removeprefix("text_encoder."): v for k, v in state.items() if k.startswith("text_encoder.")}
    )
    return BaseModel(unet, text, DDPMScheduler(**cfg.scheduler), fingerprint(state))


def load_sd15(path: str | Path | None) -> BaseModel:
    """Stable Diffusion 1.5 from a local diffusers directory; nothing is downloaded."""
    if not path or not Path(path).is_dir():
        raise UserError(
            "zoo.base.path",
            f"Stable Diffusion 1.5 not found at {path!r}: download it yourself (diffusers layout, e.g. "
            "stable-diffusion-v1-5) and set zoo.base.path=/path/to/it (or SD15_PATH)",
        )
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
    text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    return BaseModel(unet, text, scheduler, fingerprint(unet.state_dict()), vae=vae)
