"""dsire: what data went into this fine-tuned model? Answers from LoRA weights alone."""

from dsire import project  # noqa: F401  (registers ${dsire_root:} for the configs)
from dsire.lora import LoRA, LoRAError, LoRALayer, load_lora, read_lorawise
from dsire.spectra import Spectra, lora_spectra, lowrank_spectra

__all__ = ["LoRA", "LoRAError", "LoRALayer", "Spectra", "load_lora", "lora_spectra", "lowrank_spectra", "read_lorawise"]
