"""Training records: for one trained model, which private examples it saw, how, and what it became.

Attacks, attribution and unlearning all read records, never the training loop. A record is one
safetensors file (tensors and a JSON header, no pickle), written atomically, so a killed run
leaves whole records only and its successor trains just the missing ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from dsire.atomic import atomic_path
from dsire.lora.files import read_safetensors
from dsire.lora.model import LoRAError

RECORD_VERSION = 3  # bumped when training changes what a record holds (3: ensemble matrices train transposed)


@dataclass
class TrainingRecord:
    model: int  # index of the model in its group
    seed: int
    settings: dict  # FinetuneSettings as a dict
    mask: np.ndarray  # bool [private examples]: which ones the model trained on
    metrics: dict[str, float]  # test_accuracy, and epsilon for dpsgd
    state: dict[str, torch.Tensor] = field(repr=False)  # per-model tensors after training
    initial: dict[str, torch.Tensor] = field(repr=False)  # trainable tensors before training
    private_logits: torch.Tensor = field(repr=False)  # [private examples, classes]


def save_record(record: TrainingRecord, path: Path) -> None:
    tensors = {f"state/{k}": v.contiguous() for k, v in record.state.items()}
    tensors |= {f"initial/{k}": v.contiguous() for k, v in record.initial.items()}
    tensors["mask"] = torch.from_numpy(record.mask.astype(np.uint8))
    tensors["private_logits"] = record.private_logits.contiguous()
    header = {"version": RECORD_VERSION, "model": record.model, "seed": record.seed}
    header |= {"settings": record.settings, "metrics": record.metrics}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"dsire_record": json.dumps(header)})


def load_record(path: Path) -> TrainingRecord | None:
    """The record at `path`, or None when it is missing, damaged or of another version."""
    try:
        tensors, metadata = read_safetensors(path)
        tensors = {k: v.clone() for k, v in tensors.items()}  # not backed by the file if it is replaced
        header = json.loads(metadata["dsire_record"])
    except (LoRAError, KeyError, ValueError, OSError):
        return None
    if header.get("version") != RECORD_VERSION or "mask" not in tensors or "private_logits" not in tensors:
        return None
    return TrainingRecord(
        model=int(header["model"]),
        seed=int(header["seed"]),
        settings=header["settings"],
        mask=tensors["mask"].numpy().astype(bool),
        metrics=header["metrics"],
        state={k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")},
        initial={k.removeprefix("initial/"): v for k, v in tensors.items() if k.startswith("initial/")},
        private_logits=tensors["private_logits"],
    )
