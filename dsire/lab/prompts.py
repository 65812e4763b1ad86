"""Pad prompts: a learnable border added to the input image, the adapter of LMEraser (arXiv 2404.11056).

The paper's pad prompter (from Bahng et al.'s visual prompting) learns a frame `pad` pixels wide
around the image: 30 pixels on a 3×224×224 ViT input. Only the frame is learnable, as four strips,
so its size is C · (2 · pad · W + 2 · pad · (H − 2 · pad)); every pixel inside it reaches the
backbone untouched. The frame starts at zero, so an untrained prompt is the backbone itself: the
paper draws it from N(0, 1), a scale meant for ImageNet-normalised inputs, which on small images
such as digits (pixels in [0, 1], an empty border) would start every cluster far from the public
backbone's function.
"""

from __future__ import annotations

import torch
from torch import nn

from dsire.errors import UserError


class PadPrompted(nn.Module):
    """`backbone(x + border)`: the frozen backbone behind a learnable border of width `pad`."""

    def __init__(self, backbone: nn.Module, input_shape: tuple[int, ...], pad: int):
        super().__init__()
        if len(input_shape) != 3:
            raise UserError("finetune.method", f"pad_prompt needs images (channels, height, width), not {input_shape}")
        channels, height, width = input_shape
        if 2 * pad >= min(height, width):
            raise UserError("finetune.pad", f"{pad}: a border must leave an inside on {height}×{width} images")
        self.backbone = backbone
        self.pad_top = nn.Parameter(torch.zeros(channels, pad, width))
        self.pad_bottom = nn.Parameter(torch.zeros(channels, pad, width))
        self.pad_left = nn.Parameter(torch.zeros(channels, height - 2 * pad, pad))
        self.pad_right = nn.Parameter(torch.zeros(channels, height - 2 * pad, pad))

    def border(self) -> torch.Tensor:
        """[C, H, W]: the four strips around zeros."""
        channels, inside, pad = self.pad_left.shape
        width = self.pad_top.shape[-1]
        zeros = torch.zeros(channels, inside, width - 2 * pad, dtype=self.pad_left.dtype, device=self.pad_left.device)
        middle = torch.cat([self.pad_left, zeros, self.pad_right], dim=-1)
        return torch.cat([self.pad_top, middle, self.pad_bottom], dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x + self.border())
