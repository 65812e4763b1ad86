"""Many small models trained at once: parameters stacked on a leading model axis, one `vmap`.

Audits and attribution retrain the same small model hundreds of times on different subsets.
Stacking M models' parameters (`torch.func.stack_module_state`) and running their forward passes
under `vmap` turns M small matrix products into M-batched ones. The loss is the sum of the M
models' mean losses, so each model's gradient is exactly its own; SGD with momentum and weight
decay acts elementwise, so one optimiser over the stacked tensors updates each model as its own
optimiser would. Each model draws its batches from its own subset with its own seed, so a model's
trajectory does not depend on which other models share its ensemble (`tests/test_lab.py` checks
ensemble = one-by-one).

DP-SGD (`dpsgd`) needs per-example clipping and Poisson sampling with a privacy accountant: those
models are trained one at a time with opacus, then stacked like the others.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import DataLoader, TensorDataset

from dsire.lab.data import Examples
from dsire.lab.methods import FinetuneSettings, lora_inputs, param_groups

INPUT_NUMBERS = 1 << 25  # numbers fed to one inference pass of an ensemble: 222 RGB 224² images, 512 digits to M = 1024


@dataclass
class Ensemble:
    """M models of one architecture: per-model tensors stacked on dim 0, shared frozen ones once."""

    template: nn.Module  # the architecture, on the meta device
    stacked: dict[str, torch.Tensor]  # [M, ...]: trainable parameters and per-model frozen ones
    shared: dict[str, torch.Tensor]  # frozen and equal in every model (the pretrained backbone)
    trainable: tuple[str, ...]
    initial: dict[str, torch.Tensor]  # trainable parameters before training, [M, ...]

    @classmethod
    def from_models(cls, models: Sequence[nn.Module]) -> Ensemble:
        first = models[0]
        trainable = tuple(n for n, p in first.named_parameters() if p.requires_grad)
        params, buffers = stack_module_state(list(models))
        tensors = {**params, **buffers}
        shared = {n: t[0] for n, t in tensors.items() if n not in trainable and bool((t == t[0]).all())}
        stacked = {n: t.detach().clone() for n, t in tensors.items() if n not in shared}
        template = copy.deepcopy(first).to("meta")
        return cls(template, stacked, shared, trainable, {n: stacked[n].clone() for n in trainable})

    def __len__(self) -> int:
        return next(iter(self.stacked.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.stacked.values())).device

    def per_model_logits(self, x: torch.Tensor, stacked: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Model m's logits on its own inputs x[m]: [M, B, ...] -> [M, B, classes]."""

        def one(tensors: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
            return functional_call(self.template, {**self.shared, **tensors}, (inputs,))

        return vmap(one)(self.stacked if stacked is None else stacked, x)

    @torch.no_grad()
    def logits(self, examples: Examples) -> torch.Tensor:
        """Every model's logits on every example, on the CPU: [M, n, classes]; at most 512 examples a
        pass, fewer where M models' inputs would pass `INPUT_NUMBERS` (224² RGB images)."""
        per_pass = len(self) * math.prod(examples.take(torch.arange(1)).shape[1:])
        chunk = max(1, min(512, INPUT_NUMBERS // per_pass))
        outputs = []
        for start in range(0, len(examples), chunk):
            x = examples.take(torch.arange(start, min(start + chunk, len(examples)))).to(self.device)
            outputs.append(self.per_model_logits(x.expand(len(self), *x.shape)).cpu())
        return torch.cat(outputs, dim=1)

    def model(self, m: int) -> nn.Module:
        """Model m as an ordinary module (a copy), e.g. to merge its LoRA or save it."""
        module = copy.deepcopy(self.template).to_empty(device=self.device)
        state = {**self.shared, **{n: t[m] for n, t in self.stacked.items()}}
        module.load_state_dict(state, strict=True)
        return module


def batch_indices(mask: torch.Tensor, seed: int, steps: int, batch_size: int) -> torch.Tensor:
    """[steps, batch_size] indices of the examples in `mask`: seeded shuffles, epoch after epoch."""
    members = torch.nonzero(mask).flatten()
    if len(members) == 0:
        raise ValueError("a model's training subset is empty")
    generator = torch.Generator().manual_seed(seed)
    epochs = -(-steps * batch_size // len(members))
    order = torch.cat([members[torch.randperm(len(members), generator=generator)] for _ in range(epochs)])
    return order[: steps * batch_size].view(steps, batch_size)


def train(
    models: Sequence[nn.Module],
    examples: Examples,
    masks: torch.Tensor,
    seeds: Sequence[int],
    settings: FinetuneSettings,
) -> tuple[Ensemble, list[float | None]]:
    """Train model m on the examples in `masks[m]` with `seeds[m]`; return the trained ensemble and,
    per model, the ε that the accountant gives a `dpsgd` run (None for the other methods)."""
    if settings.method == "dpsgd":
        runs = [
            train_dpsgd(m, examples, mask, seed, settings) for m, mask, seed in zip(models, masks, seeds, strict=True)
        ]
        ensemble = Ensemble.from_models([model for model, _ in runs])
        ensemble.initial = Ensemble.from_models(list(models)).initial
        return ensemble, [epsilon for _, epsilon in runs]
    ensemble = Ensemble.from_models(models)
    train_ensemble(ensemble, examples, masks, seeds, settings)
    return ensemble, [None] * len(models)


def train_on_all(model: nn.Module, examples: Examples, settings: FinetuneSettings, seed: int) -> nn.Module:
    """One model (prepared by `adapt`) trained on every example: the pretrained backbone, reference runs."""
    everything = torch.ones(1, len(examples), dtype=torch.bool)
    return train([model], examples, everything, [seed], settings)[0].model(0)


def train_ensemble(
    ensemble: Ensemble,
    examples: Examples,
    masks: torch.Tensor,
    seeds: Sequence[int],
    settings: FinetuneSettings,
    snapshots: Sequence[int] = (),
) -> list[dict[str, torch.Tensor]]:
    """SGD on every model of `ensemble` at once, in place (see the module docstring). Returns copies of
    the trainable tensors after each step count in `snapshots` (0: before training), the checkpoints
    that attribution needs along the trajectory."""
    indices = torch.stack(
        [
            batch_indices(mask, seed, settings.steps, settings.batch_size)
            for mask, seed in zip(masks, seeds, strict=True)
        ]
    )
    transposed = {n for n in ensemble.trainable if ensemble.stacked[n].dim() == 3}  # [M, out, in] matrices
    params = {n: _contiguous(ensemble.stacked[n], n in transposed).requires_grad_(True) for n in ensemble.trainable}
    frozen = {n: t for n, t in ensemble.stacked.items() if n not in params}
    inputs = lora_inputs({n: t.shape for n, t in {**ensemble.shared, **ensemble.stacked}.items()})
    optimiser = torch.optim.SGD(
        param_groups(params, inputs, settings), momentum=settings.momentum, weight_decay=settings.weight_decay
    )

    def current() -> dict[str, torch.Tensor]:  # the trainable tensors now, in the ensemble's layout
        return {n: _contiguous(p.detach(), n in transposed) for n, p in params.items()}

    taken = {0: current()} if 0 in snapshots else {}
    for step in range(settings.steps):
        idx = indices[:, step]
        weights = {n: p.mT if n in transposed else p for n, p in params.items()}
        logits = ensemble.per_model_logits(examples.take(idx).to(ensemble.device), {**frozen, **weights})
        labels = examples.labels[idx].flatten().to(ensemble.device)
        losses = F.cross_entropy(logits.flatten(0, 1), labels, reduction="none")
        optimiser.zero_grad(set_to_none=True)
        losses.view(idx.shape).mean(dim=1).sum().backward()
        optimiser.step()
        if step + 1 in snapshots:
            taken[step + 1] = current()
    ensemble.stacked.update(current())
    return [taken[s] for s in snapshots]


def _contiguous(tensor: torch.Tensor, transpose: bool) -> torch.Tensor:
    """A contiguous copy of `tensor`, of its last two dimensions swapped if `transpose`.

    Stacked matrices train as [M, in, out]: vmap's batched matmul writes their gradients in that
    layout, so autograd accumulates them as they come instead of copying each into [M, out, in].
    """
    return (tensor.mT if transpose else tensor).clone(memory_format=torch.contiguous_format)


# opacus' own notices, not problems of this use: its RNG is seeded on purpose (reproducible runs, not
# production DP), its hooks fire on inputs that need no gradient, and huge ε sit at the smallest RDP order.
OPACUS_NOTICES = ("Secure RNG turned off", "Full backward hook is firing", "Optimal order is the smallest alpha")


def train_dpsgd(
    model: nn.Module, examples: Examples, mask: torch.Tensor, seed: int, settings: FinetuneSettings
) -> tuple[nn.Module, float]:
    """DP-SGD with opacus: Poisson-sampled batches (expected size n/⌈n/batch_size⌉), per-example
    clipping to `clip`, Gaussian noise σ·C, `steps` steps; returns the model and its (ε, δ)'s ε."""
    with warnings.catch_warnings():
        for notice in OPACUS_NOTICES:
            warnings.filterwarnings("ignore", message=notice)
        return _train_dpsgd(model, examples, mask, seed, settings)


def _train_dpsgd(
    model: nn.Module, examples: Examples, mask: torch.Tensor, seed: int, settings: FinetuneSettings
) -> tuple[nn.Module, float]:
    original, model = model, copy.deepcopy(model)
    members = torch.nonzero(mask).flatten()
    data_generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(members), batch_size=settings.batch_size, generator=data_generator)
    batch_size = len(members) / len(loader)  # opacus samples each example with probability 1/len(loader)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = param_groups(params, lora_inputs({n: p.shape for n, p in model.named_parameters()}), settings)
    for group in groups:  # opacus sums the clipped per-example gradients plus noise: / batch size makes a mean
        group["lr"] /= batch_size
    decay = settings.weight_decay * batch_size  # undoes the lr's division for the decay term
    optimiser = torch.optim.SGD(groups, momentum=settings.momentum, weight_decay=decay)
    engine = PrivacyEngine(accountant="rdp")
    private, optimiser, loader = engine.make_private(
        module=model,
        optimizer=optimiser,
        data_loader=loader,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.clip,
        poisson_sampling=True,
        loss_reduction="sum",
        noise_generator=torch.Generator().manual_seed(seed + 1),
    )
    step = 0
    while step < settings.steps:
        for (idx,) in loader:
            device = next(model.parameters()).device
            logits = private(examples.take(idx).to(device))
            loss = F.cross_entropy(logits, examples.labels[idx].to(device), reduction="sum")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            if step == settings.steps:
                break
    epsilon = float(engine.get_epsilon(settings.delta))
    trained = copy.deepcopy(original)  # the same module with the new weights, without opacus' hooks
    trained.load_state_dict(model.state_dict())
    return trained, epsilon
