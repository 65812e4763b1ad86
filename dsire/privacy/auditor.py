"""`dsire audit-membership`: was this candidate in my fine-tune? Scores with calibrated p-values.

An auditor has the fine-tune (a LoRA in any format dsire reads, or the whole fine-tuned state
dict), the public backbone it started from, candidate examples, and reference examples known not
to be in the fine-tune. Two scores per example: the loss attack (the fine-tuned model's loss) and
the white-box score that needs only the weight change, cos(−g, ΔW) with g the example's gradient
at the backbone. A candidate's p-value is the share of reference examples that score at least as
high, (1 + #{reference ≥ score}) / (1 + n): valid under "the candidate is exchangeable with the
reference non-members", so among non-member candidates p < 0.05 happens at most 5% of the time.
"""

from __future__ import annotations

import copy
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dsire.errors import UserError
from dsire.lab.backbones import backbone_from_state
from dsire.lab.data import Examples, digit_examples, image_folder_examples
from dsire.lora import LoRAError, load_lora
from dsire.lora.files import read_safetensors
from dsire.privacy.attacks import loss_attack
from dsire.privacy.membership import alignment_scores

ATTACKS = ("loss", "white_box")
MIN_REFERENCE = 19  # the smallest p-value is 1/(n + 1): 19 reference examples are needed to reach 0.05


@dataclass
class AuditResult:
    ids: list[str]
    labels: list[int]
    scores: dict[str, np.ndarray]  # attack -> [candidates]
    p_values: dict[str, np.ndarray]


def audit_membership(
    finetune: Path, backbone_path: Path, candidates: Path, reference: Path, image_size: int, allow_torch_load: bool
) -> AuditResult:
    backbone = load_backbone(backbone_path)
    deltas = weight_change(finetune, backbone, allow_torch_load)
    chosen, control = read_examples(candidates, image_size), read_examples(reference, image_size)
    for path, examples in ((candidates, chosen), (reference, control)):
        check_inputs(backbone, examples, path)
    if len(control) < MIN_REFERENCE:
        raise UserError(str(reference), f"{len(control)} reference examples; p-values need ≥ {MIN_REFERENCE}")
    fine_tuned = _apply(backbone, deltas)
    scores = {attack: score(attack, chosen, backbone, fine_tuned, deltas) for attack in ATTACKS}
    references = {attack: score(attack, control, backbone, fine_tuned, deltas) for attack in ATTACKS}
    p_values = {a: empirical_p_values(scores[a], references[a]) for a in ATTACKS}
    return AuditResult(chosen.ids, chosen.labels.tolist(), scores, p_values)


def empirical_p_values(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(1 + #{reference ≥ s}) / (1 + n) for each score s: the conformal p-value of "s is a non-member's"."""
    ordered = np.sort(reference)
    at_least = len(ordered) - np.searchsorted(ordered, scores, side="left")
    return (1 + at_least) / (1 + len(ordered))


def score(attack: str, examples: Examples, backbone: nn.Module, fine_tuned: nn.Module, deltas: dict) -> np.ndarray:
    if attack == "loss":
        with torch.no_grad():
            logits = fine_tuned(examples.take(torch.arange(len(examples))))
        if not torch.isfinite(logits).all():
            raise UserError("fine-tune", "the fine-tuned model gives NaN or infinite outputs on these examples")
        return loss_attack(F.cross_entropy(logits, examples.labels, reduction="none").double().numpy())
    return alignment_scores(backbone, examples, [deltas], sorted(deltas))[0]


def load_backbone(path: Path) -> nn.Module:
    try:
        state, _ = read_safetensors(path)
    except LoRAError as exc:
        raise UserError(str(path), exc.problem) from None
    return backbone_from_state(state, str(path)).requires_grad_(False)


def weight_change(path: Path, backbone: nn.Module, allow_torch_load: bool) -> dict[str, torch.Tensor]:
    """ΔW per backbone weight: from a LoRA (scale·up·down, layer names matched to the backbone's
    modules, a component prefix such as `unet.` dropped) or from a whole fine-tuned state dict."""
    base = dict(backbone.state_dict())
    if path.is_file() and path.suffix == ".safetensors":
        try:
            state, _ = read_safetensors(path)
        except LoRAError as exc:
            raise UserError(str(path), exc.problem) from None
        if set(state) == set(base):
            return {
                n: _checked(path, n, state[n], base[n]) - base[n] for n in base if not torch.equal(state[n], base[n])
            }
    try:
        lora = load_lora(path, allow_torch_load=allow_torch_load)
    except LoRAError as exc:
        raise UserError(exc.path, exc.problem) from None
    deltas = {}
    for name, layer in lora.layers.items():
        weight = _module_weight(name, base, path)
        deltas[weight] = _checked(path, name, layer.delta(torch.float32).reshape(base[weight].shape), base[weight])
    return deltas


def _module_weight(layer: str, base: dict[str, torch.Tensor], path: Path) -> str:
    for candidate in (layer, layer.partition(".")[2]):
        if f"{candidate}.weight" in base:
            return f"{candidate}.weight"
    modules = sorted({k.rsplit(".", 1)[0] for k in base})
    raise UserError(str(path), f"layer {layer} is not a module of the backbone (it has {', '.join(modules)})")


def _checked(path: Path, name: str, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if tensor.numel() != like.numel():
        raise UserError(
            str(path), f"{name}: shape {tuple(tensor.shape)} does not fit the backbone's {tuple(like.shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise UserError(str(path), f"{name}: NaN or infinite values")
    return tensor.to(like.dtype).reshape(like.shape)


def _apply(backbone: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(backbone)
    model.load_state_dict({n: w + deltas.get(n, 0) for n, w in backbone.state_dict().items()})
    return model.eval()


def check_inputs(backbone: nn.Module, examples: Examples, path: Path) -> None:
    """The examples fit the backbone: one forward pass on the first, or a one-line error."""
    try:
        with torch.no_grad():
            backbone(examples.take(torch.arange(1)))
    except RuntimeError:
        shape = tuple(examples.take(torch.arange(1)).shape[1:])
        raise UserError(str(path), f"examples of shape {shape} do not fit the backbone's input") from None


def read_examples(path: Path, image_size: int) -> Examples:
    """Labelled examples from a folder (one sub-folder of images per class, classes in sorted order)
    or a CSV whose column `example` names digits (`digits/17`, sklearn's index; a `label` column, if
    given, must agree with the digit's class)."""
    if path.is_dir():
        return image_folder_examples(path, image_size, str(path))[0]
    if not path.is_file():
        raise UserError(str(path), "not found: give a CSV (column example) or a folder of class sub-folders")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "example" not in rows[0]:
        raise UserError(str(path), "needs a column `example` (and optionally `label`) and at least one row")
    digits, _, _ = digit_examples()
    index = {identifier: i for i, identifier in enumerate(digits.ids)}
    picked = []
    for line, row in enumerate(rows, start=2):
        if row["example"] not in index:
            raise UserError(f"{path}:{line}", f"unknown example {row['example']!r} (digits ids are digits/0..1796)")
        if row.get("label") not in (None, "", str(int(digits.labels[index[row["example"]]]))):
            raise UserError(f"{path}:{line}", f"label {row['label']!r} is not {row['example']}'s class")
        picked.append(index[row["example"]])
    return digits.subset(np.array(picked))
