"""Property and fuzz tests of the readers: any input is read or refused with LoRAError, in bounded memory.

Hypothesis draws state dicts (key names in every published layout, and arbitrary text; shapes and
dtypes of every kind) and well-formed LoRAs written by hand in the kohya, diffusers and old
diffusers layouts; `fuzz_readers.py` mutates valid safetensors and parquet files byte by byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from dsire.lora import LoRAError, load_lora
from tests.conftest import run_script

pytestmark = pytest.mark.hostile
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

MODULES = st.builds(
    "{}.{}.attentions.{}.transformer_blocks.0.{}.{}".format,
    st.sampled_from(["down_blocks", "up_blocks"]),
    st.integers(0, 3),
    st.integers(0, 2),
    st.sampled_from(["attn1", "attn2"]),
    st.sampled_from(["to_q", "to_k", "to_v", "to_out.0"]),
) | st.sampled_from(["mid_block.attentions.0.proj_in", "down_blocks.1.attentions.0.proj_out"])

LORA_LIKE_KEYS = st.builds(
    "{}{}{}".format,
    st.sampled_from(["lora_unet_", "lora_te1_", "lora_te_", "unet.", "text_encoder.", "base_model.model.", ""]),
    MODULES | MODULES.map(lambda m: m.replace(".", "_")),
    st.sampled_from(
        [
            ".lora_down.weight",
            ".lora_up.weight",
            ".alpha",
            ".lora_A.weight",
            ".lora_B.weight",
            ".lora_A.default.weight",
            ".lora.down.weight",
            ".lora.up.weight",
            ".lora_linear_layer.up.weight",
            ".processor.to_q_lora.down.weight",
            ".dora_scale",
            ".hada_w1_a",
            ".weight",
        ]
    ),
)
ANY_KEYS = (LORA_LIKE_KEYS | st.text(min_size=1, max_size=30)).filter(lambda k: k != "__metadata__")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.bool]


@st.composite
def tensors(draw) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 6), max_size=4))
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from(["randn", "zeros", "nan"]))
    if fill == "randn" and dtype.is_floating_point:
        t = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))).to(dtype)
    else:
        t = torch.zeros(shape, dtype=dtype)
    if fill == "nan" and dtype.is_floating_point and t.numel():
        t.view(-1)[0] = float("nan")
    return t


@pytest.fixture
def count_examples(request) -> Iterator[list[int]]:
    """Hypothesis runs the test body once per example with this one list: its count is reported."""
    counter = [0]
    yield counter
    request.node.user_properties.append(("inputs", counter[0]))


@SETTINGS
@given(state=st.dictionaries(ANY_KEYS, tensors(), min_size=1, max_size=6))
def test_any_state_dict_is_read_or_refused(state, tmp_path, count_examples):
    count_examples[0] += 1
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    try:
        lora = load_lora(path)
    except LoRAError as exc:
        assert exc.path == str(path)
        return
    for name, layer in lora.layers.items():
        assert layer.down.dtype.is_floating_point and layer.up.dtype.is_floating_point, name
        assert layer.down.dim() == layer.up.dim() == 2 and layer.rank == layer.up.shape[1] > 0, name
        assert torch.isfinite(layer.down).all() and torch.isfinite(layer.up).all(), name


LAYOUTS = {
    "kohya": ("lora_unet_{}.lora_down.weight", "lora_unet_{}.lora_up.weight", "lora_unet_{}.alpha"),
    "diffusers": ("unet.{}.lora_A.weight", "unet.{}.lora_B.weight", None),
    "diffusers_old": ("unet.{}.lora.down.weight", "unet.{}.lora.up.weight", "unet.{}.alpha"),
}


@st.composite
def loras(draw) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], bool]:
    """{module path: (down, up, alpha)}; with `broken`, one layer's up has another rank."""
    modules = draw(st.lists(MODULES, min_size=1, max_size=4, unique=True))
    broken = draw(st.booleans())
    layers = {}
    for i, module in enumerate(modules):
        rank, fan_in, fan_out = draw(st.integers(1, 6)), draw(st.integers(1, 12)), draw(st.integers(1, 12))
        up_rank = rank + 1 if broken and i == 0 else rank
        g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
        alpha = draw(st.floats(0.5, 64.0))
        layers[module] = (torch.randn(rank, fan_in, generator=g), torch.randn(fan_out, up_rank, generator=g), alpha)
    return layers, broken


@SETTINGS
@given(drawn=loras(), layout=st.sampled_from(sorted(LAYOUTS)))
def test_well_formed_loras_read_back_exactly(drawn, layout, tmp_path, count_examples):
    """Key names and shapes in a layout map to the same canonical layers and the exact factors."""
    count_examples[0] += 1
    layers, broken = drawn
    down_key, up_key, alpha_key = LAYOUTS[layout]
    state = {}
    for module, (down, up, alpha) in layers.items():
        name = module.replace(".", "_") if layout == "kohya" else module
        state[down_key.format(name)], state[up_key.format(name)] = down, up
        if alpha_key:
            state[alpha_key.format(name)] = torch.tensor(alpha)
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    if broken:
        with pytest.raises(LoRAError, match="rank mismatch"):
            load_lora(path)
        return
    lora = load_lora(path)
    assert lora.format == layout
    assert set(lora.layers) == {f"unet.{module}" for module in layers}
    for module, (down, up, alpha) in layers.items():
        layer = lora.layers[f"unet.{module}"]
        assert torch.equal(layer.down, down) and torch.equal(layer.up, up)
        expected_alpha = alpha if alpha_key else float(down.shape[0])  # no alpha in the file: alpha = rank
        assert layer.scale == pytest.approx(expected_alpha / down.shape[0])


def test_bounded_fuzz_of_the_readers(request):
    """Thousands of mutants of a valid safetensors and a valid parquet file, in a fresh process whose
    peak memory is measured: a header claiming terabytes must be refused before anything is allocated."""
    result = run_script("tests/fuzz_readers.py", "0", "2000", "600", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    request.node.user_properties.append(("inputs", report["cases"]))
    assert report["unexpected"] == []
    assert report["read"] + report["refused"] == report["cases"] == 2600
    assert report["read"] > 0 and report["refused"] > report["cases"] // 2  # mutants both survive and bite
    assert report["peak_rss_growth_mb"] < 64
