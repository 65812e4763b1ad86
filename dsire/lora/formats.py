"""The published LoRA key layouts, and how each maps to canonical layers.

Formats (names users pass as `format=`):
- `peft`: `save_pretrained` output, `base_model.model.<path>.lora_A/lora_B.weight` + adapter_config.json;
- `diffusers`: pipeline files with `unet.`/`text_encoder.` prefixes and `lora_A/lora_B`, alpha in the
  `lora_adapter_metadata` safetensors header entry;
- `diffusers_old`: `<path>.lora.down/up.weight`, `<attn>.processor.to_q_lora.down.weight`,
  text-encoder `lora_linear_layer.down/up` (also the LoRA-WiSE parquet columns);
- `kohya`: `lora_unet_*/lora_te*_*` with `.lora_down/.lora_up.weight` and scalar `.alpha`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsire.lora.model import LoRA, LoRAError, LoRALayer, lora_scale
from dsire.lora.names import COMPONENTS, canonical_path, kohya_to_canonical, natural_key

FORMATS = ("peft", "diffusers", "diffusers_old", "kohya", "lorawise")

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_OLD_PROCESSOR_KEY = re.compile(
    r"^(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
_OLD_KEY = re.compile(r"^(?P<module>.+)\.lora(?:_linear_layer)?\.(?P<role>down|up)\.weight$")
_KOHYA_KEY = re.compile(r"^(?P<module>lora_[^.]+)\.(?:lora_(?P<role>down|up)\.weight|(?P<alpha>alpha))$")
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")

_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA adapters (lora_magnitude_vector) are not plain LoRAs",
    "dora_scale": "DoRA adapters (dora_scale) are not plain LoRAs",
    "hada_w1": "LyCORIS LoHa adapters are not plain LoRAs",
    "lokr_w1": "LyCORIS LoKr adapters are not plain LoRAs",
    "lora_embedding_A": "LoRA on embedding layers is not supported",
}
_OLD_PROJ_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_OLD_PROJ_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


@dataclass
class AdapterConfig:
    """The part of a PEFT LoraConfig that sets ranks and scales (PEFT's own pattern semantics)."""

    r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping, source: str | Path) -> AdapterConfig:
        if d.get("use_dora"):
            raise LoRAError(source, "DoRA adapters (use_dora) are not plain LoRAs")
        peft_type = d.get("peft_type")
        if peft_type not in (None, "LORA"):
            raise LoRAError(source, f"PEFT adapter of type {peft_type}, not LORA")
        return cls(
            r=d.get("r"),
            lora_alpha=d.get("lora_alpha"),
            use_rslora=bool(d.get("use_rslora", False)),
            rank_pattern=dict(d.get("rank_pattern") or {}),
            alpha_pattern=dict(d.get("alpha_pattern") or {}),
        )

    @staticmethod
    def _match(patterns: Mapping[str, float], path: str) -> float | None:
        # Same rule as peft.utils.other.get_pattern_key: the pattern must match a dotted suffix.
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", path):
                return value
        return None

    def rank_for(self, path: str) -> int | None:
        rank = self._match(self.rank_pattern, path)
        return int(rank) if rank is not None else self.r

    def alpha_for(self, path: str) -> float | None:
        alpha = self._match(self.alpha_pattern, path)
        return float(alpha) if alpha is not None else self.lora_alpha


@dataclass
class _Parts:
    """What the keys of one module said, before checking."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: torch.Tensor | None = None


def detect_format(keys: list[str], has_adapter_config: bool, source: str | Path) -> str:
    """Guess the key layout from the key names alone."""
    for marker, problem in _UNSUPPORTED.items():
        if any(marker in k for k in keys):
            raise LoRAError(source, problem)
    if any(_KOHYA_KEY.match(k) for k in keys):
        return "kohya"
    if any(_PEFT_KEY.match(k) for k in keys):
        if has_adapter_config or any(k.startswith("base_model.model.") for k in keys):
            return "peft"
        return "diffusers"
    if any(_OLD_PROCESSOR_KEY.match(k) or _OLD_KEY.match(k) for k in keys):
        return "diffusers_old"
    raise LoRAError(source, f"no LoRA weights found among {len(keys)} tensors (a full model, or another adapter type?)")


def _canonical_peft(key: str) -> tuple[str, str] | None:
    m = _PEFT_KEY.match(key)
    if m is None:
        return None
    module = m["module"].replace("base_model.model.", "")  # PeftModel's wrapper, also found after a component
    return canonical_path(module), "down" if m["ab"] == "A" else "up"


def _canonical_old(key: str) -> tuple[str, str] | None:
    if m := _OLD_PROCESSOR_KEY.match(key):
        module = m["module"]
        names = _OLD_PROJ_TEXT if module.endswith("self_attn") else _OLD_PROJ_UNET
        return canonical_path(f"{module}.{names[m['proj']]}"), m["role"]
    if m := _OLD_KEY.match(key):
        return canonical_path(m["module"]), m["role"]
    if m := _ALPHA_KEY.match(key):
        return canonical_path(m["module"]), "alpha"
    return None


def _canonical_kohya(key: str) -> tuple[str, str] | None:
    m = _KOHYA_KEY.match(key)
    if m is None:
        return None
    name = kohya_to_canonical(m["module"])
    if name is None:
        return None
    return name, "alpha" if m["alpha"] else m["role"]


def _canonical_diffusers(key: str) -> tuple[str, str] | None:
    """diffusers' `convert_state_dict_to_diffusers` writes `.lora.down/up` for linear layers but keeps
    `lora_A/B` for convolutions: one file, both spellings."""
    return _canonical_peft(key) or _canonical_old(key)


_KEY_PARSERS = {
    "peft": _canonical_peft,
    "diffusers": _canonical_diffusers,
    "diffusers_old": _canonical_old,
    "lorawise": _canonical_old,
    "kohya": _canonical_kohya,
}


def _as_matrix(t: torch.Tensor, role: str, name: str, source: str | Path) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Flatten conv LoRA factors to matrices; return (matrix, conv kernel or ())."""
    if t.dim() == 2:
        return t, ()
    if t.dim() == 4:
        if role == "down":
            return t.reshape(t.shape[0], -1), tuple(t.shape[2:])
        if t.shape[2:] == (1, 1):
            return t.reshape(t.shape[0], t.shape[1]), ()
        raise LoRAError(source, f"layer {name}: conv up with kernel {tuple(t.shape[2:])}, expected 1x1")
    raise LoRAError(source, f"layer {name}: {role} has shape {tuple(t.shape)}, expected a matrix or a conv kernel")


def _check_tensor(t: torch.Tensor, role: str, name: str, source: str | Path) -> None:
    if not t.dtype.is_floating_point:
        raise LoRAError(source, f"layer {name}: {role} has dtype {t.dtype}, expected floating point")
    if t.numel() == 0:
        raise LoRAError(source, f"layer {name}: {role} is empty (shape {tuple(t.shape)})")
    # one pass in the stored dtype: a NaN makes both extremes NaN, an Inf is one of them (isfinite(t)
    # would allocate a mask and, for float16, run several times slower)
    low, high = torch.aminmax(t)
    if not (math.isfinite(low.item()) and math.isfinite(high.item())):
        raise LoRAError(source, f"layer {name}: {role} contains NaN or Inf")


def _build_layer(name: str, parts: _Parts, alpha: float | None, rslora: bool, source: str | Path) -> LoRALayer:
    if parts.down is None and parts.up is None:
        raise LoRAError(source, f"layer {name}: has an alpha without its down and up")
    if parts.down is None or parts.up is None:
        missing = "up" if parts.up is None else "down"
        raise LoRAError(source, f"layer {name}: has a {'down' if missing == 'up' else 'up'} without its {missing}")
    for role, t in (("down", parts.down), ("up", parts.up)):
        _check_tensor(t, role, name, source)
    down, kernel = _as_matrix(parts.down, "down", name, source)
    up, _ = _as_matrix(parts.up, "up", name, source)
    if down.shape[0] != up.shape[1]:
        raise LoRAError(
            source, f"layer {name}: rank mismatch, down {tuple(parts.down.shape)} vs up {tuple(parts.up.shape)}"
        )
    rank = down.shape[0]
    alpha_given = alpha is not None
    alpha = float(alpha) if alpha is not None else float(rank)
    return LoRALayer(
        down=down, up=up, alpha=alpha, scale=lora_scale(alpha, rank, rslora), alpha_given=alpha_given, kernel=kernel
    )


def _alpha_from_tensor(t: torch.Tensor, name: str, source: str | Path) -> float | None:
    if t.numel() != 1:
        raise LoRAError(source, f"layer {name}: alpha has shape {tuple(t.shape)}, expected a scalar")
    value = float(t.item())
    if not (value == value and abs(value) != float("inf")):
        raise LoRAError(source, f"layer {name}: alpha is {value}")
    return value if value != 0 else None  # kohya treats alpha 0 as "unset", i.e. alpha = rank


def _component(name: str) -> str | None:
    first = name.split(".", 1)[0]
    return first if first in COMPONENTS else None


def build_lora(
    tensors: Mapping[str, torch.Tensor],
    fmt: str,
    source: str | Path,
    *,
    configs: Mapping[str | None, AdapterConfig] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> LoRA:
    """Group a raw state dict into checked canonical layers.

    `configs` maps a component (or None for all) to its AdapterConfig, for peft/diffusers files.
    """
    if fmt not in _KEY_PARSERS:
        raise LoRAError(source, f"unknown format {fmt!r}; one of {FORMATS}")
    parse = _KEY_PARSERS[fmt]
    grouped: dict[str, _Parts] = {}
    ignored: list[str] = []
    for key, tensor in tensors.items():
        parsed = parse(key)
        if parsed is None:
            ignored.append(key)
            continue
        name, role = parsed
        parts = grouped.setdefault(name, _Parts())
        if getattr(parts, role) is not None:
            raise LoRAError(source, f"layer {name}: two tensors give its {role} (one is {key!r})")
        setattr(parts, role, tensor)
    if not grouped or all(p.down is None and p.up is None for p in grouped.values()):
        raise LoRAError(source, f"no LoRA weights found for format {fmt!r} among {len(tensors)} tensors")
    other_layout = [key for key in ignored if any(other(key) for other in _KEY_PARSERS.values())]
    if other_layout:  # never drop layers silently
        raise LoRAError(
            source,
            f"{len(other_layout)} tensors are LoRA weights in another layout than {fmt!r} "
            f"(e.g. {other_layout[0]!r}); a file mixing layouts is refused rather than read in part",
        )

    configs = configs or {}
    layers: dict[str, LoRALayer] = {}
    for name in sorted(grouped, key=natural_key):
        parts = grouped[name]
        config = configs.get(_component(name)) or configs.get(None)
        if parts.alpha is not None:
            alpha, rslora = _alpha_from_tensor(parts.alpha, name, source), False
        elif config is not None:
            alpha, rslora = config.alpha_for(name), config.use_rslora
        else:
            alpha, rslora = None, False
        layer = _build_layer(name, parts, alpha, rslora, source)
        if config is not None and config.rank_for(name) not in (None, layer.rank):
            raise LoRAError(
                source, f"layer {name}: rank {layer.rank} in the weights, {config.rank_for(name)} in the config"
            )
        layers[name] = layer

    notes = []
    assumed = [n for n, layer in layers.items() if not layer.alpha_given]
    if assumed:
        notes.append(f"no alpha for {len(assumed)} of {len(layers)} layers: alpha = rank assumed (scale 1)")
    if ignored:
        notes.append(f"ignored {len(ignored)} non-LoRA tensors, e.g. {ignored[0]!r}")
    return LoRA(source=str(source), format=fmt, layers=layers, metadata=dict(metadata or {}), notes=notes)
