"""Writing a PEFT LoRA state dict in the layouts users publish (for zoos and tests).

Key conversions use diffusers' own converters; what they get wrong for our purpose is fixed here:
`convert_state_dict_to_kohya` writes alpha = rank, so the true alpha is written back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from safetensors.torch import save_file

from dsire.atomic import atomic_path, atomic_write_text
from dsire.lora.formats import AdapterConfig
from dsire.lora.load import DIFFUSERS_METADATA_KEY, PEFT_CONFIG
from dsire.lora.names import kohya_to_canonical

SAVE_FORMATS = ("peft", "diffusers", "kohya")
PEFT_WEIGHTS = "adapter_model.safetensors"


def save_lora(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    format: str,
    lora_config: Mapping,
    *,
    component: str = "unet",
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Save `state` (keys as `get_peft_model_state_dict` gives them) atomically; return the weights file.

    `lora_config` is `LoraConfig.to_dict()`. `path` is a directory for "peft", a .safetensors file
    otherwise. `metadata` strings go into the safetensors header.
    """
    tensors = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in state.items()}
    header = {"format": "pt", **(metadata or {})}
    config = json.loads(json.dumps(dict(lora_config), default=list))  # sets -> lists
    if format == "peft":
        directory = Path(path)
        weights = directory / PEFT_WEIGHTS
        _save(tensors={f"base_model.model.{k}": v for k, v in tensors.items()}, path=weights, header=header)
        atomic_write_text(directory / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True))
        return weights
    prefixed = {f"{component}.{k}": v for k, v in tensors.items()}
    if format == "diffusers":
        header[DIFFUSERS_METADATA_KEY] = json.dumps({f"{component}.{k}": v for k, v in config.items()}, sort_keys=True)
        return _save(prefixed, Path(path), header)
    if format == "kohya":
        return _save(
            _to_kohya(prefixed, config),
            Path(path),
            {"ss_network_dim": str(config["r"]), "ss_network_alpha": str(config.get("lora_alpha")), **header},
        )
    raise ValueError(f"unknown save format {format!r}; one of {SAVE_FORMATS}")


def _to_kohya(prefixed: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers' kohya conversion, with each layer's true alpha instead of its rank."""
    if config.get("use_rslora"):
        raise ValueError("kohya files cannot express rsLoRA scaling (alpha/sqrt(r)); save as peft or diffusers")
    adapter = AdapterConfig.from_dict(config, "lora_config")
    kohya = convert_state_dict_to_kohya(prefixed)
    for key in kohya:
        if key.endswith(".alpha"):
            alpha = adapter.alpha_for(kohya_to_canonical(key.removesuffix(".alpha")))
            kohya[key] = torch.tensor(float(alpha if alpha is not None else kohya[key]), dtype=torch.float32)
    return kohya


def _save(tensors: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> Path:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path
