"""Attribution for a diffusion LoRA of the zoo's tiny recipe: which training images made the fine-tune
denoise a query image as it does ("which training images made this generation").

The fine-tune is the zoo's (the bundled tiny base, its LoRA on the attention projections, its
noise-prediction loss and training loop) but with momentum SGD, the optimiser Source models (the zoo
trains with AdamW, which would need the optimiser-preconditioned variant). A query's measurement is its
denoising loss at fixed timesteps and noise (`draws` pairs), a deterministic function of the LoRA
weights; a training image's gradient is its loss gradient averaged over its own fixed draws, standing
for the expectation over timesteps and noise. Per-example gradients of the LoRA layers come from one
batched backward pass (a linear layer's per-example gradient is Σ over tokens of ∂loss/∂output ⊗ input),
the curvature from kronfluence with the Gaussian true Fisher of the per-pixel mean squared error. LDS
measures the negative query loss, so that, as for margins, a positive score is a helpful image.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from kronfluence.task import Task
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from dsire.atomic import atomic_path
from dsire.attribution.curvature import Factors, task_factors
from dsire.attribution.scores import Gradients, Trained
from dsire.attribution.trajectory import Trajectory, checkpoint_plan
from dsire.errors import UserError
from dsire.hashing import tensors_sha256
from dsire.lab.data import Examples
from dsire.lora.files import read_safetensors
from dsire.lora.model import LoRAError
from dsire.settings import require
from dsire.zoo.base import BaseModel
from dsire.zoo.data import digit_images
from dsire.zoo.finetune import SnapshotCallback, add_lora
from dsire.zoo.harness import NoisePrediction, fit
from dsire.zoo.pretrain import prompt


@dataclass(frozen=True)
class DiffusionSettings:
    """`diffusion.*`: the attributed LoRA fine-tune and its training images (the queries: `attribution.queries`)."""

    images: int = 48  # training digits (a seeded draw of sklearn's digits, each prompted with its class)
    draws: int = 4  # fixed (timestep, noise) pairs per image, for the measurement and the gradients
    steps: int = 200
    batch_size: int = 4
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    data_seed: int = 0  # which digits, and the fixed draws

    def __post_init__(self) -> None:
        require(self.images >= 2, "images", f"{self.images}: attribution needs at least 2 training images")
        require(self.draws >= 1, "draws", f"{self.draws} must be at least 1")
        require(self.steps >= 1 and self.batch_size >= 1, "steps", "steps and batch_size must be at least 1")
        require(self.lr > 0 and 0 <= self.momentum < 1, "lr", "lr must be positive and momentum in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", f"{self.weight_decay} must be ≥ 0")


@dataclass
class Denoising:
    """Images with their prompts (token ids and the frozen text encoder's context) and fixed draws."""

    examples: Examples  # ids, digit classes and the images, for figures and the written files
    images: torch.Tensor  # [n, 1, 8, 8] in [-1, 1]
    token_ids: torch.Tensor  # [n, 4]
    context: torch.Tensor  # [n, 4, width]
    timesteps: torch.Tensor  # [n, draws]
    noise: torch.Tensor  # [n, draws, 1, 8, 8]

    def __len__(self) -> int:
        return len(self.images)


def denoising_data(base: BaseModel, settings: DiffusionSettings, queries: int) -> tuple[Denoising, Denoising]:
    """Training images and `queries` query images: disjoint seeded draws of sklearn's digits, each
    prompted with its class after the zoo's identifier token, with their own seeded fixed draws."""
    images, classes = digit_images()
    total = settings.images + queries
    if total > len(images):
        raise UserError("diffusion.images", f"{settings.images} images and {queries} queries exceed the digits")
    order = np.random.default_rng(settings.data_seed).permutation(len(images))
    generator = torch.Generator().manual_seed(settings.data_seed)
    parts = (order[: settings.images], order[settings.images : total])
    return tuple(_denoising(base, images, classes, np.sort(p), settings.draws, generator) for p in parts)


def _denoising(
    base: BaseModel, images: torch.Tensor, classes: np.ndarray, chosen: np.ndarray, draws: int, generator
) -> Denoising:
    pixels = images[chosen]
    token_ids = torch.cat([prompt(int(c), identifier=True) for c in classes[chosen]])
    with torch.no_grad():
        context = base.text_encoder(token_ids)[0]
    steps = base.scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (len(chosen), draws), generator=generator)
    noise = torch.randn(len(chosen), draws, *pixels.shape[1:], generator=generator)
    examples = Examples(torch.as_tensor(classes[chosen]), [f"digits/{i}" for i in chosen], lambda idx: pixels[idx])
    return Denoising(examples, pixels, token_ids, context, timesteps, noise)


def _flat_batch(data: Denoising, scheduler) -> tuple[torch.Tensor, ...]:
    """(noisy images, timesteps, context, noise), one row per (image, draw)."""
    draws = data.timesteps.shape[1]
    noise = data.noise.flatten(0, 1)
    timesteps = data.timesteps.flatten()
    noisy = scheduler.add_noise(data.images.repeat_interleave(draws, 0), noise, timesteps)
    return noisy, timesteps, data.context.repeat_interleave(draws, 0), noise


def denoising_losses(unet: nn.Module, scheduler, data: Denoising) -> torch.Tensor:
    """[images]: each image's noise-prediction MSE averaged over its fixed draws (the zoo's loss)."""
    noisy, timesteps, context, noise = _flat_batch(data, scheduler)
    prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
    return (prediction - noise).pow(2).flatten(1).mean(1).view(len(data), -1).mean(1)


def denoising_gradients(unet: nn.Module, scheduler, data: Denoising, modules: list[str]) -> Gradients:
    """Each image's gradient of `denoising_losses` for the bias-free linear `modules` {m: [n, out, in]}:
    one backward pass, each layer's output gradient and input kept per example and contracted over
    tokens (examples do not interact in the UNet: its normalisations are per image)."""
    inputs, outputs = {}, {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[name], outputs[name] = args[0], output

        return hook

    handles = [unet.get_submodule(m).register_forward_hook(keep(m)) for m in modules]
    try:
        losses = denoising_losses(unet, scheduler, data)
        grads = torch.autograd.grad(losses.sum(), [outputs[m] for m in modules])
    finally:
        for handle in handles:
            handle.remove()
    draws = data.timesteps.shape[1]
    out = {}
    for m, g in zip(modules, grads, strict=True):
        rows = torch.einsum("b...o,b...i->boi", g.double(), inputs[m].detach().double())
        out[m] = rows.view(len(data), draws, *rows.shape[1:]).sum(1)
    return out


class _DenoisingTask(Task):
    """kronfluence's view of the LoRA: the summed per-image MSE; for the true Fisher the targets are
    drawn around the prediction with per-pixel variance P/2 (P pixels), whose Fisher is the
    Gauss–Newton matrix of the per-pixel mean squared error."""

    def __init__(self, modules: list[str]):
        self.modules = modules

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        noisy, timesteps, context, noise = batch
        prediction = model(noisy, timesteps, encoder_hidden_states=context).sample
        target = noise
        if sample:
            with torch.no_grad():
                target = prediction + math.sqrt(prediction[0].numel() / 2) * torch.randn_like(prediction)
        return (prediction - target).pow(2).flatten(1).mean(1).sum()

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self) -> list[str]:
        return self.modules


@dataclass
class DiffusionLoRA(Trained):
    """The attribution `Problem` of a LoRA-tuned UNet (`template`: the UNet with a fresh adapter): a
    query's measurement is its denoising loss."""

    train: Denoising
    queries: Denoising
    scheduler: object

    def check(self, final: nn.Module) -> None:
        with torch.no_grad():
            losses = denoising_losses(final, self.scheduler, self.queries)
        if not torch.isfinite(losses).all():
            raise UserError("diffusion.lr", "the fine-tuned UNet's denoising loss is NaN or infinite: lower the lr")

    def train_gradients(self, model: nn.Module, modules: list[str]) -> Gradients:
        return denoising_gradients(model, self.scheduler, self.train, modules)

    def query_gradients(self, model: nn.Module, modules: list[str]) -> Gradients:
        return denoising_gradients(model, self.scheduler, self.queries, modules)

    def factors(self, models: list[nn.Module], modules: list[str], seed: int) -> tuple[Factors, list[str]]:
        data = TensorDataset(*(t.detach() for t in _flat_batch(self.train, self.scheduler)))
        return task_factors(models, _DenoisingTask(modules), data, modules, seed)


class _SGDNoisePrediction(NoisePrediction):
    """The zoo's noise-prediction objective under momentum SGD."""

    def __init__(self, base: BaseModel, settings: DiffusionSettings, seed: int):
        super().__init__(base, lr=settings.lr, seed=seed)
        self.settings = settings

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        s = self.settings
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def lora_unet(base: BaseModel, lora: DictConfig, seed: int) -> nn.Module:
    """A copy of the base UNet with a fresh adapter (the zoo's, its A drawn from `seed`), only it trainable."""
    unet = copy.deepcopy(base.unet).requires_grad_(False)
    add_lora(unet, lora, seed)
    return unet


def _trainable(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def train_lora(
    base: BaseModel, unet: nn.Module, data: Denoising, settings: DiffusionSettings, seed: int, snapshots: list[int]
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Fine-tune `unet`'s adapter on `data` with the zoo's loop (`seed`: batches, timesteps, noise);
    its final trainable tensors and those after each step in `snapshots`."""
    taken = []
    module = _SGDNoisePrediction(BaseModel(unet, base.text_encoder, base.scheduler, base.fingerprint), settings, seed)
    callback = SnapshotCallback(snapshots, lambda step, state: taken.append(_trainable(unet)))
    fit(module, data.images, data.token_ids, settings.steps, settings.batch_size, seed, callbacks=[callback])
    return _trainable(unet), taken


def diffusion_trajectory(
    base: BaseModel, lora: DictConfig, train: Denoising, settings: DiffusionSettings, seed: int, segments: int, per: int
) -> Trajectory:
    """The attributed fine-tune with its checkpoints (Source's record, as for the lab's classifiers)."""
    boundaries, steps = checkpoint_plan(settings.steps, segments, per)
    flat = [s for segment in steps for s in segment]
    if min(flat) < 1:
        raise UserError("attribution.segments", f"{segments} segments are too many for {settings.steps} steps")
    final, taken = train_lora(base, lora_unet(base, lora, seed), train, settings, seed, flat)
    checkpoints, i = [], 0
    for segment in steps:
        checkpoints.append(taken[i : i + len(segment)])
        i += len(segment)
    record = dataclasses.asdict(settings)
    return Trajectory(boundaries, steps, checkpoints, final, record, seed, base.fingerprint, _images_hash(train))


def check_trajectory(trajectory: Trajectory, base: BaseModel, train: Denoising, settings: DiffusionSettings) -> None:
    """A trajectory of another base, other images or other settings gives meaningless scores: refused."""
    where = "attribution.trajectory"
    if trajectory.recipe != base.fingerprint:
        raise UserError(where, f"fine-tuned from base {trajectory.recipe}, this recipe's base is {base.fingerprint}")
    if trajectory.data != _images_hash(train):
        raise UserError(where, f"trained on other images than this config's {len(train)}")
    if trajectory.settings != dataclasses.asdict(settings):
        raise UserError(where, f"trained with diffusion settings {trajectory.settings}, not this config's")


def _images_hash(data: Denoising) -> str:
    return tensors_sha256({"images": data.images, "token_ids": data.token_ids})[:16]


def denoising_outputs(
    base: BaseModel,
    lora: DictConfig,
    train: Denoising,
    queries: Denoising,
    settings: DiffusionSettings,
    masks: np.ndarray,
    seeds: int,
    directory: Path,
    advance: Callable[[int], None] = lambda n: None,
) -> torch.Tensor:
    """[subsets, seeds, queries]: the negative query losses of LoRAs fine-tuned on each subset with each
    of `seeds` seeds, one file per model in `directory` (read back, not retrained, on a rerun)."""
    out = torch.empty(len(masks), seeds, len(queries))
    for s, mask in enumerate(masks):
        for r in range(seeds):
            path = directory / f"model_{s:05d}_{r:03d}.safetensors"
            values = _read_outputs(path, len(queries))
            if values is None:
                seed = 1000 + s * seeds + r
                unet = lora_unet(base, lora, seed)
                subset = _subset(train, np.flatnonzero(mask))
                train_lora(base, unet, subset, settings, seed, [])
                with torch.no_grad():
                    values = -denoising_losses(unet, base.scheduler, queries).float()
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    save_file({"outputs": values.contiguous()}, str(tmp))
            out[s, r] = values
            advance(1)
    return out


def _subset(data: Denoising, chosen: np.ndarray) -> Denoising:
    idx = torch.as_tensor(chosen)
    examples = data.examples.subset(chosen)
    return Denoising(
        examples, *(t[idx] for t in (data.images, data.token_ids, data.context, data.timesteps, data.noise))
    )


def _read_outputs(path: Path, queries: int) -> torch.Tensor | None:
    try:
        tensors, _ = read_safetensors(path)
    except (LoRAError, OSError):
        return None
    values = tensors.get("outputs")
    return values.clone() if values is not None and tuple(values.shape) == (queries,) else None
