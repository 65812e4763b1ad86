"""`dsire audit-membership`: an auditor's own fine-tune, scored against reference non-members."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from dsire.lab.backbones import BackboneSettings, backbone_from_state, build_backbone
from dsire.lab.data import digit_examples
from dsire.lab.ensemble import train
from dsire.lab.methods import FinetuneSettings, adapt, effective_weights
from dsire.lora.files import read_safetensors
from dsire.lora.save import save_lora
from dsire.privacy.auditor import empirical_p_values
from dsire.privacy.metrics import auc
from tests.conftest import run_dsire

MEMBERS, NON_MEMBERS, REFERENCE = range(0, 30), range(30, 60), range(60, 120)


def write_ids(path: Path, ids) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["example"])
        writer.writerows([f"digits/{i}"] for i in ids)
    return path


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory) -> Path:
    """A LoRA (peft and kohya files) and its whole fine-tuned state, overfitted on 30 digits."""
    root = tmp_path_factory.mktemp("auditor")
    digits, classes, shape = digit_examples()
    torch.manual_seed(0)
    backbone = build_backbone(BackboneSettings(hidden=32), shape, classes)
    public = torch.zeros(1, len(digits), dtype=torch.bool)
    public[0, 1700:] = True  # briefly pretrained on digits the audit never asks about: a weak backbone
    pretrain = FinetuneSettings(method="full", steps=60, batch_size=32, lr=0.05)
    backbone = train([adapt(backbone, pretrain, 0)], digits, public, [0], pretrain)[0].model(0).requires_grad_(False)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(root / "backbone.safetensors"))
    settings = FinetuneSettings(method="lora", rank=4, steps=200, batch_size=10, lr=0.01)
    mask = torch.zeros(1, len(digits), dtype=torch.bool)
    mask[0, list(MEMBERS)] = True
    ensemble, _ = train([adapt(backbone, settings, 0)], digits, mask, [0], settings)
    model = ensemble.model(0)
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    config = model.peft_config["default"].to_dict()
    save_lora(state, root / "peft", "peft", config)
    save_lora(state, root / "kohya.safetensors", "kohya", config)
    whole = effective_weights(model)
    save_file({k: v.contiguous() for k, v in whole.items()}, str(root / "whole.safetensors"))
    write_ids(root / "candidates.csv", [*MEMBERS, *NON_MEMBERS])
    write_ids(root / "reference.csv", REFERENCE)
    return root


def expected_white_box(root: Path) -> np.ndarray:
    """cos(−g, ΔW) computed here from the saved weights, with plain autograd per example."""
    backbone = backbone_from_state(read_safetensors(root / "backbone.safetensors")[0], "backbone")
    whole = read_safetensors(root / "whole.safetensors")[0]
    names = [n for n, w in backbone.state_dict().items() if not torch.equal(w, whole[n])]
    delta = torch.cat([(whole[n] - backbone.state_dict()[n]).flatten() for n in names])
    digits, _, _ = digit_examples()
    params = dict(backbone.named_parameters())
    scores = []
    for i in [*MEMBERS, *NON_MEMBERS]:
        backbone.zero_grad()
        for parameter in params.values():
            parameter.requires_grad_(True)
        torch.nn.functional.cross_entropy(backbone(digits.take(torch.tensor([i]))), digits.labels[[i]]).backward()
        g = torch.cat([params[n].grad.flatten() for n in names])
        scores.append(float(-(g @ delta) / (g.norm() * delta.norm())))
    return np.array(scores)


def audit(root: Path, finetune: str, *extra: str):
    return run_dsire(
        "audit-membership",
        str(root / finetune),
        "--backbone",
        str(root / "backbone.safetensors"),
        "--candidates",
        str(root / "candidates.csv"),
        "--reference",
        str(root / "reference.csv"),
        *extra,
    )


def read_scores(path: Path) -> dict[str, np.ndarray]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["example"] for r in rows] == [f"digits/{i}" for i in [*MEMBERS, *NON_MEMBERS]]
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0] if k not in ("example", "label")}


def test_members_score_higher_and_every_format_agrees(fine_tune: Path, tmp_path: Path) -> None:
    runs = {}
    for finetune in ("peft", "kohya.safetensors", "whole.safetensors"):
        result = audit(fine_tune, finetune, "--out", str(tmp_path / f"{finetune}.csv"))
        assert result.returncode == 0, result.stderr
        assert "candidates below p = 0.05" in result.stdout
        runs[finetune] = read_scores(tmp_path / f"{finetune}.csv")
    scores = runs["peft"]
    members = np.arange(60) < 30
    assert auc(scores["loss_score"], members) > 0.65  # measured 0.67: members were fitted
    p = scores["loss_p_value"]
    assert ((p > 0) & (p <= 1)).all() and np.median(p[members]) < np.median(p[~members])
    np.testing.assert_allclose(scores["white_box_score"], expected_white_box(fine_tune), rtol=1e-4, atol=1e-6)
    for other in ("kohya.safetensors", "whole.safetensors"):
        for key in scores:
            np.testing.assert_allclose(runs[other][key], scores[key], rtol=1e-4, atol=1e-5, err_msg=f"{other} {key}")


def test_p_values_are_conformal_ranks() -> None:
    reference = np.array([0.1, 0.2, 0.2, 0.5])
    np.testing.assert_allclose(empirical_p_values(np.array([0.0, 0.2, 0.3, 0.9]), reference), [1, 4 / 5, 2 / 5, 1 / 5])
    rng = np.random.default_rng(0)  # non-members: P(p ≤ 0.1) ≈ 0.1 over many draws
    rates = [(empirical_p_values(rng.normal(size=200), rng.normal(size=99)) <= 0.1).mean() for _ in range(200)]
    assert np.mean(rates) == pytest.approx(0.1, abs=0.01)


def test_mistakes_are_one_line(fine_tune: Path, tmp_path: Path) -> None:
    few = write_ids(tmp_path / "few.csv", range(60, 70))
    result = audit(fine_tune, "peft", "--reference", str(few))
    assert (
        result.returncode == 2 and result.stderr.strip() == f"error: {few}: 10 reference examples; p-values need ≥ 19"
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("example\ndigits/1\ndigits/99999\n")
    result = audit(fine_tune, "peft", "--candidates", str(bad))
    assert result.returncode == 2 and result.stderr.strip().startswith(
        f"error: {bad}:3: unknown example 'digits/99999'"
    )
    broken = tmp_path / "nan.safetensors"
    lora = {"fc1.lora_A.weight": torch.full((2, 64), float("nan")), "fc1.lora_B.weight": torch.ones(32, 2)}
    save_lora(lora, broken, "kohya", {"r": 2, "lora_alpha": 2, "target_modules": ["fc1"]})
    result = audit(fine_tune, str(broken))
    assert result.returncode == 2 and result.stderr.startswith(f"error: {broken}") and "Traceback" not in result.stderr
