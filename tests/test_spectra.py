"""Spectra from the r×r core equal those of the dense product, on every shape that matters."""

from __future__ import annotations

import pytest
import torch

from benchmarks.spectra import batched_exact
from dsire.lora import load_lora
from dsire.lora.save import save_lora
from dsire.spectra import lora_spectra, lowrank_spectra


def dense_reference(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """σ(scale · up @ down) from the dense float64 product, zero-padded to the rank."""
    values = torch.linalg.svdvals(scale * (up.double() @ down.double()))[: up.shape[-1]]
    return torch.nn.functional.pad(values, (0, up.shape[-1] - values.shape[-1]))


SHAPES = [  # (out, in, r)
    (320, 320, 8),
    (640, 768, 32),
    (1280, 320, 16),
    (5, 40, 8),  # out < r
    (40, 3, 8),  # in < r
    (2, 3, 4),  # both < r
]


@pytest.mark.parametrize(("out", "inp", "rank"), SHAPES)
def test_float64_matches_dense_svd(out, inp, rank):
    g = torch.Generator().manual_seed(out * inp + rank)
    up, down = torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g)
    s = lowrank_spectra(up, down, -0.7, dtype=torch.float64)
    torch.testing.assert_close(s.delta, dense_reference(up, down, -0.7), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.up, dense_reference(up, torch.eye(rank), 1.0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.down, dense_reference(torch.eye(rank), down, 1.0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.delta_norm, torch.linalg.matrix_norm(0.7 * up.double() @ down.double()))
    torch.testing.assert_close(s.up_norm, torch.linalg.matrix_norm(up.double()))


@pytest.mark.parametrize(("out", "inp", "rank"), SHAPES)
def test_float32_within_1e5_relative(out, inp, rank):
    g = torch.Generator().manual_seed(rank)
    up, down = torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g)
    s = lowrank_spectra(up, down, 1.5)
    reference = dense_reference(up, down, 1.5)
    assert s.delta.dtype == torch.float32
    assert ((s.delta.double() - reference).abs() <= 1e-5 * reference[0]).all()


def test_rank_deficient():
    g = torch.Generator().manual_seed(0)
    up = torch.randn(64, 8, generator=g, dtype=torch.float64)
    down = torch.randn(3, 48, generator=g, dtype=torch.float64)
    down = torch.cat([down, down[:1] * 2, torch.zeros(4, 48, dtype=torch.float64)])  # rank 3 of 8
    s = lowrank_spectra(up, down, 1.0, dtype=torch.float64)
    torch.testing.assert_close(s.delta, dense_reference(up, down, 1.0), rtol=1e-9, atol=1e-9)
    assert (s.delta[3:] < 1e-10 * s.delta[0]).all()


def test_zero_up_gives_zeros_not_nan():
    for dtype in (torch.float32, torch.float64):
        s = lowrank_spectra(torch.zeros(3, 64, 8), torch.randn(3, 8, 32), torch.ones(3), dtype=dtype)
        assert torch.equal(s.delta, torch.zeros(3, 8, dtype=dtype))
        assert torch.equal(s.up, torch.zeros(3, 8, dtype=dtype))
        assert torch.isfinite(s.down).all() and (s.down > 0).all()


def test_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(5, 96, 8, generator=g), torch.randn(5, 8, 64, generator=g)
    scale = torch.tensor([1.0, 2.0, 0.5, -1.0, 3.0])
    batch = lowrank_spectra(up, down, scale, dtype=torch.float64)
    for i in range(5):
        one = lowrank_spectra(up[i], down[i], float(scale[i]), dtype=torch.float64)
        torch.testing.assert_close(batch[i].delta, one.delta)


def test_lora_spectra_per_layer(unet_finetune, tmp_path):
    path = save_lora(unet_finetune.state, tmp_path / "l.safetensors", "kohya", unet_finetune.config.to_dict())
    lora = load_lora(path)
    spectra = lora_spectra(lora, dtype=torch.float64)
    assert list(spectra) == list(lora.layers)
    for name, layer in lora.layers.items():
        expected = dense_reference(layer.up, layer.down, layer.scale)
        torch.testing.assert_close(spectra[name].delta, expected, rtol=1e-9, atol=1e-12)
        assert spectra[name].delta.shape == (layer.rank,)


def test_benchmark_exact_baseline_is_exact(unet_finetune, tmp_path):
    """The benchmark's batched QR baseline computes the same spectra (float32 rounding aside)."""
    path = save_lora(unet_finetune.state, tmp_path / "l.safetensors", "kohya", unet_finetune.config.to_dict())
    lora = load_lora(path)
    baseline, ours = batched_exact(lora), lora_spectra(lora, dtype=torch.float64)
    for name in lora.layers:
        for part in ("delta", "down", "up"):
            expected = getattr(ours[name], part)
            got = baseline[f"{name}/{part}"].double()
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(2)
    up, down = torch.randn(16, 1280, 32, generator=g), torch.randn(16, 32, 768, generator=g)
    cpu = lowrank_spectra(up, down, 1.0, dtype=torch.float64)
    gpu = lowrank_spectra(up.cuda(), down.cuda(), 1.0, dtype=torch.float64)
    assert gpu.delta.is_cuda
    torch.testing.assert_close(gpu.delta.cpu(), cpu.delta)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_spectra_on_cuda_through_pinned_copies(unet_finetune, tmp_path):
    path = save_lora(unet_finetune.state, tmp_path / "l.safetensors", "kohya", unet_finetune.config.to_dict())
    lora = load_lora(path)
    on_gpu, on_cpu = lora_spectra(lora, "cuda", torch.float64), lora_spectra(lora, "cpu", torch.float64)
    for name in on_cpu:
        assert not on_gpu[name].delta.is_cuda  # results come back to the CPU
        torch.testing.assert_close(on_gpu[name].delta, on_cpu[name].delta)


def test_batch_spectra_across_loras_equals_one_by_one(unet_finetune, unet_finetune_alpha_r, tmp_path):
    from dsire.spectra import batch_spectra

    loras = []
    for i, finetune in enumerate((unet_finetune, unet_finetune_alpha_r)):
        path = save_lora(finetune.state, tmp_path / f"{i}.safetensors", "kohya", finetune.config.to_dict())
        loras.append(load_lora(path))
    together = batch_spectra(loras, dtype=torch.float64)
    for lora, spectra in zip(loras, together, strict=True):
        alone = lora_spectra(lora, dtype=torch.float64)
        assert list(spectra) == list(alone)
        for name in alone:
            torch.testing.assert_close(spectra[name].delta, alone[name].delta)


def test_gpu_grams_equal_cpu_grams(unet_finetune, tmp_path):
    """The GPU's stacked Grams and the CPU's layer-by-layer ones are the same products (run here on the CPU)."""
    from dsire.spectra import _grams_in_turn, _grams_stacked

    path = save_lora(unet_finetune.state, tmp_path / "l.safetensors", "kohya", unet_finetune.config.to_dict())
    layers = list(load_lora(path).layers.values())
    shape = layers[0].up.shape, layers[0].down.shape
    same = [layer for layer in layers if (layer.up.shape, layer.down.shape) == shape]
    for stacked, in_turn in zip(
        _grams_stacked(same, torch.device("cpu"), torch.float64),
        _grams_in_turn(same, torch.device("cpu"), torch.float64),
        strict=True,
    ):
        torch.testing.assert_close(stacked, in_turn, rtol=1e-13, atol=0)


def test_ill_conditioned_within_the_gram_bound():
    """Singular values spread over ten orders of magnitude: the squaring costs digits only below
    √ε₆₄ · σ₁, so every value is within 1e-7 of σ₁ and the large ones stay relative-exact."""
    g = torch.Generator().manual_seed(3)
    q_up = torch.linalg.qr(torch.randn(320, 16, generator=g, dtype=torch.float64)).Q
    q_down = torch.linalg.qr(torch.randn(768, 16, generator=g, dtype=torch.float64)).Q
    decay = torch.logspace(0, -10, 16, dtype=torch.float64)
    up, down = q_up * decay, (q_down * decay.sqrt()).mT
    s = lowrank_spectra(up, down, 2.0, dtype=torch.float64)
    for values, reference in ((s.delta, dense_reference(up, down, 2.0)), (s.up, decay), (s.down, decay.sqrt())):
        assert ((values - reference).abs() <= 1e-7 * reference[0]).all()
        torch.testing.assert_close(values[:4], reference[:4], rtol=1e-10, atol=0)


def test_fast_precision_keeps_large_values_and_bounds_small_ones():
    """Float32 Grams on factors whose small singular values come from cancellation (every column is
    large, as in trained LoRAs): the large values stay accurate to float32, every value is within the
    documented √ε₃₂ · σ₁, and the exact path is far tighter."""
    g = torch.Generator().manual_seed(3)
    q_up = torch.linalg.qr(torch.randn(320, 16, generator=g, dtype=torch.float64)).Q
    q_down = torch.linalg.qr(torch.randn(768, 16, generator=g, dtype=torch.float64)).Q
    mix_up, mix_down = (torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64)).Q for _ in "ud")
    decay = torch.logspace(0, -6, 16, dtype=torch.float64)
    up, down = (q_up * decay @ mix_up).float(), (mix_down @ (q_down * decay).mT).float()  # float32, as stored
    fast = lowrank_spectra(up, down, 2.0, dtype=torch.float64, precision="fast")
    exact = lowrank_spectra(up, down, 2.0, dtype=torch.float64)
    references = {"delta": dense_reference(up, down, 2.0), "up": decay, "down": decay}
    for part, reference in references.items():
        fast_error = (getattr(fast, part) - reference).abs().max() / reference[0]
        exact_error = (getattr(exact, part) - reference).abs().max() / reference[0]
        assert exact_error <= 1e-7 < fast_error <= torch.finfo(torch.float32).eps ** 0.5, part
        torch.testing.assert_close(getattr(fast, part)[:2], reference[:2], rtol=1e-5, atol=0)


def test_threads_change_nothing(unet_finetune, unet_finetune_alpha_r, tmp_path):
    """Chunks computed in parallel threads give the same bits as one thread in turn."""
    from dsire.spectra import batch_spectra

    loras = []
    for i, finetune in enumerate((unet_finetune, unet_finetune_alpha_r)):
        path = save_lora(finetune.state, tmp_path / f"{i}.safetensors", "kohya", finetune.config.to_dict())
        loras.append(load_lora(path))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = batch_spectra(loras)
        torch.set_num_threads(3)
        together = batch_spectra(loras)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for a, b in zip(alone, together, strict=True):
        assert list(a) == list(b)
        assert all(torch.equal(a[n].delta, b[n].delta) and torch.equal(a[n].up, b[n].up) for n in a)
