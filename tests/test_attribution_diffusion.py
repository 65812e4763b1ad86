"""Attribution of a tiny-recipe diffusion LoRA: per-example denoising gradients against autograd, and
`attribute.py +experiment=source_diffusion_tiny` end to end (pinned LDS, files that recompute it, a
trajectory of other images refused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dsire.attribution.curvature import tracked_modules
from dsire.attribution.diffusion import (
    DiffusionSettings,
    check_trajectory,
    denoising_data,
    denoising_gradients,
    denoising_losses,
    lora_unet,
)
from dsire.attribution.lds import lds_per_query
from dsire.attribution.trajectory import load_trajectory
from dsire.errors import UserError
from dsire.project import ROOT
from dsire.zoo.base import BaseModel
from dsire.zoo.recipes import load_base
from tests.conftest import run_dir, run_job


@pytest.fixture(scope="module")
def base() -> BaseModel:
    cfg = OmegaConf.load(ROOT / "configs" / "zoo" / "tiny.yaml")
    cfg.base.path = str(ROOT / "data" / "base" / "tiny.safetensors")
    return load_base(cfg)


def test_denoising_gradients_are_each_images_autograd_gradient(base: BaseModel) -> None:
    settings = DiffusionSettings(images=5, draws=3)
    train, _ = denoising_data(base, settings, queries=1)
    lora = OmegaConf.create({"rank": 2, "alpha": 2, "target_modules": ["to_k", "to_v"]})
    unet = lora_unet(base, lora, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fresh adapter's B is 0 (so are A's gradients): move every LoRA weight
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    modules = tracked_modules(unet)
    assert len(modules) == 32 and modules[0].endswith("attn1.to_k.lora_A.zoo")  # A and B of k and v, 8 attentions
    batched = denoising_gradients(unet, base.scheduler, train, modules)
    params = dict(unet.named_parameters())
    for i in (0, 3):
        one = type(train)(
            train.examples,
            *(t[i : i + 1] for t in (train.images, train.token_ids, train.context, train.timesteps, train.noise)),
        )
        loss = denoising_losses(unet, base.scheduler, one).sum()
        exact = torch.autograd.grad(loss, [params[f"{m}.weight"] for m in modules])
        for m, g in zip(modules, exact, strict=True):
            torch.testing.assert_close(batched[m][i], g.double(), rtol=1e-4, atol=1e-4 * float(g.abs().max()))


@pytest.fixture(scope="module")
def diffusion_tiny(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("source_diffusion")
    result = run_job("attribute.py", tmp_path, "+experiment=source_diffusion_tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path


def test_source_diffusion_tiny_pinned_lds(diffusion_tiny: Path, base: BaseModel) -> None:
    run = run_dir(diffusion_tiny, "source_diffusion_tiny")
    report = json.loads((run / "lds.json").read_text())
    # 3 queries × 4 subsets: a regression pin of the whole path, not a comparison of the methods
    expected = {"source": 0.133, "influence": 0.867, "tracin": 0.133, "gradient_similarity": 0.533, "random": -0.067}
    assert list(report) == list(expected)
    for method, value in expected.items():
        assert report[method]["lds"] == pytest.approx(value, abs=0.02), method
    scores = load_file(str(run / "scores.safetensors"))
    truth = load_file(str(run / "lds_ground_truth.safetensors"))
    assert scores["source"].shape == (3, 12) and truth["margins"].shape == (4, 1, 3)
    for method, s in scores.items():  # the files recompute the report
        per_query = lds_per_query(s.numpy(), truth["masks"].numpy().astype(bool), truth["margins"].mean(1).numpy())
        assert per_query.mean() == pytest.approx(report[method]["lds"], abs=1e-6)
    assert (run / "figures" / "attribution_top_k_source.png").is_file()
    summary = json.loads((run / "attribution.json").read_text())
    assert summary["trajectory"] == {"boundaries": [0, 10, 20], "checkpoints": [[5], [15]]}
    (path,) = (diffusion_tiny / "cache" / "attribution").glob("trajectory_diffusion_*.safetensors")
    settings = DiffusionSettings(images=12, draws=2, steps=20)
    other, _ = denoising_data(base, DiffusionSettings(images=12, draws=2, steps=20, data_seed=1), queries=3)
    with pytest.raises(UserError, match="trained on other images"):
        check_trajectory(load_trajectory(path), base, other, settings)
