"""Membership-inference attacks: one score per (model, example), higher = more likely a member.

LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles") compares the
target model's logit-scaled confidence φ on an example with Gaussians fitted to φ of shadow
models that did (IN) or did not (OUT) train on it. The loss attack (Yeom et al. 2018) is the
baseline, and gradient alignment is the white-box attack that sees only the fine-tune's weight
change ΔW (as in "LoRA is not inherently private", arXiv 2601.21719).

Gaussians are fitted with the mean and the unbiased (ddof=1) standard deviation; the reference code
uses the median and ddof=0, which agree with these as the number of shadow models grows.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm

from dsire.lab.margins import margin

# Floor on every fitted σ, in φ (logit) units. An example whose φ is the same in all shadow models
# (e.g. a confidence saturated in float32) would otherwise give σ = 0 and infinite scores; real
# spreads of φ across models are orders of magnitude wider, so the floor only acts in that case.
SIGMA_FLOOR = 1e-3


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """φ = log p_y − log(1 − p_y) of the softmax, as z_y − logsumexp_{c≠y} z_c (no p_y ≈ 1 rounding).

    logits: [..., C] (e.g. [models, examples, classes]); labels: class indices of shape logits.shape[:-1]
    or broadcastable to it (e.g. [examples]). Returns φ of shape logits.shape[:-1].
    """
    if logits.ndim < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits need a last dimension of at least 2 classes; got shape {tuple(logits.shape)}")
    if not logits.is_floating_point() or not torch.isfinite(logits).all():
        raise ValueError("logits must be finite floating-point numbers (NaN or Inf found, or an integer dtype)")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}")
    try:
        labels = labels.expand(logits.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)}: "
            "labels need the shape of logits without its last (class) dimension"
        ) from None
    classes = logits.shape[-1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes - 1}] for {classes} classes")
    return margin(logits, labels)


def lira_online(
    target: np.ndarray, shadow: np.ndarray, shadow_in: np.ndarray, fixed_variance: bool = False
) -> np.ndarray:
    """LiRA score log N(φ; μ_in, σ_in) − log N(φ; μ_out, σ_out) with per-example Gaussians.

    target: φ of the target model(s), [E] or [T, E]; shadow: φ of K shadow models, [K, E];
    shadow_in: [K, E] bool, whether shadow model k trained on example e. With fixed_variance, one σ_in
    and one σ_out are pooled over all examples (deviations from each example's own mean), which needs
    fewer shadow models. Returns scores of target's shape.
    """
    target, shadow, shadow_in = _check_lira("LiRA online", target, shadow, shadow_in, fixed_variance, need_in=True)
    mu_in, sigma_in = _fit_gaussians(shadow, shadow_in, fixed_variance)
    mu_out, sigma_out = _fit_gaussians(shadow, ~shadow_in, fixed_variance)
    return norm.logpdf(target, mu_in, sigma_in) - norm.logpdf(target, mu_out, sigma_out)


def lira_offline(
    target: np.ndarray, shadow: np.ndarray, shadow_in: np.ndarray, fixed_variance: bool = False
) -> np.ndarray:
    """Offline LiRA, from OUT shadow models only: the one-sided log Φ((φ − μ_out) / σ_out).

    A member's φ sits high in its OUT distribution, so the score is the log-probability that an OUT
    model's φ falls below the target's. Arguments and result as in `lira_online`; IN models are ignored.
    """
    target, shadow, shadow_in = _check_lira("LiRA offline", target, shadow, shadow_in, fixed_variance, need_in=False)
    mu_out, sigma_out = _fit_gaussians(shadow, ~shadow_in, fixed_variance)
    return norm.logcdf(target, mu_out, sigma_out)


def loss_attack(losses: np.ndarray) -> np.ndarray:
    """Yeom et al.'s attack: score = −loss (members were fitted, so their loss is low)."""
    losses = np.asarray(losses, dtype=float)
    if not np.isfinite(losses).all():
        raise ValueError("losses must be finite (NaN or Inf found)")
    return -losses


def gradient_alignment(example_grads: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """White-box score from the weight change alone: cos(−g_e, ΔW) for each candidate e.

    example_grads: [E, P], each candidate's loss gradient at the initial (public) weights; delta: [P],
    the fine-tune's trainable parameters flattened, final minus initial. Training descended along the
    members' gradients, so ΔW points along their −g_e. A zero gradient or ΔW scores 0.
    """
    if example_grads.ndim != 2 or delta.ndim != 1 or example_grads.shape[1] != delta.shape[0]:
        raise ValueError(
            f"example_grads must be [E, P] and delta [P] with the same P; "
            f"got {tuple(example_grads.shape)} and {tuple(delta.shape)}"
        )
    for name, tensor in (("example_grads", example_grads), ("delta", delta)):
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"{name} must be finite floating-point numbers (NaN or Inf found, or an integer dtype)")
    norms = torch.linalg.vector_norm(example_grads, dim=1) * torch.linalg.vector_norm(delta)
    dots = -(example_grads @ delta)
    return torch.where(norms > 0, dots / torch.where(norms > 0, norms, 1), 0)


def _fit_gaussians(shadow: np.ndarray, mask: np.ndarray, fixed_variance: bool) -> tuple[np.ndarray, np.ndarray | float]:
    """Per-example mean of the masked φ, and per-example (or pooled) unbiased σ, floored."""
    counts = mask.sum(axis=0)
    mu = np.where(mask, shadow, 0.0).sum(axis=0) / counts
    squares = np.where(mask, (shadow - mu) ** 2, 0.0).sum(axis=0)
    sigma = np.sqrt(squares.sum() / (counts.sum() - counts.size) if fixed_variance else squares / (counts - 1))
    return mu, np.maximum(sigma, SIGMA_FLOOR)


def _check_lira(
    attack: str, target: np.ndarray, shadow: np.ndarray, shadow_in: np.ndarray, fixed_variance: bool, need_in: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shapes, finiteness and enough IN/OUT shadow models for every Gaussian `attack` fits."""
    target, shadow, shadow_in = np.asarray(target, dtype=float), np.asarray(shadow, dtype=float), np.asarray(shadow_in)
    if shadow.ndim != 2:
        raise ValueError(f"{attack}: shadow must be [K, E] (K shadow models, E examples); got shape {shadow.shape}")
    if shadow_in.shape != shadow.shape or shadow_in.dtype != bool:
        raise ValueError(
            f"{attack}: shadow_in must be a boolean array of shadow's shape {shadow.shape}; "
            f"got {shadow_in.dtype} of shape {shadow_in.shape}"
        )
    if target.ndim not in (1, 2) or target.shape[-1] != shadow.shape[1]:
        raise ValueError(
            f"{attack}: target must be [E] or [T, E] with E = {shadow.shape[1]} examples as in shadow; "
            f"got shape {target.shape}"
        )
    for name, values in (("target", target), ("shadow", shadow)):
        if not np.isfinite(values).all():
            raise ValueError(f"{attack}: {name} scores must be finite (NaN or Inf found)")
    least = 1 if fixed_variance else 2
    sides = (("IN", shadow_in), ("OUT", ~shadow_in)) if need_in else (("OUT", ~shadow_in),)
    wanted = " and ".join(f"{least} {side}" for side, _ in sides)
    for side, mask in sides:
        counts = mask.sum(axis=0)
        short = np.flatnonzero(counts < least)
        if short.size:
            more = f" (and {short.size - 1} more examples)" if short.size > 1 else ""
            raise ValueError(
                f"{attack} needs at least {wanted} shadow models per example; example {short[0]}{more} has "
                f"{counts[short[0]]} {side}: train more shadow models (K)"
            )
        if fixed_variance and counts.sum() == counts.size:
            raise ValueError(
                f"{attack} with fixed_variance pools σ_{side.lower()} over examples and needs some example with "
                f"2 {side} shadow models; every example has exactly 1: train more shadow models (K)"
            )
    return target, shadow, shadow_in
