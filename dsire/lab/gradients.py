"""Per-example loss gradients, batched with torch.func (never a Python loop over examples).

The white-box attack, the DP-SGD noise matching and the noise study need loss gradients; attribution
also needs the gradients of a query's measurement (its margin), hence the `loss` argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dsire.lab.data import Examples


def example_gradients(
    model: nn.Module,
    examples: Examples,
    names: list[str],
    chunk: int = 256,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict[str, torch.Tensor]:
    """Each example's gradient of `loss(logits [1, classes], label [1])` (cross-entropy unless given)
    with respect to the parameters `names`: {name: [examples, ...]}."""
    params = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in params.items() if n not in names}

    def one(chosen: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(model, {**fixed, **chosen}, (x[None],)), y[None])

    chosen = {n: params[n].detach() for n in names}
    device = next(iter(chosen.values())).device
    parts = []
    for start in range(0, len(examples), chunk):
        idx = torch.arange(start, min(start + chunk, len(examples)))
        x, y = examples.take(idx).to(device), examples.labels[idx].to(device)
        parts.append(vmap(grad(one), in_dims=(None, 0, 0))(chosen, x, y))
    return {n: torch.cat([p[n] for p in parts]) for n in names}
