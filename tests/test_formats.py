"""Every published layout of one fine-tune reads back to the same canonical layers and ΔW."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
from safetensors.torch import load_file, save_file

from dsire.data.cache import SpectraCache
from dsire.data.sources import ZooEntry
from dsire.lora import LoRA, LoRAError, load_lora, read_lorawise, subset_rank
from dsire.lora.names import kohya_to_canonical
from dsire.lora.save import save_lora
from dsire.spectra import lora_spectra
from tests.conftest import (
    FineTune,
    write_attn_procs,
    write_diffusers,
    write_diffusers_old,
    write_kohya,
    write_lorawise,
    write_peft,
)


def assert_matches(lora: LoRA, expected: dict[str, torch.Tensor]) -> None:
    """Same layer names (in natural order) and ΔW equal to peft's own, to float32 rounding."""
    assert sorted(lora.layers) == sorted(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(lora.layers[name].delta(), delta, rtol=1e-5, atol=1e-6, msg=name)


def test_peft_directory_and_file(unet_finetune: FineTune, tmp_path):
    directory = write_peft(unet_finetune, tmp_path / "adapter")
    for path in (directory, directory / "adapter_model.safetensors"):
        lora = load_lora(path)
        assert lora.format == "peft"
        assert_matches(lora, unet_finetune.deltas())
    assert not lora.notes  # alpha came from adapter_config.json


def test_peft_rank_and_alpha_patterns(unet_finetune: FineTune, tmp_path):
    lora = load_lora(write_peft(unet_finetune, tmp_path / "adapter"))
    to_k = next(layer for name, layer in lora.layers.items() if name.endswith("attn1.to_k"))
    to_v = next(layer for name, layer in lora.layers.items() if name.endswith("attn1.to_v"))
    to_q = next(layer for name, layer in lora.layers.items() if name.endswith("attn1.to_q"))
    assert (to_k.rank, to_k.scale) == (2, 8 / 2)
    assert (to_v.rank, to_v.scale) == (4, 3 / 4)
    assert (to_q.rank, to_q.scale) == (4, 8 / 4)


def test_conv_layers_are_flattened(unet_finetune: FineTune, tmp_path):
    lora = load_lora(write_peft(unet_finetune, tmp_path / "adapter"))
    conv = lora.layers["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.kernel == (3, 3)
    assert conv.shape == (32, 32 * 3 * 3)


def test_rslora_scale(tmp_path):
    from peft import LoraConfig

    from tests.conftest import make_finetune, tiny_unet

    finetune = make_finetune(
        tiny_unet(), LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"], use_rslora=True), "unet"
    )
    lora = load_lora(write_peft(finetune, tmp_path / "adapter"))
    assert {layer.scale for layer in lora.layers.values()} == {8 / 2}
    assert_matches(lora, finetune.deltas())


def test_text_encoder_peft(clip_finetune: FineTune, tmp_path):
    lora = load_lora(write_peft(clip_finetune, tmp_path / "adapter"))
    assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj" in lora.layers
    assert_matches(lora, clip_finetune.deltas())


def test_diffusers_pipeline_file(unet_finetune: FineTune, clip_finetune: FineTune, tmp_path):
    path = write_diffusers(unet_finetune, clip_finetune, tmp_path)
    lora = load_lora(path)
    assert lora.format == "diffusers"
    assert not lora.notes  # alpha and patterns came from lora_adapter_metadata
    assert_matches(lora, unet_finetune.deltas() | clip_finetune.deltas())


def test_diffusers_file_mixing_both_spellings(unet_finetune: FineTune, tmp_path):
    """diffusers' own converter writes `.lora.down/up` for attention and keeps `lora_A/B` for convolutions:
    every layer is read (before, the attention layers were dropped as non-LoRA tensors)."""
    state = {f"unet.{k}": v.contiguous() for k, v in convert_state_dict_to_diffusers(unet_finetune.state).items()}
    assert any(".lora.down." in k for k in state) and any(".lora_A." in k for k in state)
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    lora = load_lora(path)
    assert lora.format == "diffusers"
    reference = load_lora(write_peft(unet_finetune, tmp_path / "adapter"))  # the same factors, with alpha
    assert sorted(lora.layers) == sorted(reference.layers) == sorted(unet_finetune.deltas())
    for name, layer in reference.layers.items():
        assert torch.equal(lora.layers[name].down, layer.down) and torch.equal(lora.layers[name].up, layer.up)
    assert not any("ignored" in note for note in lora.notes)


def test_layers_in_another_layout_are_refused_not_dropped(unet_finetune: FineTune, tmp_path):
    kohya = tmp_path / "k.safetensors"
    write_kohya(unet_finetune, None, kohya)
    state = load_file(str(kohya)) | {"unet.extra.to_q.lora_A.weight": torch.ones(2, 4)}
    path = tmp_path / "mixed.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoRAError, match="1 tensors are LoRA weights in another layout than 'kohya'"):
        load_lora(path)


def test_diffusers_old_layouts(unet_finetune_alpha_r: FineTune, clip_finetune: FineTune, tmp_path):
    expected = unet_finetune_alpha_r.deltas()
    old = load_lora(write_diffusers_old(unet_finetune_alpha_r, clip_finetune, tmp_path / "old.safetensors"))
    assert old.format == "diffusers_old"
    assert_matches(old, expected | clip_finetune.deltas())
    assert "alpha = rank assumed" in old.notes[0]
    procs = load_lora(write_attn_procs(unet_finetune_alpha_r, tmp_path / "procs.safetensors"))
    assert procs.format == "diffusers_old"
    assert_matches(procs, expected)


def test_kohya_with_metadata(unet_finetune: FineTune, clip_finetune: FineTune, tmp_path):
    meta = {"ss_num_train_images": "12", "ss_dataset_dirs": json.dumps({"5_cat": {"n_repeats": 5, "img_count": 12}})}
    lora = load_lora(write_kohya(unet_finetune, clip_finetune, tmp_path / "k.safetensors", meta))
    assert lora.format == "kohya"
    assert lora.metadata["ss_num_train_images"] == "12"
    assert json.loads(lora.metadata["ss_dataset_dirs"])["5_cat"]["img_count"] == 12
    assert_matches(lora, unet_finetune.deltas() | clip_finetune.deltas())


def test_lorawise_parquet_flat_and_nested(unet_finetune_alpha_r: FineTune, tmp_path):
    rows = [(unet_finetune_alpha_r, 3, "plushie_panda"), (unet_finetune_alpha_r, 5, "pet_cat7")]
    for nested in (False, True):
        path = write_lorawise(rows, tmp_path / f"low_4_{nested}.parquet", nested=nested)
        loras = list(read_lorawise(path, rank=4))
        assert [(lo.labels["n"], lo.labels["concept"]) for lo in loras] == [(3, "plushie_panda"), (5, "pet_cat7")]
        for lora in loras:
            assert lora.format == "lorawise"
            assert_matches(lora, unet_finetune_alpha_r.deltas())
        assert load_lora(path, rank=4, row=1).labels["n"] == 5


def test_lorawise_row_k_skips_the_row_groups_before_it(unet_finetune_alpha_r: FineTune, tmp_path, monkeypatch):
    """Reading row k decodes rows from its own row group on, not every row from 0 (quadratic over a zoo)."""
    rows = [(unet_finetune_alpha_r, n, f"c{n}") for n in range(1, 7)]
    path = write_lorawise(rows, tmp_path / "rows.parquet")
    pq.write_table(pq.read_table(path), path, row_group_size=2)  # groups: rows 0-1, 2-3, 4-5
    decoded = []
    iter_batches = pq.ParquetFile.iter_batches

    def counting(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            decoded.append(batch.column("label")[0].as_py())
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    assert load_lora(path, rank=4, row=5).labels == {"n": 6, "concept": "c6"}
    assert decoded == [5, 6]
    decoded.clear()
    assert load_lora(path, rank=4, row=2).labels["n"] == 3 and decoded == [3]
    assert [lo.labels["n"] for lo in read_lorawise(path, rank=4)] == [1, 2, 3, 4, 5, 6]


def test_spectra_cache_tells_ranks_of_a_parquet_row_apart(unet_finetune_alpha_r: FineTune, tmp_path):
    """Flat columns reshaped with another rank are other matrices: `data.source.rank` must not reuse spectra."""
    path = write_lorawise([(unet_finetune_alpha_r, 1, "c")], tmp_path / "rows.parquet")
    cache = SpectraCache(tmp_path / "cache", {})
    rank4, rank2 = ZooEntry(str(path), 1, "c", row=0, rank=4), ZooEntry(str(path), 1, "c", row=0, rank=2)
    lora = rank4.load()
    cache.put(rank4, lora_spectra(lora), {name: layer.shape for name, layer in lora.layers.items()})
    assert cache.get(rank4) is not None and cache.get(rank2) is None


def test_lorawise_flat_needs_rank(unet_finetune_alpha_r: FineTune, tmp_path):
    path = write_lorawise([(unet_finetune_alpha_r, 1, "c")], tmp_path / "rows.parquet")
    with pytest.raises(LoRAError, match="pass rank="):
        load_lora(path)


def test_lorawise_rank_from_subset_path():
    assert subset_rank("cache/MoSalama98/LoRA-WiSE/low/32/train-00000-of-00016.parquet") == 32
    assert subset_rank("refs/convert/parquet/medium_16/partial-train/0000.parquet") == 16
    assert subset_rank("medium_32_2") == 32
    assert subset_rank("low_8") == 8
    assert subset_rank("some/other/file.parquet") is None


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya"])
def test_save_lora_round_trip(unet_finetune: FineTune, tmp_path, fmt):
    path = tmp_path / ("adapter" if fmt == "peft" else "lora.safetensors")
    save_lora(unet_finetune.state, path, fmt, unet_finetune.config.to_dict(), metadata={"dsire_n": "3"})
    lora = load_lora(path)
    assert lora.format == fmt
    assert lora.metadata["dsire_n"] == "3"
    assert_matches(lora, unet_finetune.deltas())


def test_explicit_format_override(unet_finetune: FineTune, tmp_path):
    path = write_kohya(unet_finetune, None, tmp_path / "k.safetensors")
    assert load_lora(path, format="kohya").format == "kohya"
    with pytest.raises(LoRAError, match="no LoRA weights found for format 'peft'"):
        load_lora(path, format="peft")


SGM_KEYS = [
    "lora_unet_input_blocks_1_0_in_layers_2",
    "lora_unet_input_blocks_2_0_emb_layers_1",
    "lora_unet_input_blocks_3_0_op",
    "lora_unet_input_blocks_4_0_skip_connection",
    "lora_unet_input_blocks_4_1_proj_in",
    "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
    "lora_unet_middle_block_0_out_layers_3",
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_middle_block_2_in_layers_2",
    "lora_unet_output_blocks_0_0_out_layers_3",
    "lora_unet_output_blocks_3_1_transformer_blocks_1_attn2_to_k",
    "lora_unet_output_blocks_5_2_conv",
    "lora_unet_output_blocks_8_1_proj_out",
]


def test_sdxl_sgm_names_match_diffusers():
    """Our SGM -> diffusers mapping agrees with diffusers' own kohya loader, key by key."""
    state = {}
    for key in SGM_KEYS:
        state[f"{key}.lora_down.weight"] = torch.ones(2, 8)
        state[f"{key}.lora_up.weight"] = torch.ones(8, 2)
        state[f"{key}.alpha"] = torch.tensor(2.0)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(
        dict(state), unet_config=SimpleNamespace(layers_per_block=2)
    )
    theirs = set()
    for key in converted:
        key = key.replace(".processor.to_out_lora.", ".to_out.0.lora.").replace(".processor.", ".")
        theirs.add(re.sub(r"(_lora)?\.lora\.(down|up)\.weight$|_lora\.(down|up)\.weight$", "", key))
    ours = {kohya_to_canonical(k) for k in SGM_KEYS}
    assert ours == theirs


def test_sd15_sgm_upsampler_without_attention():
    """SD 1.x's first up block has no attention, so its upsampler sits at index 1 (diffusers' loader
    maps this key to a non-existent `attentions.2.conv`; we follow the UNet's structure)."""
    assert kohya_to_canonical("lora_unet_output_blocks_2_1_conv") == "unet.up_blocks.0.upsamplers.0.conv"


def test_kohya_names():
    assert (
        kohya_to_canonical("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0")
        == "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"
    )
    assert (
        kohya_to_canonical("lora_te2_text_model_encoder_layers_11_mlp_fc1")
        == "text_encoder_2.text_model.encoder.layers.11.mlp.fc1"
    )
    assert kohya_to_canonical("lora_unet_mid_block_attentions_0_proj_in") == "unet.mid_block.attentions.0.proj_in"
    assert kohya_to_canonical("not_kohya") is None
