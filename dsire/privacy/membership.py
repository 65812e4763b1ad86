"""Membership-inference audit by fine-tuning method and LoRA rank (`audit.py +experiment=mia_rank`).

For each configuration, K shadow and T target models are fine-tuned from the public backbone on
random halves of the private split (every example IN for half of the shadows and half of the
targets). Each target is attacked with LiRA (online, offline, fixed variance: shadows' logit-scaled
confidences), the loss threshold, and a white-box score that sees only the weight change ΔW
(`gradient_alignment`, the setting of arXiv 2601.21719). The scores of every (target, example) pair
are pooled into one ROC per attack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from dsire.distributed import rank_and_world
from dsire.hashing import json_hash
from dsire.lab.build import Lab
from dsire.lab.data import Examples
from dsire.lab.gradients import example_gradients, flat_gradient_chunks
from dsire.lab.methods import FinetuneSettings, adapt, weight_change
from dsire.lab.records import TrainingRecord
from dsire.lab.subsets import half_masks
from dsire.lab.train import train_group
from dsire.privacy.attacks import gradient_alignment, lira_offline, lira_online, logit_confidence, loss_attack
from dsire.privacy.metrics import summarise
from dsire.settings import from_config, require

ATTACKS = ("lira_online", "lira_offline", "lira_fixed_variance", "loss", "white_box")
HEADLINE = "lira_online"


@dataclass(frozen=True)
class MembershipSettings:
    """`mia.*`: shadow and target models per configuration, and what to fine-tune."""

    shadow_models: int = 16
    target_models: int = 4
    configurations: tuple[dict, ...] = ()  # each overrides finetune.*; noise_multiplier: match (dpsgd)
    dp_match_rank: int = 8  # `noise_multiplier: match` matches LoRA-FA's noise at this rank
    resamples: int = 1000  # bootstrap resamples for the confidence intervals
    mask_seed: int = 0
    ensemble_size: int = 32  # models trained at once

    def __post_init__(self) -> None:
        require(
            self.shadow_models >= 4 and self.shadow_models % 2 == 0,
            "shadow_models",
            f"{self.shadow_models}: LiRA needs an even number ≥ 4 (≥ 2 IN and 2 OUT models per example)",
        )
        require(
            self.target_models >= 2 and self.target_models % 2 == 0,
            "target_models",
            f"{self.target_models}: an even number ≥ 2 (every example a member of half the targets)",
        )
        require(len(self.configurations) > 0, "configurations", "list at least one fine-tuning configuration")
        require(self.dp_match_rank >= 1, "dp_match_rank", f"{self.dp_match_rank} must be at least 1")
        require(self.resamples >= 100, "resamples", f"{self.resamples}: at least 100 bootstrap resamples")
        require(self.ensemble_size >= 1, "ensemble_size", f"{self.ensemble_size} must be at least 1")


@dataclass
class ConfigurationResult:
    settings: FinetuneSettings
    summary: dict  # the configuration's entry of mia.json
    scores: dict[str, np.ndarray]  # attack -> [targets, examples]
    members: np.ndarray  # [targets, examples] bool


def run_membership(
    lab: Lab, settings: MembershipSettings, progress: Progress | None = None
) -> list[ConfigurationResult]:
    """Train (or reuse) every configuration's models, then attack them. Under DDP every rank trains
    its share and only rank 0 attacks (the others return an empty list)."""
    shadows, targets = settings.shadow_models, settings.target_models
    private = len(lab.task.private)
    masks = np.concatenate(
        [half_masks(shadows, private, settings.mask_seed), half_masks(targets, private, settings.mask_seed + 1)]
    )
    seeds = list(range(len(masks)))
    trained = []
    for i, entry in enumerate(settings.configurations):
        finetune = configuration(lab, settings, entry, f"mia.configurations[{i}]")
        models = [adapt(lab.backbone, finetune, seed) for seed in seeds]
        directory = lab.records_dir / json_hash([lab.recipe, finetune, masks.tolist(), seeds])
        records = train_group(models, lab.task, finetune, masks, seeds, directory, settings.ensemble_size, progress)
        trained.append((finetune, records))
    if rank_and_world()[0] != 0:
        return []
    return [attack(lab, f, records[:shadows], records[shadows:], settings.resamples) for f, records in trained]


def configuration(lab: Lab, settings: MembershipSettings, entry: dict, where: str) -> FinetuneSettings:
    """`finetune.*` with the entry's overrides; a dpsgd `noise_multiplier: match` is resolved here."""
    values = {**dataclasses.asdict(lab.finetune), **entry}
    if values.get("noise_multiplier") == "match":
        reference = from_config(FinetuneSettings, {**values, "noise_multiplier": 1.0}, where)
        values["noise_multiplier"] = matched_noise_multiplier(lab, reference, settings.dp_match_rank)
    return from_config(FinetuneSettings, values, where)


def matched_noise_multiplier(lab: Lab, dpsgd: FinetuneSettings, rank: int) -> float:
    """The DP-SGD σ whose per-step noise-to-signal energy equals LoRA-FA's at `rank`.

    One LoRA-FA step on a layer with gradient G adds noise of total variance (d_in + κ − 2)‖G‖²/r
    (Gaussian A, κ = 3), so over the adapted layers its noise-to-signal ratio is
    q = Σ (d_in + 1)‖G_l‖² / (r Σ ‖G_l‖²). DP-SGD adds N(0, σ²C²/B²) to each of D coordinates of the
    mean clipped gradient ḡ: ratio σ²C²D / (B²‖ḡ‖²). Equal ratios give σ = (B‖ḡ‖/C)·√(q/D), with G
    and ḡ measured on the private split at the pretrained backbone.
    """
    lora = FinetuneSettings(method="lora_fa", rank=rank, target_modules=dpsgd.target_modules)
    target_weights = {f"{m}.weight" for m in lora.target_modules}
    dp_model = adapt(lab.backbone, dpsgd, seed=0)
    names = [n for n, p in dp_model.named_parameters() if p.requires_grad]
    per_example = example_gradients(dp_model, lab.task.private, names)
    flat = torch.cat([g.flatten(1) for g in per_example.values()], dim=1)
    clipped = flat * (dpsgd.clip / flat.norm(dim=1, keepdim=True).clamp_min(dpsgd.clip)).clamp(max=1.0)
    mean_clipped = clipped.mean(0).norm()
    full = example_gradients(lab.backbone, lab.task.private, sorted(target_weights))
    signal = sum(g.mean(0).square().sum() for g in full.values())
    noise = sum((g.shape[-1] + 1) * g.mean(0).square().sum() for g in full.values()) / rank
    batch = min(dpsgd.batch_size, len(lab.task.private) // 2)
    return float(batch * mean_clipped / dpsgd.clip * torch.sqrt(noise / signal / flat.shape[1]))


def attack(
    lab: Lab, finetune: FinetuneSettings, shadows: list[TrainingRecord], targets: list[TrainingRecord], resamples: int
) -> ConfigurationResult:
    labels = lab.task.private.labels
    phi = {
        side: logit_confidence(torch.stack([r.private_logits for r in records]), labels).double().numpy()
        for side, records in (("shadow", shadows), ("target", targets))
    }
    shadow_in = np.stack([r.mask for r in shadows])
    logits = torch.stack([r.private_logits for r in targets])
    losses = F.cross_entropy(logits.flatten(0, 1), labels.repeat(len(targets)), reduction="none").view(len(targets), -1)
    scores: dict[str, np.ndarray] = {
        "lira_online": lira_online(phi["target"], phi["shadow"], shadow_in),
        "lira_offline": lira_offline(phi["target"], phi["shadow"], shadow_in),
        "lira_fixed_variance": lira_online(phi["target"], phi["shadow"], shadow_in, fixed_variance=True),
        "loss": loss_attack(losses.double().numpy()),
        "white_box": white_box_scores(lab, finetune, targets),
    }
    members = np.stack([r.mask for r in targets])
    summary = {
        "method": finetune.method,
        "rank": finetune.rank if finetune.parameterisation in ("lora", "lora_fa") else None,
        "test_accuracy": float(np.mean([r.metrics["test_accuracy"] for r in targets])),
        "shadow_test_accuracy": float(np.mean([r.metrics["test_accuracy"] for r in shadows])),
    }
    if finetune.method == "dpsgd":
        summary |= {"noise_multiplier": finetune.noise_multiplier, "dpsgd_epsilon": targets[0].metrics["epsilon"]}
        summary["dpsgd_delta"] = finetune.delta
    attacks = {name: summarise(s.ravel(), members.ravel(), resamples=resamples) for name, s in scores.items()}
    summary |= {**attacks[HEADLINE], "headline_attack": HEADLINE, "attacks": attacks}
    return ConfigurationResult(finetune, summary, scores, members)


def white_box_scores(lab: Lab, finetune: FinetuneSettings, targets: list[TrainingRecord]) -> np.ndarray:
    """cos(−g_e, ΔW) per target and example: g_e at the public backbone, ΔW the merged weight change."""
    base = dict(lab.backbone.state_dict())
    deltas = [_weight_change(lab, finetune, record, base) for record in targets]
    names = sorted({n for delta in deltas for n, d in delta.items() if d.any()})
    return alignment_scores(lab.backbone, lab.task.private, deltas, names)


def alignment_scores(
    backbone: nn.Module, examples: Examples, deltas: list[dict[str, torch.Tensor]], names: list[str]
) -> np.ndarray:
    """[len(deltas), examples]: cos(−g_e, ΔW) over the parameters `names`, g_e the example's loss
    gradient at `backbone` (computed once for all weight changes)."""
    changes = [torch.cat([d[n].flatten() for n in names]) for d in deltas]
    parts = [
        torch.stack([gradient_alignment(flat, change) for change in changes])
        for _, flat in flat_gradient_chunks(backbone, examples, names)
    ]
    return torch.cat(parts, dim=1).double().cpu().numpy()


def _weight_change(
    lab: Lab, finetune: FinetuneSettings, record: TrainingRecord, base: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    model = adapt(lab.backbone, finetune, record.seed)
    model.load_state_dict(record.state, strict=False)
    return weight_change(model, base)
