"""LoRA-FA's implicit noise: moments against peft's own init, exact quadrature and scipy references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch
from peft import LoraConfig, get_peft_model

from dsire.privacy.noise import (
    BERRY_ESSEEN_C,
    draw_lora_A,
    entry_moments,
    ks_normal,
    lora_fa_vs_full,
    lora_noise,
    measure_noise,
    predicted_variance,
)

INITS = ["kaiming", "gaussian"]
RANKS = [1, 2, 4, 8, 16, 32, 64]


def moments(x: torch.Tensor) -> tuple[float, float, float]:
    """Mean, variance and kurtosis of all entries, in float64."""
    x = x.double().flatten()
    centred = x - x.mean()
    variance = centred.square().mean()
    return float(x.mean()), float(variance), float(centred.pow(4).mean() / variance**2)


@pytest.mark.parametrize("init", INITS)
def test_draws_have_the_moments_entry_moments_claims(init):
    rank, d_in = 8, 64
    a = draw_lora_A(64, rank, d_in, init, torch.Generator().manual_seed(0))
    variance, kurtosis = entry_moments(init, rank, d_in)
    mean, var, kurt = moments(a)
    n = a.numel()
    assert a.shape == (64, rank, d_in) and a.dtype == torch.float32
    assert abs(mean) < 5 * math.sqrt(variance / n)
    assert abs(var / variance - 1) < 5 * math.sqrt((kurtosis - 1) / n)
    assert abs(kurt - kurtosis) < 0.15  # the two kurtoses are 1.8 and 3
    assert not torch.equal(a[0], a[1])  # independent draws, not one A repeated
    assert torch.equal(a, draw_lora_A(64, rank, d_in, init, torch.Generator().manual_seed(0)))
    if init == "kaiming":
        assert a.abs().max() <= 1 / math.sqrt(d_in)


@pytest.mark.parametrize(("init", "peft_init"), [("kaiming", True), ("gaussian", "gaussian")])
def test_entry_moments_match_peft_lora_A(init, peft_init):
    rank, d_in = 16, 1024
    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"], init_lora_weights=peft_init)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(d_in, 2)), config)
    a = model.base_model.model[0].lora_A["default"].weight.detach()
    variance, kurtosis = entry_moments(init, rank, d_in)
    _, var, kurt = moments(a)
    assert abs(var / variance - 1) < 5 * math.sqrt((kurtosis - 1) / a.numel())
    assert abs(kurt - kurtosis) < 0.25


def test_predicted_variance_by_hand():
    G = torch.tensor([[1.0, 2.0]])  # ‖G_1‖² = 5
    torch.testing.assert_close(predicted_variance(G, 2, 3.0), torch.tensor([[3.0, 4.5]]))  # (5 + G²)/2
    torch.testing.assert_close(predicted_variance(G, 2, 1.8), torch.tensor([[2.4, 2.1]]))  # (5 − G²/5)/2


def quadrature(init: str, rank: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes [n, rank, d_in] and weights [n] that integrate exactly against peft's law of lora_A any
    polynomial of degree <= 5 in each entry (3-point Gauss rules: Legendre for the uniform, Hermite for
    the Gaussian), from the init's definition rather than from entry_moments."""
    if init == "kaiming":
        x, w = np.polynomial.legendre.leggauss(3)
        x, w = x / math.sqrt(d_in), w / 2
    else:
        x, w = np.polynomial.hermite_e.hermegauss(3)
        x, w = x / rank, w / math.sqrt(2 * math.pi)
    index = np.array(list(itertools.product(range(3), repeat=rank * d_in)))
    return torch.from_numpy(x[index]).reshape(-1, rank, d_in), torch.from_numpy(w[index].prod(axis=1))


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("init", INITS)
def test_variance_formula_is_exact(init, rank):
    """Var(N_ij) integrated exactly over A (no sampling error) equals the formula, and E[N] = 0."""
    G = torch.tensor([[3.0, -1.0, 0.5], [0.2, 2.0, -4.0]], dtype=torch.float64)
    nodes, weights = quadrature(init, rank, 3)
    variance, kurtosis = entry_moments(init, rank, 3)
    assert float(weights @ nodes[:, 0, 0] ** 2) == pytest.approx(variance, rel=1e-12)
    assert float(weights @ nodes[:, 0, 0] ** 4) == pytest.approx(kurtosis * variance**2, rel=1e-12)
    noise = lora_noise(G, nodes, variance)
    mean = torch.einsum("n,nij->ij", weights, noise)
    second = torch.einsum("n,nij->ij", weights, noise.square())
    torch.testing.assert_close(mean, torch.zeros_like(G), rtol=0, atol=1e-12)
    torch.testing.assert_close(second, predicted_variance(G, rank, kurtosis), rtol=1e-10, atol=0)


@pytest.mark.parametrize(("init", "wrong_kurtosis"), [("kaiming", 3.0), ("gaussian", 1.8)])
def test_kurtosis_term_is_measurable_on_a_dominant_entry(init, wrong_kurtosis):
    """With G_ij² a large part of ‖G_i‖², the formula with the other init's κ misses by a factor 2.5."""
    G = torch.full((2, 8), 0.1, dtype=torch.float64)
    G[:, 0] = 4.0
    rank = 4
    variance, kurtosis = entry_moments(init, rank, 8)
    A = draw_lora_A(20_000, rank, 8, init, torch.Generator().manual_seed(1), dtype=torch.float64)
    measured = lora_noise(G, A, variance)[:, :, 0].var(dim=0)
    assert torch.allclose(
        measured / predicted_variance(G, rank, kurtosis)[:, 0], torch.ones(2, dtype=torch.float64), rtol=0.05
    )
    wrong = measured / predicted_variance(G, rank, wrong_kurtosis)[:, 0]
    assert ((wrong < 0.6) | (wrong > 1.6)).all()


def test_ks_normal_matches_scipy():
    g = torch.Generator().manual_seed(2)
    samples = torch.cat([torch.randn(500, 3, generator=g, dtype=torch.float64), torch.rand(500, 2, generator=g)], 1)
    expected = scipy.stats.kstest(samples.numpy(), "norm", axis=0).statistic
    torch.testing.assert_close(ks_normal(samples.double()), torch.from_numpy(expected), rtol=1e-12, atol=1e-12)


SEEDS = [("gaussian", 0), ("gaussian", 1), ("gaussian", 2), ("kaiming", 0), ("kaiming", 1)]


@pytest.fixture(scope="module", params=SEEDS, ids=[f"{init}-{seed}" for init, seed in SEEDS])
def measured(request) -> list[dict[str, float]]:
    init, seed = request.param
    g = torch.Generator().manual_seed(seed)
    return measure_noise(torch.randn(16, 48, generator=g), RANKS, init, 3000, g)


def test_measured_variance_matches_the_formula_at_every_rank(measured):
    assert [m["rank"] for m in measured] == RANKS
    for m in measured:
        assert all(type(value) in (int, float) for value in m.values())
        assert m["variance_ratio"] == pytest.approx(1, abs=0.05), m
        assert m["median_entry_ratio"] == pytest.approx(1, abs=0.05), m
        assert abs(m["bias"]) < 4 / math.sqrt(3000), m  # the mean of 3000 draws, in units of their std


def test_ks_distance_falls_as_the_rank_grows(measured):
    ks = {m["rank"]: m["ks_distance"] for m in measured}
    assert ks[1] > ks[4] > ks[16] and ks[16] < ks[1] / 3
    for m in measured:
        assert m["ks_distance"] <= m["berry_esseen_bound"] + m["ks_floor"], m


def absolute_third_moment(density, low: float, high: float, variance: float) -> float:
    """E|X²/variance − 1|³ for X with this density on [low, high], by quadrature split at the kink."""
    kink = math.sqrt(variance)
    parts = [(low, -kink), (-kink, kink), (kink, high)]
    return sum(scipy.integrate.quad(lambda x: abs(x * x / variance - 1) ** 3 * density(x), *p)[0] for p in parts)


@pytest.mark.parametrize("init", INITS)
def test_berry_esseen_bound_against_exact_third_moments(init):
    """G = [[1, 0]]: Y is a0²/v − 1 on entry (0, 0) and a0·a1/v (a product of two independent unit
    variables) on entry (0, 1), whose E|Y|³ scipy integrates exactly."""
    if init == "gaussian":
        product = (2 * math.sqrt(2 / math.pi)) ** 2  # (E|z|³)²
        square = absolute_third_moment(scipy.stats.norm.pdf, -40, 40, 1.0)
    else:
        product = (3 * math.sqrt(3) / 4) ** 2  # (E|u|³)², u ~ U(−√3, √3)
        square = absolute_third_moment(lambda x: 1 / (2 * math.sqrt(3)), -math.sqrt(3), math.sqrt(3), 1.0)
    kurtosis = entry_moments(init, 1, 2)[1]
    sigma_cubed = math.sqrt(kurtosis - 1) ** 3  # σ² = ‖G_i‖² + (κ − 2) G_ij² = κ − 1 on entry (0, 0)
    for m in measure_noise(torch.tensor([[1.0, 0.0]]), [1, 4], init, 400_000, torch.Generator().manual_seed(3)):
        exact = BERRY_ESSEEN_C * (square / sigma_cubed + product) / 2 / math.sqrt(m["rank"])
        assert m["berry_esseen_bound"] == pytest.approx(exact, rel=0.05)


def test_lora_fa_vs_full_by_hand():
    full = torch.tensor([[1.0, 0.0]])
    same = lora_fa_vs_full(2 * full, full, rank=1, kurtosis=3.0)
    assert same == pytest.approx(
        {
            "scale": 0.5,
            "relative_error": 0.0,
            "cosine": 1.0,
            "predicted_cosine": 0.5,
            "noise_to_signal": 0.0,
            "predicted_noise_to_signal": 3.0,
            "noise_ratio": 0.0,
        }
    )
    diagonal = lora_fa_vs_full(torch.tensor([[1.0, 1.0]]), full, rank=1, kurtosis=3.0)  # 45°: residual [−½, ½]
    assert diagonal["scale"] == pytest.approx(0.5)
    assert diagonal["relative_error"] == pytest.approx(math.sqrt(0.5))
    assert diagonal["cosine"] == pytest.approx(math.sqrt(0.5))
    assert diagonal["noise_to_signal"] == pytest.approx(1.0)
    assert diagonal["noise_ratio"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("init", INITS)
def test_lora_fa_vs_full_matches_theory_in_the_lazy_regime(init):
    """ΔW_lora = −η (ΔW_full + N) exactly (the lazy regime): the noise ratio is 1 on average over A."""
    rank, d_out, d_in = 8, 64, 256
    variance, kurtosis = entry_moments(init, rank, d_in)
    g = torch.Generator().manual_seed(4)
    ratios = []
    for _ in range(20):
        full = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        A = draw_lora_A(1, rank, d_in, init, g, dtype=torch.float64)
        ratios.append(lora_fa_vs_full(0.3 * (full + lora_noise(full, A, variance)[0]), full, rank, kurtosis))
    assert np.mean([r["noise_ratio"] for r in ratios]) == pytest.approx(1, abs=0.05)
    assert np.mean([r["cosine"] for r in ratios]) == pytest.approx(ratios[0]["predicted_cosine"], rel=0.05)


G2 = torch.ones(2, 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: entry_moments("xavier", 4, 8), "init: 'xavier' is unknown; allowed: kaiming, gaussian"),
        (lambda: entry_moments("kaiming", 0, 8), "rank: 0 is not allowed"),
        (lambda: entry_moments("kaiming", 2.5, 8), "rank: 2.5 is not allowed"),
        (lambda: entry_moments("kaiming", True, 8), "rank: True is not allowed"),
        (lambda: entry_moments("kaiming", 4, 0), "d_in: 0 is not allowed"),
        (lambda: draw_lora_A(0, 4, 8, "kaiming", torch.Generator()), "draws: 0 is not allowed"),
        (lambda: predicted_variance(torch.ones(3), 4, 3.0), r"G: must be a 2-D tensor \[d_out, d_in\], got \(3,\)"),
        (lambda: predicted_variance(torch.ones(1, 2, 3), 4, 3.0), "G: must be a 2-D tensor"),
        (lambda: predicted_variance([[1.0]], 4, 3.0), "G: must be a 2-D tensor .* got list"),
        (lambda: predicted_variance(torch.ones(0, 3), 4, 3.0), "G: is empty"),
        (lambda: predicted_variance(torch.tensor([[1.0, math.nan]]), 4, 3.0), "G: contains NaN or Inf"),
        (lambda: predicted_variance(torch.tensor([[math.inf]]), 4, 3.0), "G: contains NaN or Inf"),
        (lambda: predicted_variance(G2, 4, 0.5), "kurtosis: 0.5 is not allowed"),
        (lambda: predicted_variance(G2, 4, math.nan), "kurtosis: nan is not allowed"),
        (lambda: lora_noise(G2, torch.ones(5, 2, 4), 0.1), r"A: must be \[draws, rank, d_in=3\], got \(5, 2, 4\)"),
        (lambda: lora_noise(G2, torch.ones(2, 3), 0.1), r"A: must be \[draws, rank, d_in=3\]"),
        (lambda: lora_noise(G2, torch.ones(5, 2, 3), 0.0), "variance: 0.0 is not allowed"),
        (lambda: measure_noise(G2, [4], "kaiming", 1, torch.Generator()), "draws: 1 is not allowed; .* >= 2"),
        (lambda: measure_noise(G2, [4, 0], "kaiming", 10, torch.Generator()), "rank: 0 is not allowed"),
        (lambda: measure_noise(G2, [4], "lora", 10, torch.Generator()), "init: 'lora' is unknown"),
        (lambda: measure_noise(G2, [4], "kaiming", 10, torch.Generator(), entries=0), "entries: 0 is not allowed"),
        (lambda: measure_noise(torch.zeros(2, 3), [4], "kaiming", 10, torch.Generator()), "G: is all zero"),
        (lambda: lora_fa_vs_full(G2, torch.ones(3, 2), 4, 3.0), r"delta_lora: shape \(2, 3\) differs .* \(3, 2\)"),
        (lambda: lora_fa_vs_full(torch.zeros(2, 3), G2, 4, 3.0), "delta_lora: is all zero"),
        (lambda: lora_fa_vs_full(G2, torch.zeros(2, 3), 4, 3.0), "delta_full: is all zero"),
        (lambda: lora_fa_vs_full(G2 * math.nan, G2, 4, 3.0), "delta_lora: contains NaN or Inf"),
        (lambda: lora_fa_vs_full(G2, G2, 0, 3.0), "rank: 0 is not allowed"),
    ],
)
def test_user_mistakes_are_value_errors_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
