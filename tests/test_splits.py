"""Concept-grouped splits keep every concept on one side; the base-model guess reads names and widths."""

from __future__ import annotations

import pytest
import torch

from dsire.data.config import SplitConfig
from dsire.data.splits import make_splits
from dsire.lora.family import guess_base_model
from dsire.lora.model import LoRA, LoRALayer

CONCEPTS = [f"c{i:02d}" for i in range(30)]


def assert_concepts_kept_apart(splits, concepts):
    for split in splits:
        assert not set(split.train) & set(split.test)
        assert set(split.train) | set(split.test) == set(concepts)


def test_kfold_holds_each_concept_out_exactly_once():
    splits = make_splits(CONCEPTS, SplitConfig(protocol="kfold", folds=4, seed=3))
    assert len(splits) == 4
    assert_concepts_kept_apart(splits, CONCEPTS)
    held = sorted(c for s in splits for c in s.test)
    assert held == CONCEPTS
    assert sorted(len(s.test) for s in splits) == [7, 7, 8, 8]


def test_paper_protocol_draws_n_train_concepts_per_repeat():
    config = SplitConfig(protocol="paper", n_train=15, repeats=10, seed=0)
    splits = make_splits(CONCEPTS, config)
    assert len(splits) == 10
    assert_concepts_kept_apart(splits, CONCEPTS)
    assert {len(s.train) for s in splits} == {15} and {len(s.test) for s in splits} == {15}
    assert len({s.train for s in splits}) == 10  # each repeat draws its own training concepts
    assert make_splits(CONCEPTS, config) == splits  # the seed fixes them
    other = make_splits(CONCEPTS, SplitConfig(protocol="paper", n_train=15, repeats=10, seed=1))
    assert other != splits
    # every concept is tested about equally often over many repeats: a uniform draw, not a fixed cut
    many = make_splits(CONCEPTS, SplitConfig(protocol="paper", n_train=15, repeats=2000, seed=0))
    tested = [sum(c in s.test for s in many) / len(many) for c in CONCEPTS]
    assert min(tested) > 0.44 and max(tested) < 0.56  # 0.5 ± 4.5 standard errors


def test_splits_depend_only_on_the_concepts_given():
    """Order and repeats of the concept list do not matter: only the set (what the readable LoRAs have)."""
    config = SplitConfig(protocol="kfold", folds=5, seed=0)
    assert make_splits(CONCEPTS, config) == make_splits(sorted(set(CONCEPTS[::-1] * 3)), config)


def lora(**widths: tuple[int, int]) -> LoRA:
    """A LoRA with one rank-1 layer per name, ΔW of shape (out, in)."""
    layers = {
        name.replace("__", "."): LoRALayer(torch.ones(1, i), torch.ones(o, 1), 1.0, 1.0, True)
        for name, (o, i) in widths.items()
    }
    return LoRA(source="x", format="peft", layers=layers)


@pytest.mark.parametrize(
    ("widths", "guess"),
    [
        ({"unet__mid_block__attn2__to_k": (320, 768)}, "Stable Diffusion 1.x"),
        ({"unet__mid_block__attn2__to_k": (320, 1024)}, "Stable Diffusion 2.x"),
        ({"unet__mid_block__attn2__to_v": (640, 2048)}, "Stable Diffusion XL"),
        ({"unet__a__attn1__to_q": (32, 32), "text_encoder_2__x__q_proj": (8, 8)}, "Stable Diffusion XL"),
        ({"unet__mid_block__attn2__to_k": (32, 24)}, "UNet2DConditionModel (cross-attention dim 24)"),
        ({"unet__mid_block__attn1__to_q": (32, 32)}, "UNet2DConditionModel"),
        ({"transformer__single_transformer_blocks__0__attn__to_q": (8, 8)}, "Flux-like DiT (diffusers transformer)"),
        ({"transformer__transformer_blocks__0__attn__to_q": (8, 8)}, "diffusion transformer (diffusers)"),
        ({"text_encoder__layers__0__self_attn__q_proj": (8, 8)}, "CLIP text encoder (Stable Diffusion)"),
        ({"model__layers__0__self_attn__q_proj": (8, 8)}, "transformers language model"),
        ({"something__else": (8, 8)}, "unknown"),
    ],
)
def test_guess_base_model(widths, guess):
    assert guess_base_model(lora(**widths)) == guess
