"""LoRA's implicit noise on real gradients (`audit.py +experiment=lora_noise`).

Gradients G of the digits fine-tune (full-batch, at several layers and several steps of a `full`
fine-tune from the public backbone) are projected through many random A the way peft initialises
them, and the noise of G·AᵀA/E[AᵀA] is compared with its exact moments (`noise.measure_noise`).
Then a whole LoRA-FA fine-tune is compared with a full fine-tune on the same data and seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from dsire.lab.build import Lab
from dsire.lab.ensemble import train_on_all
from dsire.lab.gradients import example_gradients
from dsire.lab.methods import FinetuneSettings, adapt, weight_change
from dsire.privacy.noise import INITS, entry_moments, lora_fa_vs_full, measure_noise
from dsire.settings import require


@dataclass(frozen=True)
class NoiseSettings:
    """`noise.*`: where gradients are taken and how many A are drawn per rank."""

    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    inits: tuple[str, ...] = INITS
    layers: tuple[str, ...] = ("fc1", "fc2", "head")
    steps: tuple[int, ...] = (0, 100, 200)  # fine-tuning steps after which G is taken
    draws: int = 2000
    whole_run_rank: int = 8  # the LoRA-FA fine-tune compared with full fine-tuning
    seed: int = 0

    def __post_init__(self) -> None:
        require(len(self.ranks) > 0 and min(self.ranks) >= 1, "ranks", "list ranks ≥ 1")
        require(set(self.inits) <= set(INITS) and len(self.inits) > 0, "inits", f"any of {', '.join(INITS)}")
        require(len(self.layers) > 0, "layers", "list at least one layer")
        require(len(self.steps) > 0 and min(self.steps) >= 0, "steps", "list steps ≥ 0")
        require(self.draws >= 100, "draws", f"{self.draws}: at least 100 draws of A")
        require(self.whole_run_rank >= 1, "whole_run_rank", "must be at least 1")


def run_noise(lab: Lab, settings: NoiseSettings) -> dict:
    """{"per_rank": rows (layer, step, init, rank, measured vs predicted), "whole_run": per layer}."""
    _check_layers(lab.backbone, settings.layers)
    generator = torch.Generator().manual_seed(settings.seed)
    rows = []
    for step in settings.steps:
        gradients = full_batch_gradients(_fine_tuned(lab, step, settings.seed), lab, settings.layers)
        for layer, G in gradients.items():
            for init in settings.inits:
                for result in measure_noise(G, settings.ranks, init, settings.draws, generator):
                    rows.append({"layer": layer, "step": step, "init": init, **result})
    return {"per_rank": rows, "whole_run": whole_run(lab, settings)}


def full_batch_gradients(model: nn.Module, lab: Lab, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """G = the mean loss gradient over the private split, for each layer's weight."""
    names = [f"{layer}.weight" for layer in layers]
    per_example = example_gradients(model, lab.task.private, names)
    return {name.removesuffix(".weight"): g.mean(0) for name, g in per_example.items()}


def whole_run(lab: Lab, settings: NoiseSettings) -> dict[str, dict]:
    """LoRA-FA (Gaussian A) against full fine-tuning, same data order and seed, per layer."""
    steps = max(max(settings.steps), 1)
    common = {**dataclasses.asdict(lab.finetune), "steps": steps, "target_modules": settings.layers}
    lora = FinetuneSettings(**{**common, "method": "lora_fa", "rank": settings.whole_run_rank, "init": "gaussian"})
    base = dict(lab.backbone.state_dict())
    full_delta = weight_change(_fine_tuned(lab, steps, settings.seed), base)
    lora_delta = weight_change(
        train_on_all(adapt(lab.backbone, lora, settings.seed), lab.task.private, lora, settings.seed), base
    )
    _, kurtosis = entry_moments("gaussian", settings.whole_run_rank, 1)
    return {
        layer: lora_fa_vs_full(lora_delta[f"{layer}.weight"], full_delta[f"{layer}.weight"], lora.rank, kurtosis)
        for layer in settings.layers
    }


def _fine_tuned(lab: Lab, steps: int, seed: int) -> nn.Module:
    """The backbone after `steps` steps of full fine-tuning on all private examples (itself at 0)."""
    if steps == 0:
        return lab.backbone
    full = FinetuneSettings(**{**dataclasses.asdict(lab.finetune), "method": "full", "steps": steps})
    return train_on_all(adapt(lab.backbone, full, seed), lab.task.private, full, seed)


def _check_layers(backbone: nn.Module, layers: tuple[str, ...]) -> None:
    linear = [n for n, m in backbone.named_children() if isinstance(m, nn.Linear)]
    unknown = [layer for layer in layers if layer not in linear]
    require(not unknown, "noise.layers", f"{unknown} are not linear layers of the backbone; it has {linear}")
