"""The ViT-B/16 recipe's code without timm (CI has none): a stand-in `timm` module with the names of
timm's ViT (`patch_embed.proj`, `blocks.0.attn.qkv`, `head`) checks loading, reloading, the recipe
hash and the one-line errors; one test with the real timm runs only where it is installed."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from dsire.errors import UserError
from dsire.lab.backbones import BackboneSettings, backbone_from_state, vit_b16, weights_sha256
from dsire.lab.build import NESTED, build_lab
from dsire.lab.data import TaskSettings, load_task
from dsire.lab.ensemble import Ensemble, train
from dsire.lab.methods import FinetuneSettings, adapt
from dsire.privacy.membership import MembershipSettings, alignment_scores
from dsire.project import ROOT
from dsire.settings import from_config
from dsire.unlearning.clusters import ClusterSettings


class Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = Attention(width)


class TinyViT(nn.Module):
    """timm's ViT layer names on 8×8 RGB inputs: a 4×4 patch embedding, one block, a head."""

    def __init__(self, num_classes: int, width: int = 6):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, 4, stride=4)
        self.blocks = nn.Sequential(Block(width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed.proj(x).flatten(2).mT
        q, k, v = self.blocks[0].attn.qkv(tokens).chunk(3, dim=-1)
        attended = torch.softmax(q @ k.mT, dim=-1) @ v
        return self.head((tokens + attended).mean(1))


@pytest.fixture
def timm(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """A stand-in timm whose create_model records its calls and builds a TinyViT."""
    calls: list[tuple] = []

    def create_model(name: str, pretrained: bool, num_classes: int) -> nn.Module:
        calls.append((name, pretrained, num_classes))
        return TinyViT(num_classes)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    return calls


def weights_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(TinyViT(1000).state_dict(), str(path))  # a checkpoint with ImageNet's head: replaced
    return path


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in range(2):
        (root / str(label)).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) // (1 + label)
            Image.fromarray(pixels).save(root / str(label) / f"{i}.png")
    return root


def test_vit_body_from_the_weights_file_and_a_new_head(timm: list, tmp_path: Path) -> None:
    path = weights_file(tmp_path / "vit.safetensors", seed=0)
    model = vit_b16(path, classes=3)
    assert timm == [("vit_base_patch16_224", False, 3)]
    torch.manual_seed(0)
    saved = TinyViT(1000)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, saved.blocks[0].attn.qkv.weight, rtol=0, atol=0)
    assert model.head.weight.shape == (3, 6)


def test_cached_vit_backbone_reads_back(timm: list) -> None:
    """`backbone_from_state` (audit-membership --backbone) rebuilds a ViT, head and classes included."""
    original = TinyViT(5)
    model = backbone_from_state(original.state_dict(), "backbone.safetensors")
    assert timm[-1] == ("vit_base_patch16_224", False, 5)
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
    wrong = {**original.state_dict(), "blocks.0.attn.qkv.weight": torch.zeros(2, 2)}
    with pytest.raises(UserError, match=r"^backbone.safetensors: not the state dict of a ViT-B/16"):
        backbone_from_state(wrong, "backbone.safetensors")
    headless = {k: v for k, v in original.state_dict().items() if not k.startswith("head.")}
    with pytest.raises(UserError, match=r"without head\.weight"):
        backbone_from_state(headless, "backbone.safetensors")


def test_vit_without_timm_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(UserError, match=r"needs timm: pip install -e '\.\[vit\]'"):
        backbone_from_state(TinyViT(2).state_dict(), "backbone.safetensors")
    with pytest.raises(UserError, match="needs timm"):
        vit_b16(weights_file(tmp_path / "vit.safetensors", seed=0), classes=2)


def test_recipe_changes_with_the_weights_not_only_their_path(tmp_path: Path) -> None:
    path = weights_file(tmp_path / "vit.safetensors", seed=0)
    settings = BackboneSettings(name="vit_b16", weights=str(path))
    first = weights_sha256(settings)
    weights_file(path, seed=1)
    assert weights_sha256(settings) != first
    assert weights_sha256(BackboneSettings()) is None
    with pytest.raises(UserError, match=r"^task.backbone.weights: .*missing.safetensors not found"):
        weights_sha256(BackboneSettings(name="vit_b16", weights=str(tmp_path / "missing.safetensors")))


def compose_audit(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("audit", overrides=[f"paths.root_dir={ROOT}", *overrides])


def test_image_folder_recipe_through_the_lab(timm: list, tmp_path: Path) -> None:
    """The recipe's config (task=image_folder) builds a lab on the stand-in: the head pretrained and
    cached, LoRA on `qkv`; a new weights file at the same path is a new recipe."""
    folder, path = image_folder(tmp_path / "images"), weights_file(tmp_path / "vit.safetensors", seed=0)
    overrides = [
        "task=image_folder",
        f"task.path={folder}",
        f"task.backbone.weights={path}",
        "task.image_size=8",
        "task.pretrain.steps=2",
        "finetune.target_modules=[qkv]",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    lab = build_lab(compose_audit(*overrides))
    assert isinstance(lab.backbone, TinyViT) and lab.task.input_shape == (3, 8, 8)
    assert len(list((tmp_path / "cache" / "lab").glob("backbone_*.safetensors"))) == 1
    again = build_lab(compose_audit(*overrides))  # from the cache: the same recipe, the same backbone
    assert again.recipe == lab.recipe
    assert all(torch.equal(again.backbone.state_dict()[n], t) for n, t in lab.backbone.state_dict().items())
    model = adapt(lab.backbone, lab.finetune, seed=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "base_model.model.blocks.0.attn.qkv.lora_A.default.weight",
        "base_model.model.blocks.0.attn.qkv.lora_B.default.weight",
    }
    weights_file(path, seed=1)
    assert build_lab(compose_audit(*overrides)).recipe != lab.recipe


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.path=/nonexistent/images", r"^task.path: /nonexistent/images is not a directory"),
        ("task.backbone.weights=/nonexistent/vit.safetensors", r"^task.backbone.weights: /nonexistent/vit.safetens"),
        ("task.backbone.weights=null", r"^task.backbone.weights: vit_b16 needs a local weights file"),
    ],
)
def test_missing_paths_are_one_line(tmp_path: Path, override: str, message: str) -> None:
    folder = image_folder(tmp_path / "images")
    cfg = compose_audit("task=image_folder", f"task.path={folder}", "task.backbone.weights=x.safetensors", override)
    with pytest.raises(UserError, match=message):
        build_lab(cfg)


def test_chunked_gradients_and_logits_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """White-box scores and ensemble logits are computed in chunks sized for a ViT; tiny limits
    (many chunks) give what one pass gives."""
    task = load_task(TaskSettings(private_limit=40))
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).requires_grad_(False)
    names = ["1.weight", "1.bias"]
    deltas = [{n: torch.randn_like(dict(backbone.named_parameters())[n]) for n in names} for _ in range(2)]
    whole = alignment_scores(backbone, task.private, deltas, names)
    settings = FinetuneSettings(method="full", steps=3, batch_size=4)
    ensemble, _ = train(
        [adapt(backbone, settings, s) for s in (0, 1)],
        task.private,
        torch.ones(2, 40, dtype=torch.bool),
        [0, 1],
        settings,
    )
    logits = ensemble.logits(task.private)
    monkeypatch.setattr("dsire.lab.gradients.GRADIENT_NUMBERS", 650 * 7)  # 7 examples a chunk
    monkeypatch.setattr("dsire.lab.ensemble.INPUT_NUMBERS", 2 * 64 * 9)  # 9 examples a pass
    np.testing.assert_allclose(alignment_scores(backbone, task.private, deltas, names), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ensemble.logits(task.private), logits)
    assert isinstance(ensemble, Ensemble)


def test_real_vit_b16_loads_reloads_and_takes_lora_on_qkv(tmp_path: Path) -> None:
    """With timm installed (the `vit` extra): the real ViT-B/16 from a weights file, read back from
    its state dict, and peft's LoRA on all 12 blocks' qkv."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("vit_base_patch16_224", pretrained=False).state_dict(), str(path))
    model = vit_b16(path, classes=10)
    assert model.head.out_features == 10
    again = backbone_from_state(model.state_dict(), "backbone")
    assert all(torch.equal(again.state_dict()[n], t) for n, t in model.state_dict().items())
    adapted = adapt(model.requires_grad_(False), FinetuneSettings(rank=2, target_modules=("qkv",)), seed=0)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert len(trainable) == 24 and all(".attn.qkv.lora_" in n for n in trainable)
    with torch.no_grad():
        assert adapted(torch.zeros(1, 3, 224, 224)).shape == (1, 10)


def test_real_scale_recipes_are_valid_settings() -> None:
    """mia_rank_vit and unlearn_vit (never run here) hold settings the lab accepts, LoRA on qkv."""
    paths = ("task.path=images", "task.backbone.weights=w.safetensors")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        audit = compose("audit", overrides=["+experiment=mia_rank_vit", *paths])
        unlearn = compose("unlearn", overrides=["+experiment=unlearn_vit", *paths])
    for cfg in (audit, unlearn):
        assert from_config(BackboneSettings, cfg.task.backbone, "task.backbone").name == "vit_b16"
        from_config(TaskSettings, {k: v for k, v in cfg.task.items() if k not in NESTED}, "task")
        assert from_config(FinetuneSettings, cfg.finetune, "finetune").target_modules == ("qkv",)
    assert audit.lab.accelerator == "gpu"
    finetune = dataclasses.asdict(from_config(FinetuneSettings, audit.finetune, "finetune"))
    for entry in from_config(MembershipSettings, audit.mia, "mia").configurations:
        from_config(FinetuneSettings, {**finetune, **entry}, "mia.configurations")
    from_config(ClusterSettings, unlearn.unlearning.clustering, "unlearning.clustering")
