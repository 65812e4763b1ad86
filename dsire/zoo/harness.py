"""The DreamBooth-LoRA objective as a LightningModule: noise-prediction MSE under a DDPM schedule.

The same module pretrains the tiny base (all weights trainable, class-conditioned) and fine-tunes
LoRA adapters (only LoRA weights trainable, concept-conditioned). Randomness (timesteps, noise)
comes from a generator seeded by the caller, so a run is reproducible.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from dsire.zoo.base import BaseModel


class NoisePrediction(pl.LightningModule):
    """Predict the noise added to (encoded) images, conditioned on prompt embeddings.

    UNet, text encoder and VAE are submodules, so Lightning moves all of them to the device; only
    parameters left trainable (LoRA weights, or everything when pretraining) reach the optimiser.
    All of it is in train mode, as Lightning expects: the frozen text encoder and VAE have no dropout
    or batch norm, so their mode does not change what they compute.
    """

    def __init__(self, base: BaseModel, lr: float, seed: int, train_text_encoder: bool = False):
        super().__init__()
        self.unet, self.text_encoder, self.vae = base.unet, base.text_encoder, base.vae
        self.train_text_encoder = train_text_encoder
        self.text_encoder.requires_grad_(train_text_encoder)
        self.scheduler = base.scheduler
        self.lr = lr
        self.generator = torch.Generator().manual_seed(seed)  # on CPU: the same draws on any device
        self.train()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, token_ids = batch
        latents = self.encode_images(images)
        with torch.set_grad_enabled(self.train_text_encoder):
            context = self.text_encoder(token_ids)[0]
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=self.generator).to(latents.device)
        noise = torch.randn(latents.shape, generator=self.generator).to(latents.device, latents.dtype)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction, noise)
        self.log("loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels for a pixel-space UNet (tiny), scaled VAE latents otherwise (SD 1.5)."""
        if self.vae is None:
            return images
        latents = self.vae.encode(images).latent_dist.sample(generator=self.generator)
        return latents * self.vae.config.scaling_factor

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)


def fit(
    module: NoisePrediction,
    images: torch.Tensor,
    token_ids: torch.Tensor,
    steps: int,
    batch_size: int,
    seed: int,
    callbacks: list | None = None,
    progress: bool = False,
) -> None:
    """Train `module` for `steps` batches of (image i, prompt `token_ids[i]`) drawn with replacement from
    `seed`: the one training loop of the zoo, for the base's pretraining and for every fine-tune."""
    dataset = TensorDataset(images, token_ids)
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=steps * batch_size, generator=generator)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    _quiet_trainer(steps, callbacks, progress).fit(module, loader)


def _quiet_trainer(max_steps: int, callbacks: list | None = None, progress: bool = False) -> pl.Trainer:
    """A trainer without checkpoints, loggers or summaries (it runs inside sweep workers), on the GPU if any."""
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks or [],
    )
