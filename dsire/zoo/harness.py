"""The DreamBooth-LoRA objective as a LightningModule: noise-prediction MSE under a DDPM schedule.

The same module pretrains the tiny base (all weights trainable, class-conditioned) and fine-tunes
LoRA adapters (only LoRA weights trainable, concept-conditioned). Randomness (timesteps, noise)
comes from a generator seeded by the caller, so a run is reproducible.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from dsire.zoo.base import BaseModel


class NoisePrediction(pl.LightningModule):
    """Predict the noise added to (encoded) images, conditioned on prompt embeddings."""

    def __init__(self, base: BaseModel, lr: float, seed: int, train_text_encoder: bool = False):
        super().__init__()
        self.base = base
        self.unet = base.unet
        self.text_encoder = base.text_encoder if train_text_encoder else None
        self.lr = lr
        self.generator = torch.Generator().manual_seed(seed)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, token_ids = batch
        latents = self.base.encode_images(images)
        if self.text_encoder is not None:
            context = self.text_encoder(token_ids)[0]
        else:
            context = self.base.encode_prompt(token_ids)
        steps = self.base.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=self.generator)
        noise = torch.randn(latents.shape, generator=self.generator)
        noisy = self.base.scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = F.mse_loss(prediction, noise)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)


def quiet_trainer(max_steps: int, callbacks: list | None = None, progress: bool = False) -> pl.Trainer:
    """A CPU trainer without checkpoints, loggers or summaries: runs inside sweep workers."""
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
