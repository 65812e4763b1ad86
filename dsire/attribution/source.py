"""Source (Bae et al., arXiv 2405.12186) and the baselines, as scores [queries, training examples].

Source splits the SGD trajectory into L segments. In segment ℓ (K_ℓ steps at effective learning rate
η̄_ℓ, curvature H̄_ℓ, candidate gradient ḡ_ℓ averaged over the segment's checkpoints) upweighting a
training example by 1/N moves the parameters by −r̄_ℓ, r̄_ℓ = (1/N)(I − S̄_ℓ) H̄_ℓ⁻¹ ḡ_ℓ with
S̄_ℓ = exp(−η̄_ℓ K_ℓ H̄_ℓ), and later segments carry that change to the end multiplied by S̄_ℓ'. The score
is τ = ∇f(θ_final)ᵀ Σ_ℓ (Π_{ℓ'>ℓ} S̄_ℓ') r̄_ℓ with f the query's negative margin: positive means that
training on the example raised the query's margin. In each segment's EK-FAC eigenbasis (eigenvalue σ)
the segment term is (1 − e^(−η̄Kσ))/σ (→ η̄K as σ → 0, computed with expm1) and the propagation
e^(−η̄Kσ). All matrices are symmetric, so the query gradient is carried backwards through the
segments (a few queries) instead of every training gradient forwards.

SGD momentum β enters as the effective learning rate η/(1 − β) and weight decay λ as curvature + λ.
Adam is not supported: its preconditioner changes the flow's matrix from H to P H, which needs the
optimiser-preconditioned variant of the paper; the lab trains with SGD only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsire.attribution.curvature import Factors


@dataclass
class Segment:
    """One stretch of the trajectory: duration η̄K, its curvature, and the training examples' layer
    gradients averaged over its checkpoints {module: [examples, out, in]}."""

    duration: float
    decay: float  # weight decay (and any extra damping): adds to every curvature eigenvalue
    factors: Factors
    gradients: dict[str, torch.Tensor]


def segment_term(sigma: torch.Tensor, duration: float) -> torch.Tensor:
    """(1 − e^(−duration·σ))/σ, equal to `duration` at σ = 0 (a flat direction keeps moving for the
    whole segment)."""
    safe = torch.where(sigma == 0, torch.ones_like(sigma), sigma)
    return torch.where(sigma == 0, torch.full_like(sigma, duration), -torch.expm1(-duration * sigma) / safe)


def propagation(sigma: torch.Tensor, duration: float) -> torch.Tensor:
    """e^(−duration·σ): how much of a parameter change in this direction survives the segment."""
    return torch.exp(-duration * sigma)


def source_scores(queries: dict[str, torch.Tensor], segments: list[Segment], examples: int) -> torch.Tensor:
    """Source scores [queries, examples] from the query gradients at the final checkpoint
    {module: [queries, out, in]} and the segments in training order."""
    total = None
    for module, carried in queries.items():
        v = carried.double()
        for segment in reversed(segments):
            layer = segment.factors[module]
            term = layer.apply(lambda s, seg=segment: segment_term(s + seg.decay, seg.duration), v)
            part = torch.einsum("qoi,noi->qn", term, segment.gradients[module].double()) / examples
            total = part if total is None else total + part
            v = layer.apply(lambda s, seg=segment: propagation(s + seg.decay, seg.duration), v)
    return total


def influence_scores(
    queries: dict[str, torch.Tensor], factors: Factors, gradients: dict[str, torch.Tensor], damping: float | None
) -> torch.Tensor:
    """EK-FAC influence function gᵀ_q (H + λ)⁻¹ g_m at one checkpoint (kronfluence's formula, its
    default damping 0.1 × mean eigenvalue per layer when `damping` is None)."""
    total = None
    for module, q in queries.items():
        layer = factors[module]
        lam = 0.1 * float(layer.eigenvalues.mean()) if damping is None else damping
        term = layer.apply(lambda s, lam=lam: 1.0 / (s + lam), q.double())
        part = torch.einsum("qoi,noi->qn", term, gradients[module].double())
        total = part if total is None else total + part
    return total


def dot_scores(queries: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over layers of ⟨query gradient, training gradient⟩: [queries, examples]."""
    return sum(torch.einsum("qoi,noi->qn", queries[m].double(), gradients[m].double()) for m in queries)


def cosine_scores(queries: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cosine similarity of the whole (all tracked layers) query and training gradients."""
    q_norm = torch.sqrt(sum(queries[m].double().pow(2).sum((1, 2)) for m in queries))
    g_norm = torch.sqrt(sum(gradients[m].double().pow(2).sum((1, 2)) for m in queries))
    return dot_scores(queries, gradients) / (q_norm[:, None] * g_norm[None, :]).clamp_min(1e-30)
