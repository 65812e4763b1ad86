"""The unlearnable model: public prototypes and one adapter per non-empty cluster, in one safetensors file.

The file holds tensors (prototypes, each cluster's trainable tensors) and a JSON header with
everything needed to rebuild and retrain it: the task, fine-tune and unlearning settings, the
backbone's hash, which cluster serves each prototype, each cluster's seed and member ids, and the
ids forgotten so far. Nothing in it
depends on when or how fast it was made, so a forget and a retrain of the same data write the
same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsire.atomic import atomic_path
from dsire.errors import UserError
from dsire.lora.files import read_safetensors
from dsire.lora.model import LoRAError
from dsire.unlearning.clusters import route

MODEL_VERSION = 2
HEADER_KEY = "dsire_unlearning"


@dataclass
class UnlearnableModel:
    config: dict  # {"task": ..., "finetune": ..., "unlearning": ...}: the recipe, to rebuild the lab
    recipe: str  # the lab's recipe hash (task, backbone, pretraining)
    backbone_sha256: str  # of the public backbone's tensors
    prototypes: torch.Tensor  # [k, d] float64
    members: dict[int, list[str]]  # cluster -> ids of the private examples it trained on (never empty)
    seeds: dict[int, int]
    owner: list[int]  # prototype -> the cluster serving its inputs (-1: none; another: merged into it)
    states: dict[int, dict[str, torch.Tensor]] = field(repr=False)  # cluster -> trainable tensors
    forgotten: list[str] = field(default_factory=list)  # sorted ids removed by forget requests

    @property
    def alive(self) -> list[int]:
        """Clusters with an adapter, in index order."""
        return sorted(self.states)

    def route(self, points: torch.Tensor) -> torch.Tensor:
        """[n] the cluster serving each point: its nearest served prototype's owner (-1 when none is)."""
        served = [p for p, cluster in enumerate(self.owner) if cluster >= 0]
        owner = torch.as_tensor([*self.owner, -1])
        return owner[route(points, self.prototypes, served)]  # -1 indexes the appended -1

    def adapter_parameters(self, cluster: int) -> int:
        return sum(t.numel() for t in self.states[cluster].values())


def save_model(model: UnlearnableModel, path: Path) -> None:
    """Atomically: an old file at `path` stays whole until the new one is completely written."""
    tensors = {"prototypes": model.prototypes.contiguous()}
    for cluster, state in model.states.items():
        tensors |= {f"cluster/{cluster}/{name}": t.contiguous() for name, t in state.items()}
    header = {
        "version": MODEL_VERSION,
        "config": model.config,
        "recipe": model.recipe,
        "backbone_sha256": model.backbone_sha256,
        "members": {str(c): ids for c, ids in sorted(model.members.items())},
        "seeds": {str(c): s for c, s in sorted(model.seeds.items())},
        "owner": model.owner,
        "forgotten": model.forgotten,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})


def load_model(path: Path, where: str = "ckpt") -> UnlearnableModel:
    """The model at `path`, or a UserError naming `where` when it is missing, damaged or not one."""
    if not Path(path).is_file():
        raise UserError(where, f"{path} is not a file (a model.safetensors written by unlearn.py)")
    try:
        tensors, metadata = read_safetensors(Path(path))
        header = json.loads(metadata[HEADER_KEY])
        if header["version"] != MODEL_VERSION:
            raise ValueError(f"version {header['version']}, this code reads {MODEL_VERSION}")
        states: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            if key.startswith("cluster/"):
                _, cluster, name = key.split("/", 2)
                states.setdefault(int(cluster), {})[name] = tensor.clone()
        members = {int(c): list(ids) for c, ids in header["members"].items()}
        owner = [int(c) for c in header["owner"]]
        if set(members) != set(states) or set(owner) - {-1} != set(states) or len(owner) != len(tensors["prototypes"]):
            raise ValueError("clusters with members, with adapters and serving prototypes differ")
        return UnlearnableModel(
            config=header["config"],
            recipe=header["recipe"],
            backbone_sha256=header["backbone_sha256"],
            prototypes=tensors["prototypes"].clone(),
            members=members,
            seeds={int(c): int(s) for c, s in header["seeds"].items()},
            owner=owner,
            states=states,
            forgotten=list(header["forgotten"]),
        )
    except (LoRAError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(where, f"{path} is not an unlearning model of this version ({str(exc)[:200]})") from None
