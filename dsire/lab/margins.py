"""The margin of a classifier's output: what LiRA scores and what attribution measures."""

from __future__ import annotations

import torch


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y − logsumexp_{c≠y} z_c for logits [..., classes] and labels broadcastable to logits.shape[:-1]:
    log p_y − log(1 − p_y) of the softmax without rounding p_y ≈ 1. No checks on the values, so it runs
    under `torch.func` transforms (per-example gradients); callers with untrusted input check first."""
    labels = labels.expand(logits.shape[:-1])
    own = labels.unsqueeze(-1) == torch.arange(logits.shape[-1], device=logits.device)  # one_hot does not vmap
    correct = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return correct - logits.masked_fill(own, -torch.inf).logsumexp(dim=-1)
