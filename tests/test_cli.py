"""`dsire inspect` run as users run it, in a subprocess."""

from __future__ import annotations

import json

import torch

from dsire.lora import load_lora
from tests.conftest import run_dsire, write_kohya, write_lorawise


def test_inspect_json(unet_finetune, tmp_path):
    path = write_kohya(unet_finetune, None, tmp_path / "k.safetensors", {"ss_num_train_images": "7"})
    result = run_dsire("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "kohya"
    assert report["metadata"]["ss_num_train_images"] == "7"
    lora = load_lora(path)
    assert list(report["layers"]) == list(lora.layers)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    entry = report["layers"][name]
    layer = lora.layers[name]
    assert entry["rank"] == 2 and entry["shape"] == [32, 24] and entry["scale"] == 4.0
    expected = torch.linalg.svdvals(layer.delta())[:2]
    torch.testing.assert_close(torch.tensor(entry["singular_values"], dtype=torch.float64), expected, rtol=1e-5, atol=0)


def test_inspect_table_and_parquet_row(unet_finetune_alpha_r, tmp_path):
    path = write_lorawise([(unet_finetune_alpha_r, 2, "a"), (unet_finetune_alpha_r, 6, "b")], tmp_path / "w.parquet")
    result = run_dsire("inspect", str(path), "--rank", "4", "--row", "1")
    assert result.returncode == 0, result.stderr
    assert "format: lorawise" in result.stdout
    assert "n: 6" in result.stdout and "concept: b" in result.stdout
    assert "alpha = rank assumed" in result.stdout


def test_inspect_error_names_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 4)
    result = run_dsire("inspect", str(path))
    assert result.returncode == 1
    assert "broken.safetensors" in result.stderr and "truncated" in result.stderr
