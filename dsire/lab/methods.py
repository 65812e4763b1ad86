"""Fine-tuning methods: which parameters of a pretrained backbone train, and how they are added.

`lora` is peft's standard LoRA (A and B train), `lora_fa` freezes A at its random initialisation
(the setting of the LoRA-as-DP-SGD theorem), `full` trains everything, `head_only` the classifier,
`dpsgd` trains the parameters of `dp_params` with per-example clipping and noise (opacus), and
`pad_prompt` trains a border of the input image (`dsire.lab.prompts`) while the backbone stays as it
is: it needs the input's shape, which only the unlearning job passes (its per-cluster adapter).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from dsire.errors import UserError
from dsire.hashing import HASHED_UNLESS_DEFAULT
from dsire.lab.prompts import PadPrompted
from dsire.settings import require

Method = Literal["lora", "lora_fa", "full", "head_only", "dpsgd", "pad_prompt"]
PARAMETERISATIONS = ("lora", "lora_fa", "full", "head_only")


@dataclass(frozen=True)
class FinetuneSettings:
    """`finetune.*`: the method, its adapter shape and the optimiser (SGD with momentum)."""

    method: Method = "lora"
    rank: int = 8
    alpha: float | None = None  # LoRA scale alpha/rank; None means alpha = rank (scale 1)
    init: Literal["kaiming", "gaussian"] = "kaiming"  # peft's default, or N(0, 1/rank²)
    target_modules: tuple[str, ...] = ("fc1", "fc2", "head")
    steps: int = 300
    batch_size: int = 32
    lr: float = 0.003  # the learning rate of the weights W; LoRA's B steps are scaled to match (see param_groups)
    scale_lora_lr: bool = True  # False: every parameter steps at `lr` as it is
    momentum: float = 0.9
    weight_decay: float = 0.0
    dp_params: Literal["lora", "lora_fa", "full", "head_only"] = "full"  # what dpsgd trains
    clip: float = 1.0  # dpsgd: per-example gradient norm bound C
    noise_multiplier: float = 1.0  # dpsgd: σ, noise std = σ·C on the summed clipped gradients
    delta: float = 1e-5  # dpsgd: δ of the (ε, δ) the accountant reports
    pad: int = field(default=1, metadata=HASHED_UNLESS_DEFAULT)  # pad_prompt: border width, pixels (the paper: 30)

    def __post_init__(self) -> None:
        require(self.rank >= 1, "rank", f"{self.rank} must be at least 1")
        require(self.alpha is None or self.alpha > 0, "alpha", f"{self.alpha} must be positive")
        require(len(self.target_modules) > 0, "target_modules", "name at least one module")
        require(self.steps >= 1, "steps", f"{self.steps} must be at least 1")
        require(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be at least 1")
        require(self.lr > 0, "lr", f"{self.lr} must be positive")
        require(0 <= self.momentum < 1, "momentum", f"{self.momentum} is not in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", f"{self.weight_decay} must be ≥ 0")
        require(self.clip > 0, "clip", f"{self.clip} must be positive")
        require(self.noise_multiplier >= 0, "noise_multiplier", f"{self.noise_multiplier} must be ≥ 0")
        require(0 < self.delta < 1, "delta", f"{self.delta} is not in (0, 1)")
        require(self.pad >= 1, "pad", f"{self.pad} must be at least 1")

    @property
    def parameterisation(self) -> str:
        """Which parameters train: the method itself, or for `dpsgd` its `dp_params`."""
        return self.dp_params if self.method == "dpsgd" else self.method

    @property
    def label(self) -> str:
        """Short name of the configuration: `lora_r8`, `full`, `dpsgd_full_s0.5`."""
        if self.method == "dpsgd":
            inner = FinetuneSettings(method=self.dp_params, rank=self.rank).label  # type: ignore[arg-type]
            return f"dpsgd_{inner}_s{self.noise_multiplier:.3g}"
        if self.method == "pad_prompt":
            return f"pad_prompt_p{self.pad}"
        return f"{self.method}_r{self.rank}" if self.method in ("lora", "lora_fa") else self.method


def adapt(
    backbone: nn.Module, settings: FinetuneSettings, seed: int, input_shape: tuple[int, ...] | None = None
) -> nn.Module:
    """A copy of `backbone` prepared for `settings`: adapters added (LoRA A drawn from `seed`) and
    `requires_grad` set on exactly the parameters that train. `input_shape` (C, H, W) sizes a
    `pad_prompt`'s border."""
    model = copy.deepcopy(backbone)
    kind = settings.parameterisation
    if kind == "pad_prompt":
        if input_shape is None:
            raise UserError("finetune.method", "pad_prompt is a per-cluster adapter of unlearn.py only")
        return PadPrompted(model.requires_grad_(False), input_shape, settings.pad)
    if kind in ("lora", "lora_fa"):
        layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        missing = [t for t in settings.target_modules if not any(n == t or n.endswith(f".{t}") for n in layers)]
        if missing:  # peft's matching: a layer's full name, or its last parts (`qkv` for `blocks.0.attn.qkv`)
            names = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise UserError("finetune.target_modules", f"{missing} are not layers of the backbone; it has {names}")
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
            target_modules=list(settings.target_modules),
            init_lora_weights="gaussian" if settings.init == "gaussian" else True,
            lora_dropout=0.0,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(model, config)
        if kind == "lora_fa":
            for name, parameter in model.named_parameters():
                if "lora_A" in name:
                    parameter.requires_grad_(False)
        return model
    model.requires_grad_(kind == "full")
    if kind == "head_only":
        model.head.requires_grad_(True)
    return model


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state as the model computes it: LoRA merged into the base weights (a pad
    prompt changes the input, not the weights: its backbone's state)."""
    if isinstance(model, PadPrompted):
        model = model.backbone
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def weight_change(model: nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Effective weights minus `base` (the backbone's state), for every backbone tensor."""
    return {n: w - base[n] for n, w in effective_weights(model).items()}


def lora_a_moments(init: str, rank: int, d_in: int) -> tuple[float, float]:
    """Variance v and kurtosis κ of one entry of peft's lora_A [rank, d_in]. "kaiming":
    `kaiming_uniform_(a=√5)` has gain √(2/(1+5)) and bound √3 · gain/√d_in = 1/√d_in, so
    U(−1/√d_in, 1/√d_in): v = 1/(3 d_in), κ = 9/5. "gaussian": `normal_(std=1/rank)`: v = 1/rank², κ = 3."""
    return (1.0 / (3.0 * d_in), 9.0 / 5.0) if init == "kaiming" else (1.0 / rank**2, 3.0)


def param_groups(params: dict[str, torch.Tensor], inputs: dict[str, int], settings: FinetuneSettings) -> list[dict]:
    """SGD parameter groups in which `settings.lr` is the learning rate of the weights themselves.

    One SGD step on LoRA's B changes the weight by −η s² G AᵀA, whose mean is −η s² r v G (s the
    scale alpha/r, v the variance of A's entries): at the same η LoRA would move W r·v·s² times as
    far as full fine-tuning does (far less, and more at higher rank). B's learning rate is therefore
    lr / (s² r v), so that every method and rank takes steps of the same expected size in W and the
    comparison is between noises, not between step sizes. A (trained by `lora`) keeps `lr`.
    `inputs` maps each B's name to its layer's input size d_in (see `lora_inputs`).
    """
    scale = settings.alpha / settings.rank if settings.alpha is not None else 1.0
    groups = []
    for name, tensor in params.items():
        lr = settings.lr
        if settings.scale_lora_lr and "lora_B" in name:
            variance, _ = lora_a_moments(settings.init, settings.rank, inputs[name])
            lr = settings.lr / (scale**2 * settings.rank * variance)
        groups.append({"params": [tensor], "lr": lr})
    return groups


def lora_inputs(shapes: dict[str, torch.Size]) -> dict[str, int]:
    """{name of a LoRA B: its layer's input size}, read from the matching A's last dimension."""
    return {n: shapes[n.replace("lora_B", "lora_A")][-1] for n in shapes if "lora_B" in n}
