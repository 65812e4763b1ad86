"""Backbones built from config: a small MLP or CNN for CPU tasks, timm's ViT-B/16 from local weights.

Every backbone ends in a linear layer named `head`, so `head_only` and LoRA target lists mean the
same thing for all of them. The small ones are pretrained on the public split and cached by recipe
hash; the ViT's weights come from a local file (nothing is downloaded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from dsire.errors import UserError
from dsire.hashing import file_sha256
from dsire.lora.files import read_safetensors
from dsire.settings import require


@dataclass(frozen=True)
class BackboneSettings:
    """`task.backbone.*`: architecture and, for `vit_b16`, the local weights file."""

    name: Literal["mlp", "cnn", "vit_b16"] = "mlp"
    hidden: int = 128
    layers: int = 2  # mlp: hidden layers fc1..fcK; cnn: conv layers conv1..convK (then fc1)
    weights: str | None = None  # vit_b16: a timm ViT-B/16 state dict (.safetensors)

    def __post_init__(self) -> None:
        require(self.hidden >= 1, "hidden", f"{self.hidden} must be at least 1")
        require(self.layers >= 1, "layers", f"{self.layers} must be at least 1")
        require(self.name != "vit_b16" or bool(self.weights), "weights", "vit_b16 needs a local weights file")


class MLP(nn.Module):
    def __init__(self, inputs: int, hidden: int, layers: int, classes: int):
        super().__init__()
        sizes = [inputs] + [hidden] * layers
        for i in range(layers):
            self.add_module(f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))
        self.head = nn.Linear(hidden, classes)
        self.depth = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(self.depth):
            x = torch.relu(getattr(self, f"fc{i + 1}")(x))
        return self.head(x)


class CNN(nn.Module):
    def __init__(self, channels: int, side: int, hidden: int, layers: int, classes: int):
        super().__init__()
        width = [channels] + [hidden // 2] * layers
        for i in range(layers):
            self.add_module(f"conv{i + 1}", nn.Conv2d(width[i], width[i + 1], 3, padding=1))
        self.fc1 = nn.Linear(width[-1] * side * side, hidden)
        self.head = nn.Linear(hidden, classes)
        self.depth = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            x = torch.relu(getattr(self, f"conv{i + 1}")(x))
        return self.head(torch.relu(self.fc1(x.flatten(1))))


def build_backbone(settings: BackboneSettings, input_shape: tuple[int, ...], classes: int) -> nn.Module:
    if settings.name == "mlp":
        return MLP(math.prod(input_shape), settings.hidden, settings.layers, classes)
    if settings.name == "cnn":
        return CNN(input_shape[0], input_shape[-1], settings.hidden, settings.layers, classes)
    return vit_b16(Path(settings.weights or ""), classes)


def vit_b16(weights: Path, classes: int) -> nn.Module:
    """timm's ViT-B/16 (the `vit` or `gpu` extra) with a new `head`; the body's weights from a local file."""
    if not weights.is_file():
        raise UserError("task.backbone.weights", f"{weights} not found (a local ViT-B/16 .safetensors file)")
    model = timm_vit(classes, "task.backbone.name")
    state, _ = read_safetensors(weights)
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise UserError(str(weights), f"not a ViT-B/16 state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def weights_sha256(settings: BackboneSettings) -> str | None:
    """The weights file's digest (None without one): a part of the lab's recipe hash, so a new file
    at the same path never reuses a backbone pretrained from the old one."""
    if settings.weights is None:
        return None
    path = Path(settings.weights)
    if not path.is_file():
        raise UserError("task.backbone.weights", f"{path} not found (a local ViT-B/16 .safetensors file)")
    return file_sha256(path)


def timm_vit(classes: int, where: str) -> nn.Module:
    """timm's ViT-B/16 architecture, randomly initialised, with `classes` outputs; without timm, a
    `UserError` at `where` saying how to install it."""
    try:
        import timm
    except ImportError:
        raise UserError(where, "vit_b16 needs timm: pip install -e '.[vit]' (or '.[gpu]')") from None
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=classes)


def backbone_from_state(state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """The MLP, CNN or ViT-B/16 whose weights `state` holds (architecture read from the tensor names
    and shapes), e.g. a lab's cached pretrained backbone."""
    if "patch_embed.proj.weight" in state:
        return _vit_from_state(state, where)
    convs = sum(1 for k in state if k.startswith("conv") and k.endswith(".weight"))
    linears = sum(1 for k in state if k.startswith("fc") and k.endswith(".weight"))
    try:
        head = state["head.weight"]
        if convs:
            last = state[f"conv{convs}.weight"]
            side = math.isqrt(state["fc1.weight"].shape[1] // last.shape[0])
            hidden = state["fc1.weight"].shape[0]
            model: nn.Module = CNN(state["conv1.weight"].shape[1], side, hidden, convs, head.shape[0])
        else:
            first = state["fc1.weight"]
            model = MLP(first.shape[1], first.shape[0], linears, head.shape[0])
        model.load_state_dict(state)
    except (KeyError, RuntimeError, IndexError, ZeroDivisionError) as exc:
        raise UserError(
            where, f"not the state dict of a dsire MLP, CNN or ViT-B/16 backbone ({str(exc)[:200]})"
        ) from None
    return model


def _vit_from_state(state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """A whole ViT-B/16 state dict, head included (its classes from `head.weight`), loaded strictly."""
    if "head.weight" not in state:
        raise UserError(where, "a ViT state dict without head.weight (the lab's backbones keep their head)")
    model = timm_vit(state["head.weight"].shape[0], where)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(where, f"not the state dict of a ViT-B/16 ({str(exc)[:200]})") from None
    return model
