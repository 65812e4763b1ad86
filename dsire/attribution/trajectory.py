"""A fine-tune trained through the lab with its trajectory recorded: segment boundaries, checkpoints
inside each segment and the learning rate, the record that Source needs besides the weights.

The trajectory is one safetensors file (checkpoint tensors and a JSON header, no pickle) written
atomically and cached by everything that shapes it, so a rerun (or a run killed and restarted)
reuses it. A file without the header is a checkpoint without its trajectory record: refused.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from dsire.atomic import atomic_path
from dsire.errors import UserError
from dsire.hashing import tensors_sha256
from dsire.lab.data import Examples
from dsire.lab.ensemble import Ensemble, train_ensemble
from dsire.lab.methods import FinetuneSettings
from dsire.lora.files import read_safetensors
from dsire.lora.model import LoRAError

TRAJECTORY_VERSION = 1
HEADER = "dsire_trajectory"


@dataclass
class Trajectory:
    boundaries: list[int]  # [0, …, steps]: segment ℓ runs from step boundaries[ℓ] to boundaries[ℓ + 1]
    checkpoint_steps: list[list[int]]  # per segment, the steps at which its checkpoints were taken
    checkpoints: list[list[dict[str, torch.Tensor]]] = dataclasses.field(repr=False)  # trainable tensors
    final: dict[str, torch.Tensor] = dataclasses.field(repr=False)
    settings: dict  # FinetuneSettings as a dict
    seed: int
    recipe: str  # the lab recipe (task, backbone, pretraining) whose backbone it fine-tunes
    data: str  # hash of the private labels it trained on (label noise changes them)

    @property
    def learning_rate(self) -> float:
        """SGD's effective step η/(1 − β) under momentum β (the rate at which a constant gradient moves)."""
        return self.settings["lr"] / (1 - self.settings["momentum"])

    def durations(self) -> list[float]:
        """η̄K per segment."""
        return [self.learning_rate * (b - a) for a, b in itertools.pairwise(self.boundaries)]


def checkpoint_plan(steps: int, segments: int, per_segment: int) -> tuple[list[int], list[list[int]]]:
    """Segment boundaries (as even as whole steps allow) and `per_segment` checkpoints spread over the
    middle of each segment, (2j + 1)/(2C) of the way through, so their mean stands for the segment."""
    if segments > steps:
        raise UserError("attribution.segments", f"{segments} segments for {steps} training steps: at most one per step")
    boundaries = [round(steps * i / segments) for i in range(segments + 1)]
    plan = [
        sorted({a + round((b - a) * (2 * j + 1) / (2 * per_segment)) for j in range(per_segment)})
        for a, b in itertools.pairwise(boundaries)
    ]
    return boundaries, plan


def train_trajectory(
    model: nn.Module,
    examples: Examples,
    settings: FinetuneSettings,
    seed: int,
    plan: tuple[list[int], list[list[int]]],
    recipe: str,
) -> Trajectory:
    """Fine-tune `model` (prepared by `adapt`) on every example with the lab's ensemble trainer (an
    ensemble of one), keeping the planned checkpoints."""
    if settings.method == "dpsgd":
        raise UserError("finetune.method", "attribution follows SGD trajectories; dpsgd's clipped, noisy steps are not")
    if settings.scale_lora_lr and settings.parameterisation in ("lora", "lora_fa"):
        raise UserError("finetune.scale_lora_lr", "Source needs one learning rate for every parameter: set it to false")
    boundaries, steps = plan
    flat = [s for segment in steps for s in segment]
    ensemble = Ensemble.from_models([model])
    everything = torch.ones(1, len(examples), dtype=torch.bool)
    taken = train_ensemble(ensemble, examples, everything, [seed], settings, snapshots=flat)
    unstack = [{n: t[0].cpu() for n, t in snap.items()} for snap in taken]
    checkpoints, i = [], 0
    for segment in steps:
        checkpoints.append(unstack[i : i + len(segment)])
        i += len(segment)
    final = {n: ensemble.stacked[n][0].cpu() for n in ensemble.trainable}
    return Trajectory(
        boundaries, steps, checkpoints, final, dataclasses.asdict(settings), seed, recipe, labels_hash(examples)
    )


def labels_hash(examples: Examples) -> str:
    return tensors_sha256({"labels": examples.labels})[:16]


def model_at(template: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `template` (the adapted, untrained model) holding the trainable `tensors`."""
    model = copy.deepcopy(template)
    missing = set(tensors) - set(dict(model.named_parameters()))
    if missing:
        raise UserError("attribution.trajectory", f"tensors {sorted(missing)[:3]} are not parameters of this model")
    device = next(model.parameters()).device
    model.load_state_dict({n: t.to(device) for n, t in tensors.items()}, strict=False)
    return model


def save_trajectory(trajectory: Trajectory, path: Path) -> None:
    tensors = {f"final/{n}": t.contiguous() for n, t in trajectory.final.items()}
    for i, segment in enumerate(trajectory.checkpoints):
        for j, checkpoint in enumerate(segment):
            tensors |= {f"checkpoint/{i}/{j}/{n}": t.contiguous() for n, t in checkpoint.items()}
    header = {f.name: getattr(trajectory, f.name) for f in dataclasses.fields(trajectory)}
    header = {k: v for k, v in header.items() if k not in ("checkpoints", "final")} | {"version": TRAJECTORY_VERSION}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER: json.dumps(header)})


def load_trajectory(path: Path) -> Trajectory:
    """The trajectory at `path`; a checkpoint without the trajectory record is a one-line error."""
    try:
        tensors, metadata = read_safetensors(path)
    except (LoRAError, OSError) as exc:
        raise UserError(str(path), f"not a readable safetensors file ({exc})") from None
    if HEADER not in metadata:
        raise UserError(
            str(path),
            "a checkpoint without its trajectory record (segments, checkpoints, learning rate); "
            "Source needs a trajectory file written by attribute.py",
        )
    header = json.loads(metadata[HEADER])
    if header.get("version") != TRAJECTORY_VERSION:
        raise UserError(str(path), f"trajectory version {header.get('version')}, this dsire reads {TRAJECTORY_VERSION}")
    tensors = {k: v.clone() for k, v in tensors.items()}
    checkpoints = [
        [_prefixed(tensors, f"checkpoint/{i}/{j}/") for j in range(len(segment))]
        for i, segment in enumerate(header["checkpoint_steps"])
    ]
    return Trajectory(
        header["boundaries"],
        header["checkpoint_steps"],
        checkpoints,
        _prefixed(tensors, "final/"),
        header["settings"],
        header["seed"],
        header["recipe"],
        header["data"],
    )


def check_matches(
    trajectory: Trajectory, recipe: str, examples: Examples, settings: FinetuneSettings, where: str
) -> None:
    """A trajectory of another model or other data gives meaningless scores: refuse it by name."""
    if trajectory.recipe != recipe:
        raise UserError(where, f"trained on lab recipe {trajectory.recipe}, this task's recipe is {recipe}")
    if trajectory.data != labels_hash(examples):
        raise UserError(where, f"trained on other private data than this task's {len(examples)} examples")
    if trajectory.settings != json.loads(json.dumps(dataclasses.asdict(settings))):
        raise UserError(where, f"trained with finetune settings {trajectory.settings}, not this config's")


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def flip_labels(examples: Examples, fraction: float, classes: int, seed: int) -> tuple[Examples, np.ndarray]:
    """`examples` with a seeded `fraction` of labels changed to another class, and which ones."""
    rng = np.random.default_rng(seed)
    flipped = rng.permutation(len(examples))[: round(fraction * len(examples))]
    labels = examples.labels.clone()
    labels[flipped] = (labels[flipped] + torch.as_tensor(rng.integers(1, classes, len(flipped)))) % classes
    return Examples(labels, examples.ids, examples.take), np.sort(flipped)
