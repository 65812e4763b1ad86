"""LoRA privacy audits: implicit noise of LoRA training, membership-inference attacks and their metrics."""
