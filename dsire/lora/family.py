"""A best guess at the base model a LoRA was trained on, from its layer names and shapes."""

from __future__ import annotations

from dsire.lora.model import LoRA

# Cross-attention width (in_features of attn2.to_k) of the UNets people fine-tune.
_UNET_BY_CROSS_DIM = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "Stable Diffusion XL"}


def guess_base_model(lora: LoRA) -> str:
    names = list(lora.layers)
    components = {name.split(".", 1)[0] for name in names}
    if "transformer" in components:
        single = any(".single_transformer_blocks." in n for n in names)
        return "Flux-like DiT (diffusers transformer)" if single else "diffusion transformer (diffusers)"
    if "unet" in components:
        cross = {lora.layers[n].shape[1] for n in names if n.endswith("attn2.to_k") or n.endswith("attn2.to_v")}
        if "text_encoder_2" in components or 2048 in cross:
            return _UNET_BY_CROSS_DIM[2048]
        if len(cross) == 1:
            dim = cross.pop()
            return _UNET_BY_CROSS_DIM.get(dim, f"UNet2DConditionModel (cross-attention dim {dim})")
        return "UNet2DConditionModel"
    if components & {"text_encoder", "text_encoder_2"}:
        return "CLIP text encoder (Stable Diffusion)"
    if any(".self_attn.q_proj" in n or ".attention." in n for n in names):
        return "transformers language model"
    return "unknown"
