"""Reading LoRA checkpoints of every published format into one canonical model."""

from dsire.lora.files import DEFAULT_LIMITS, Limits
from dsire.lora.formats import FORMATS, detect_format
from dsire.lora.load import load_lora
from dsire.lora.lorawise import SUBSETS, read_lorawise, subset_rank
from dsire.lora.model import LoRA, LoRAError, LoRALayer

__all__ = [
    "DEFAULT_LIMITS",
    "FORMATS",
    "SUBSETS",
    "Limits",
    "LoRA",
    "LoRAError",
    "LoRALayer",
    "detect_format",
    "load_lora",
    "read_lorawise",
    "subset_rank",
]
