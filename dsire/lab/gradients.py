"""Per-example loss gradients, batched with torch.func (never a Python loop over examples).

The white-box attack, the DP-SGD noise matching and the noise study need loss gradients; attribution
also needs the gradients of a query's measurement (its margin), hence the `loss` argument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dsire.lab.data import Examples

GRADIENT_NUMBERS = 1 << 27  # numbers in one chunk of flattened per-example gradients (512 MiB in float32)


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


def flat_gradient_chunks(
    model: nn.Module, examples: Examples, names: list[str]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(indices, [len(indices), P] loss gradients flattened over `names` in order), a chunk of examples
    at a time: per-example gradients of a ViT-B/16's attention weights over every example would not
    fit in memory at once (P of millions), those of a small MLP make one chunk."""
    params = dict(model.named_parameters())
    chunk = max(1, GRADIENT_NUMBERS // sum(params[n].numel() for n in names))
    for start in range(0, len(examples), chunk):
        index = np.arange(start, min(start + chunk, len(examples)))
        grads = example_gradients(model, examples.subset(index), names, chunk=min(chunk, 256))
        yield torch.as_tensor(index), torch.cat([grads[n].flatten(1) for n in names], dim=1)
