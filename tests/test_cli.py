"""`dsire inspect` run as users run it, in a subprocess."""

from __future__ import annotations

import json

import torch

from dsire.cli import main
from dsire.lora import load_lora, read_lorawise
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


def test_lorawise_command_keeps_every_delta_and_label(unet_finetune, unet_finetune_alpha_r, tmp_path, capsys):
    """A zoo as LoRA-WiSE rows reads back with peft's own ΔW (the layout has no alpha: scales go into
    `up`) and its labels; flat columns need the rank in the file's name."""
    mixed, plain = tmp_path / "mixed", tmp_path / "plain"
    for zoo, finetune in ((mixed, unet_finetune), (plain, unet_finetune_alpha_r)):
        zoo.mkdir()
        for name in ("a", "b"):
            write_kohya(finetune, None, zoo / f"{name}.safetensors")
        (zoo / "labels.csv").write_text("file,n,concept\na.safetensors,2,cat\nb.safetensors,5,dog\n")
    assert main(["lorawise", str(mixed), str(tmp_path / "mixed.parquet"), "--nested"]) == 0  # ranks 2 and 4, conv
    assert main(["lorawise", str(plain), str(tmp_path / "low_4.parquet")]) == 0
    for path, finetune in (
        (tmp_path / "mixed.parquet", unet_finetune),
        (tmp_path / "low_4.parquet", unet_finetune_alpha_r),
    ):
        loras = list(read_lorawise(path))
        assert [(lora.labels["n"], lora.labels["concept"]) for lora in loras] == [(2, "cat"), (5, "dog")]
        expected = finetune.deltas()
        for lora in loras:
            assert sorted(lora.layers) == sorted(expected) and all(layer.scale == 1 for layer in lora.layers.values())
            for name, delta in expected.items():
                torch.testing.assert_close(lora.layers[name].delta(), delta, rtol=1e-5, atol=1e-6, msg=name)
    capsys.readouterr()
    assert main(["lorawise", str(plain), str(tmp_path / "toy.parquet")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'toy.parquet'}: rank 4 is not in its name")
    assert main(["lorawise", str(mixed), str(tmp_path / "low_4_mixed.parquet")]) == 1
    assert "ranks [2, 4]" in capsys.readouterr().err and not (tmp_path / "low_4_mixed.parquet").exists()
    assert main(["lorawise", str(tmp_path / "no_zoo"), str(tmp_path / "low_4.parquet")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'no_zoo' / 'labels.csv'}: No such file or directory\n"
