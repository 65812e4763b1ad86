"""LoRA-FA's implicit gradient noise (arXiv 2409.17538), measured against its exact moments.

With A frozen at its random initialisation and B trained from zero, one SGD step on B changes the
effective weight ΔW = s·B·A by −η s² G AᵀA, G the full-weight gradient [d_out, d_in], A [r, d_in].
Divided by its mean E[AᵀA] = r v I (v the variance of an entry of A) the step is G + N with

    N = G (M − I),  M = AᵀA / (r v).

For i.i.d. zero-mean entries of A with fourth moment κ v² (κ the kurtosis: 3 Gaussian, 9/5 uniform),
rows of A are independent and Cov(M_kj, M_k'j) = (δ_kk' + (κ − 2) δ_kj δ_k'j) / r, so

    Var(N_ij) = (‖G_i‖² + (κ − 2) G_ij²) / r        (G_i the i-th row of G).

Gaussian A gives the paper's (‖G_i‖² + G_ij²)/r; peft's default kaiming-uniform A gives (‖G_i‖² − G_ij²/5)/r.
Each N_ij = (1/r) Σ_l Y_l is the mean of r i.i.d. per-row terms Y_l = a_lj (G_i·a_l)/v − G_ij (a_l the
l-th row of A), with Var(Y) = σ² = ‖G_i‖² + (κ − 2) G_ij², so Berry–Esseen bounds the Kolmogorov
distance of the standardised N_ij to N(0, 1) by C ρ / (σ³ √r), ρ = E|Y|³. Y does not depend on the
scale of A, so ρ/σ³ is the same at every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dsire.lab.methods import lora_a_moments

INITS = ("kaiming", "gaussian")
BERRY_ESSEEN_C = 0.4748  # Shevtsova (2011), sums of i.i.d. terms
KS_FLOOR_CONSTANT = math.sqrt(math.pi / 2) * math.log(2)  # E[Kolmogorov statistic] · √n for n exact draws
CHUNK_ELEMENTS = 1 << 24  # largest tensor per chunk of draws in measure_noise (128 MiB in float64)


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: {value!r} is not allowed; it must be an integer >= {minimum}")


def _check_kurtosis(kurtosis: float) -> None:
    if not math.isfinite(kurtosis) or kurtosis < 1:
        raise ValueError(f"kurtosis: {kurtosis!r} is not allowed; a kurtosis is finite and >= 1")


def _check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"init: {init!r} is unknown; allowed: {', '.join(INITS)}")


def _check_matrix(name: str, matrix: torch.Tensor) -> None:
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2:
        shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
        raise ValueError(f"{name}: must be a 2-D tensor [d_out, d_in], got {shape}")
    if matrix.numel() == 0:
        raise ValueError(f"{name}: is empty ({tuple(matrix.shape)}); both dimensions must be >= 1")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name}: contains NaN or Inf; only finite values are allowed")


def entry_moments(init: str, rank: int, d_in: int) -> tuple[float, float]:
    """Variance v and kurtosis κ of one entry of peft's lora_A [rank, d_in] (`lab.methods.lora_a_moments`,
    which the lab's learning-rate scaling uses too), with the arguments checked."""
    _check_init(init)
    _check_count("rank", rank)
    _check_count("d_in", d_in)
    return lora_a_moments(init, rank, d_in)


def draw_lora_A(
    draws: int,
    rank: int,
    d_in: int,
    init: str,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`draws` independent lora_A [rank, d_in] as peft initialises them, in one tensor [draws, rank, d_in]."""
    variance, _ = entry_moments(init, rank, d_in)
    _check_count("draws", draws)
    a = torch.empty(draws, rank, d_in, dtype=dtype)
    if init == "kaiming":
        bound = math.sqrt(3.0 * variance)
        return a.uniform_(-bound, bound, generator=generator)
    return a.normal_(0.0, math.sqrt(variance), generator=generator)


def predicted_variance(G: torch.Tensor, rank: int, kurtosis: float) -> torch.Tensor:
    """Var(N_ij) = (‖G_i‖² + (κ − 2) G_ij²) / r for every entry of G."""
    _check_matrix("G", G)
    _check_count("rank", rank)
    _check_kurtosis(kurtosis)
    square = G.square()
    return (square.sum(dim=1, keepdim=True) + (kurtosis - 2.0) * square) / rank


def lora_noise(G: torch.Tensor, A: torch.Tensor, variance: float) -> torch.Tensor:
    """N = G AᵀA/(r v) − G for each draw of A [draws, r, d_in]: [draws, d_out, d_in].

    Computed as (G Aᵀ) A, which costs d_out·r·d_in per draw instead of a d_in × d_in AᵀA.
    """
    _check_matrix("G", G)
    if A.ndim != 3 or A.shape[-1] != G.shape[1]:
        raise ValueError(f"A: must be [draws, rank, d_in={G.shape[1]}], got {tuple(A.shape)}")
    if not variance > 0 or not math.isfinite(variance):
        raise ValueError(f"variance: {variance!r} is not allowed; it must be finite and > 0")
    G = G.to(A.dtype)
    return (G @ A.transpose(-1, -2)) @ A / (A.shape[1] * variance) - G


def ks_normal(samples: torch.Tensor) -> torch.Tensor:
    """Kolmogorov–Smirnov distance of each column of `samples` [n, columns] to N(0, 1), vectorised."""
    n = samples.shape[0]
    cdf = torch.special.ndtr(samples.sort(dim=0).values)
    steps = torch.arange(n + 1, dtype=cdf.dtype).unsqueeze(1) / n
    return torch.maximum((steps[1:] - cdf).amax(dim=0), (cdf - steps[:-1]).amax(dim=0))


def _entry_sample(predicted: torch.Tensor, entries: int) -> torch.Tensor:
    """Up to `entries` flat indices spread evenly over the entries whose predicted variance is > 0."""
    candidates = torch.nonzero(predicted.flatten() > 0).flatten()
    picks = torch.linspace(0, len(candidates) - 1, min(entries, len(candidates))).round().long()
    return candidates[picks.unique()]


def _measure_rank(
    G: torch.Tensor, rank: int, init: str, draws: int, generator: torch.Generator, entries: int
) -> dict[str, float]:
    d_out, d_in = G.shape
    variance, kurtosis = entry_moments(init, rank, d_in)
    predicted = predicted_variance(G, rank, kurtosis)
    sample = _entry_sample(predicted, entries)
    rows, cols = sample // d_in, sample % d_in
    total, total_square = torch.zeros_like(G), torch.zeros_like(G)
    sampled, abs_cubed = [], torch.zeros(len(sample), dtype=G.dtype)
    chunk = max(1, CHUNK_ELEMENTS // max(d_out * d_in, rank * d_in))
    for start in range(0, draws, chunk):
        A = draw_lora_A(min(chunk, draws - start), rank, d_in, init, generator, dtype=G.dtype)
        noise = lora_noise(G, A, variance)
        total += noise.sum(dim=0)
        total_square += noise.square().sum(dim=0)
        sampled.append(noise.flatten(1)[:, sample])
        first_row = A[:, 0]  # Y of the first row of each draw: [chunk, entries]
        per_row = first_row[:, cols] * (first_row @ G.T)[:, rows] / variance - G[rows, cols]
        abs_cubed += per_row.abs().pow(3).sum(dim=0)
    mean = total / draws
    measured = (total_square - draws * mean.square()) / (draws - 1)
    positive = predicted > 0
    standardised = torch.cat(sampled) / predicted.flatten()[sample].sqrt()
    sigma = (rank * predicted.flatten()[sample]).sqrt()  # σ of one per-row term Y
    rho = abs_cubed / draws
    return {
        "rank": rank,
        "variance_ratio": float(measured.sum() / predicted.sum()),
        "median_entry_ratio": float((measured[positive] / predicted[positive]).median()),
        "bias": float((mean[positive] / predicted[positive].sqrt()).mean()),
        "ks_distance": float(ks_normal(standardised).mean()),
        "ks_floor": KS_FLOOR_CONSTANT / math.sqrt(draws),
        "berry_esseen_bound": float((BERRY_ESSEEN_C * rho / sigma**3).mean() / math.sqrt(rank)),
    }


def measure_noise(
    G: torch.Tensor,
    ranks: Sequence[int],
    init: str,
    draws: int,
    generator: torch.Generator,
    entries: int = 256,
) -> list[dict[str, float]]:
    """The measured noise of `draws` random A against the theory, one dict of plain floats per rank.

    - variance_ratio: Σ measured per-entry variances / Σ predicted ones (1 if the formula holds);
      median_entry_ratio: the median of the per-entry ratios.
    - bias: the per-entry mean of N in units of its predicted std, averaged over entries (0 in theory).
    - ks_distance: the Kolmogorov–Smirnov distance to N(0, 1) of N_ij standardised by its predicted std,
      averaged over `entries` entries spread evenly over G; ks_floor is the distance that `draws` exact
      Gaussian samples would show on average, below which ks_distance cannot fall.
    - berry_esseen_bound: C ρ/(σ³ √r) averaged over the same entries, σ exact and ρ = E|Y|³ estimated
      from the first row of each draw (Y's law is the same at every rank); it bounds the true distance,
      not ks_distance, which also carries the sampling error of `draws` draws.
    Computed in float64, `draws` split into chunks so that memory stays bounded.
    """
    _check_matrix("G", G)
    _check_init(init)
    for rank in ranks:
        _check_count("rank", rank)
    _check_count("draws", draws, minimum=2)
    _check_count("entries", entries)
    G = G.to(torch.float64)
    if not G.any():
        raise ValueError("G: is all zero; its noise is zero and nothing can be measured")
    return [_measure_rank(G, rank, init, draws, generator, entries) for rank in ranks]


def lora_fa_vs_full(delta_lora: torch.Tensor, delta_full: torch.Tensor, rank: int, kurtosis: float) -> dict[str, float]:
    """A whole LoRA-FA fine-tune's ΔW against a full fine-tune's on the same data and seed.

    In the lazy regime (gradients along both trajectories equal, plain SGD) LoRA-FA's B accumulates
    −η s Σ_t G_t Aᵀ with the one A of initialisation, so ΔW_lora ∝ ΔW_full M: the one-step theory
    with G = ΔW_full and the same noise N = ΔW_full (M − I) for all steps together (not fresh noise per
    step as in DP-SGD). Summed over entries Var(N) = q ‖ΔW_full‖² with q = (d_in + κ − 2)/r, whatever
    ΔW_full is, so the theory predicts the angle between the two updates: cos² = 1/(1 + q).

    Returned (plain floats):
    - scale: the least-squares c minimising ‖c ΔW_lora − ΔW_full‖; relative_error: that minimum over
      ‖ΔW_full‖ (= sin of the angle); cosine: cos of the angle.
    - noise_to_signal: ΔW_lora's residual orthogonal to ΔW_full over its component along ΔW_full, both
      squared (tan² of the angle): the mean per-entry noise variance over the mean squared entry of G;
      predicted_noise_to_signal: q; noise_ratio: their ratio (1 if the one-step theory holds).
    Not expected to match over many steps: gradients on LoRA-FA's own trajectory drift from full
    fine-tuning's (the LoRA keeps descending inside A's row space), momentum, Adam or weight decay make
    the update nonlinear in the gradients, and one fine-tune is one draw of A, so only these totals are
    measurable here, not per-entry variances.
    """
    _check_matrix("delta_lora", delta_lora)
    _check_matrix("delta_full", delta_full)
    if delta_lora.shape != delta_full.shape:
        raise ValueError(
            f"delta_lora: shape {tuple(delta_lora.shape)} differs from delta_full's {tuple(delta_full.shape)}"
        )
    _check_count("rank", rank)
    _check_kurtosis(kurtosis)
    lora, full = delta_lora.to(torch.float64), delta_full.to(torch.float64)
    lora_norm, full_norm = torch.linalg.matrix_norm(lora), torch.linalg.matrix_norm(full)
    for name, norm in (("delta_lora", lora_norm), ("delta_full", full_norm)):
        if norm == 0:
            raise ValueError(f"{name}: is all zero; an update to compare must be nonzero")
    inner = (lora * full).sum()
    cosine = float(inner / (lora_norm * full_norm))
    q = (full.shape[1] + kurtosis - 2.0) / rank
    noise_to_signal = (1.0 - cosine**2) / cosine**2 if cosine != 0 else math.inf
    return {
        "scale": float(inner / lora_norm**2),
        "relative_error": float(torch.linalg.matrix_norm(inner / lora_norm**2 * lora - full) / full_norm),
        "cosine": cosine,
        "predicted_cosine": 1.0 / math.sqrt(1.0 + q),
        "noise_to_signal": noise_to_signal,
        "predicted_noise_to_signal": q,
        "noise_ratio": noise_to_signal / q,
    }
