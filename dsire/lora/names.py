"""Canonical layer names: the base model's module path with dots, prefixed by its component.

kohya/A1111 files flatten module paths with underscores (`lora_unet_down_blocks_0_..._to_out_0`),
and SDXL files trained on the original (SGM/LDM) UNet use its block names (`input_blocks_4_1_...`).
Both are mapped back to diffusers module paths here, so the same fine-tune has the same names in
every format.
"""

from __future__ import annotations

import functools
import re

# Module-name pieces that themselves contain underscores, in diffusers UNets/transformers, CLIP text
# encoders and the SGM UNet. Underscores inside these are kept; every other underscore was a dot.
COMPOUND_TOKENS = frozenset(
    {
        # diffusers UNet / DiT
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "single_transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "proj_in",
        "proj_out",
        "proj_mlp",
        "time_emb_proj",
        "conv_shortcut",
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "norm_out",
        "time_embedding",
        "add_embedding",
        "linear_1",
        "linear_2",
        "time_text_embed",
        "timestep_embedder",
        "guidance_embedder",
        "text_embedder",
        "context_embedder",
        "x_embedder",
        "norm_added_q",
        "norm_added_k",
        "ff_context",
        # CLIP / T5 text encoders
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "layer_norm1",
        "layer_norm2",
        "final_layer_norm",
        "text_projection",
        "token_embedding",
        "position_embedding",
        # SGM / LDM UNet (SDXL kohya files)
        "input_blocks",
        "middle_block",
        "output_blocks",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "time_embed",
        "label_emb",
    }
)
_MAX_COMPOUND_PARTS = max(token.count("_") + 1 for token in COMPOUND_TOKENS)

# kohya prefix -> pipeline component
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",
    "lora_transformer_": "transformer",
}
COMPONENTS = ("unet", "text_encoder_2", "text_encoder", "transformer", "prior", "decoder")

# SD 1.x, 2.x and SDXL UNets all have two resnets per block, which fixes the SGM block arithmetic.
SGM_LAYERS_PER_BLOCK = 2
_SGM_RESNET_RENAMES = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_SGM_TOP_LEVEL = {
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}


def underscores_to_dots(name: str) -> str:
    """`down_blocks_0_attentions_0_proj_in` -> `down_blocks.0.attentions.0.proj_in`."""
    parts = name.split("_")
    tokens: list[str] = []
    i = 0
    while i < len(parts):
        for width in range(min(_MAX_COMPOUND_PARTS, len(parts) - i), 0, -1):
            candidate = "_".join(parts[i : i + width])
            if width == 1 or candidate in COMPOUND_TOKENS:
                tokens.append(candidate)
                i += width
                break
    return ".".join(tokens)


def sgm_to_diffusers(path: str) -> str:
    """Map an SGM/LDM UNet module path (`input_blocks.4.1...`) to the diffusers UNet path."""
    for old, new in _SGM_TOP_LEVEL.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    match = re.match(r"(?:(input_blocks|output_blocks)\.(\d+)|middle_block)\.(\d+)(?:\.(.*))?$", path)
    if match is None:
        return path
    kind, outer, inner, rest = match.group(1), match.group(2), int(match.group(3)), match.group(4) or ""
    for old, new in _SGM_RESNET_RENAMES.items():
        if rest == old or rest.startswith(old + "."):
            rest = new + rest[len(old) :]
    per_block = SGM_LAYERS_PER_BLOCK + 1
    if kind is None:  # middle_block.{0,1,2}: resnet, attention, resnet
        head = ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")[inner]
    elif kind == "input_blocks":
        block, layer = (int(outer) - 1) // per_block, (int(outer) - 1) % per_block
        if rest.startswith("op"):  # the downsampling conv closes the block
            head, rest = f"down_blocks.{block}.downsamplers.0", "conv" + rest[2:]
        else:
            head = f"down_blocks.{block}.{('resnets', 'attentions')[inner]}.{layer}"
    else:
        block, layer = int(outer) // per_block, int(outer) % per_block
        if inner > 0 and rest.startswith("conv"):  # the upsampling conv follows the resnet (and attention)
            head = f"up_blocks.{block}.upsamplers.0"
        else:
            head = f"up_blocks.{block}.{('resnets', 'attentions')[inner]}.{layer}"
    return f"{head}.{rest}" if rest else head


@functools.lru_cache(maxsize=1 << 16)  # the same few hundred names recur in every file of a zoo
def kohya_to_canonical(name: str) -> str | None:
    """`lora_unet_down_blocks_0_..._to_q` -> `unet.down_blocks.0....to_q`; None if not a kohya name."""
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            path = underscores_to_dots(name[len(prefix) :])
            if component == "unet":
                path = sgm_to_diffusers(path)
            return canonical_path(f"{component}.{path}")
    return None


# transformers >= 5 dropped CLIPTextModel's `text_model.` level; files in the wild keep it, so we do too.
_CLIP_TOP_LEVEL = ("encoder", "embeddings", "final_layer_norm")
_CLIP_LAYER = re.compile(r"^(text_model\.)?encoder\.layers\.\d+\.(self_attn|mlp)\.")


def infer_component(path: str) -> str | None:
    """The pipeline component a bare module path belongs to, judged from its names."""
    first = path.split(".", 1)[0]
    if _CLIP_LAYER.match(path):
        return "text_encoder"
    if first in ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding"):
        return "unet"
    if first in ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder"):
        return "transformer"
    return None


def canonical_path(path: str) -> str:
    """`<component>.<module path>`, the component inferred when the path has none."""
    first, _, rest = path.partition(".")
    component, rest = (first, rest) if first in COMPONENTS else (infer_component(path), path)
    if component in ("text_encoder", "text_encoder_2") and rest.split(".", 1)[0] in _CLIP_TOP_LEVEL:
        rest = f"text_model.{rest}"
    return f"{component}.{rest}" if component else rest


def natural_key(name: str) -> tuple:
    """Sort key that orders `blocks.2` before `blocks.10`, so layer order is the same in every format."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
