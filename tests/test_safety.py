"""Hostile and broken files: each gets one clear LoRAError naming the file; nothing executes."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dsire.lora import Limits, LoRAError, load_lora
from tests.conftest import tiny_unet, write_lorawise, write_peft

CANARY = Path("/tmp/dsire-canary-must-not-exist")


class Exploit:
    """Unpickling this would create CANARY."""

    def __reduce__(self):
        return (open, (str(CANARY), "w"))


def good_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }


def expect_error(path: Path, problem: str, **kwargs) -> None:
    with pytest.raises(LoRAError, match=problem) as info:
        load_lora(path, **kwargs)
    assert str(path) in str(info.value) or path.name in str(info.value)


@pytest.fixture(autouse=True)
def no_canary():
    CANARY.unlink(missing_ok=True)
    yield
    assert not CANARY.exists(), "a hostile pickle ran code"


@pytest.mark.hostile
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt", ".pth"])
def test_pickles_refused_without_opt_in(tmp_path, suffix):
    path = tmp_path / f"evil{suffix}"
    torch.save({"x.lora_down.weight": Exploit()}, path)
    expect_error(path, "refused by default")


@pytest.mark.hostile
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickles_refused_by_weights_only_even_with_opt_in(tmp_path, suffix):
    path = tmp_path / f"evil{suffix}"
    torch.save({"x.lora_down.weight": Exploit()}, path)
    expect_error(path, "refused or unreadable torch checkpoint", allow_torch_load=True)
    raw = tmp_path / f"raw{suffix}"
    raw.write_bytes(pickle.dumps(Exploit()))
    expect_error(raw, "refused or unreadable torch checkpoint", allow_torch_load=True)


def test_plain_torch_state_dict_with_opt_in(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save(good_state(), path)
    assert len(load_lora(path, allow_torch_load=True).layers) == 1


@pytest.mark.hostile
def test_pickle_named_safetensors(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Exploit()))
    expect_error(path, "header")


def write_raw_safetensors(path: Path, header: object, data: bytes = b"", claimed_len: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    length = len(raw) if claimed_len is None else claimed_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


@pytest.mark.hostile
def test_oversized_header(tmp_path):
    expect_error(write_raw_safetensors(tmp_path / "big.safetensors", {}, claimed_len=2**40), "over the .*-byte limit")


@pytest.mark.hostile
def test_malformed_header(tmp_path):
    expect_error(write_raw_safetensors(tmp_path / "bad.safetensors", b"{not json"), "malformed safetensors header")
    expect_error(write_raw_safetensors(tmp_path / "list.safetensors", [1, 2]), "not a JSON object")


@pytest.mark.hostile
def test_offsets_that_do_not_match_the_dtype(tmp_path):
    header = {"a.lora_down.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}
    expect_error(write_raw_safetensors(tmp_path / "o.safetensors", header, b"\0" * 8), "do not match")


@pytest.mark.hostile
def test_unknown_dtype(tmp_path):
    header = {"a.lora_down.weight": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}
    expect_error(write_raw_safetensors(tmp_path / "d.safetensors", header, b"\0"), "dtype F8_E4M3")


@pytest.mark.hostile
def test_truncated_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(good_state(), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    expect_error(path, "truncated")
    path.write_bytes(path.read_bytes()[:20])
    expect_error(path, "truncated")


@pytest.mark.hostile
def test_empty_and_missing(tmp_path):
    empty = tmp_path / "e.safetensors"
    empty.touch()
    expect_error(empty, "empty file")
    expect_error(tmp_path / "missing.safetensors", "no such file")


@pytest.mark.hostile
def test_file_size_limit(tmp_path):
    path = tmp_path / "l.safetensors"
    save_file(good_state(), str(path))
    expect_error(path, "over the 100-byte limit", limits=Limits(max_file_bytes=100))


@pytest.mark.hostile
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_inf(tmp_path, bad, dtype):
    state = {name: t.to(dtype) for name, t in good_state().items()}
    state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"][3, 1] = bad
    path = tmp_path / "n.safetensors"
    save_file(state, str(path))
    expect_error(path, "contains NaN or Inf")


@pytest.mark.hostile
def test_down_without_up(tmp_path):
    state = good_state()
    del state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]
    path = tmp_path / "h.safetensors"
    save_file(state, str(path))
    expect_error(path, "has a down without its up")


@pytest.mark.hostile
def test_alpha_without_down_and_up(tmp_path):
    state = good_state() | {"lora_unet_down_blocks_0_attentions_0_proj_out.alpha": torch.tensor(4.0)}
    path = tmp_path / "a.safetensors"
    save_file(state, str(path))
    expect_error(path, "has an alpha without its down and up")


@pytest.mark.hostile
def test_rank_mismatch(tmp_path):
    state = good_state()
    state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.randn(32, 3)
    path = tmp_path / "r.safetensors"
    save_file(state, str(path))
    expect_error(path, "rank mismatch")


@pytest.mark.hostile
def test_wrong_shapes_and_dtypes(tmp_path):
    cases = {
        "lora_down.weight": (torch.randn(4, 32, 2), "expected a matrix"),
        "lora_up.weight": (torch.zeros(32, 4, dtype=torch.int32), "expected floating point"),
        "alpha": (torch.ones(2), "expected a scalar"),
    }
    for suffix, (tensor, problem) in cases.items():
        state = good_state()
        state[f"lora_unet_down_blocks_0_attentions_0_proj_in.{suffix}"] = tensor
        path = tmp_path / f"{suffix}.safetensors"
        save_file(state, str(path))
        expect_error(path, problem)


@pytest.mark.hostile
def test_zero_size_tensor(tmp_path):
    state = good_state()
    state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.zeros(0, 32)
    state["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 0)
    path = tmp_path / "z.safetensors"
    save_file(state, str(path))
    expect_error(path, "is empty")


@pytest.mark.hostile
def test_full_model_is_not_a_lora(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file(tiny_unet().state_dict(), str(path))
    expect_error(path, "no LoRA weights found")


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("lora_unet_x.hada_w1_a", "LoHa"),
        ("lora_unet_x.dora_scale", "DoRA"),
        ("unet.x.lora_magnitude_vector", "DoRA"),
    ],
)
def test_other_adapter_types(tmp_path, key, problem):
    path = tmp_path / "a.safetensors"
    save_file({**good_state(), key: torch.ones(4)}, str(path))
    expect_error(path, problem)


@pytest.mark.hostile
def test_directory_with_two_weight_files(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        save_file(good_state(), str(tmp_path / name))
    expect_error(tmp_path, "exactly one weights file")


@pytest.mark.hostile
def test_malformed_adapter_config(unet_finetune, tmp_path):
    directory = write_peft(unet_finetune, tmp_path / "adapter")
    (directory / "adapter_config.json").write_text("{oops")
    expect_error(directory, "malformed JSON")
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    expect_error(directory, "DoRA")


@pytest.mark.hostile
def test_parquet_not_in_schema_or_corrupt(unet_finetune_alpha_r, tmp_path):
    path = write_lorawise([(unet_finetune_alpha_r, 1, "c")], tmp_path / "low_4.parquet")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    expect_error(path, "parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1]}), other)
    expect_error(other, "no 'label' column")


@pytest.mark.hostile
def test_unknown_suffix_and_format(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"PK")
    expect_error(path, "unknown weights file type")
    expect_error(path, "unknown format 'nope'", format="nope")
