"""A small Vision Transformer (Dosovitskiy et al., 2021) for 32×32-class images: patch embedding,
pre-norm encoder blocks, a class token. Attention is written with plain Linear layers, so defenses that
act on every Linear (fast_fip) or every LayerNorm (nft, anp, rnp) reach all of it."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..registry import MODELS
from .base import Classifier, ImageInput, ModelSpec


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(n, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        # Written out rather than F.scaled_dot_product_attention: defenses and the sharpness measure
        # take second derivatives, which the fused CPU attention kernel does not provide.
        weights = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        out = weights @ v
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens, plus a class token and learned positions."""

    def __init__(self, in_channels: int, image_size: int, patch: int, dim: int):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"arch 'vit': patch size {patch} does not divide the image size {image_size}")
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos


class ClassToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class ViT(Classifier):
    def __init__(self, in_channels: int, image_size: int, num_classes: int, patch: int, dim: int,
                 depth: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.features = nn.Sequential(
            ImageInput(),
            PatchEmbed(in_channels, image_size, patch, dim),
            *[Block(dim, heads, mlp_ratio) for _ in range(depth)],
            nn.LayerNorm(dim),
            ClassToken(),
        )
        self.classifier = nn.Linear(dim, num_classes)


@MODELS.register("vit")
class ViTSpec(ModelSpec):
    modalities = ("image",)
    # ViT-Tiny-like width on 4×4 patches: 64 tokens for a 32×32 image.
    defaults = {"patch": 4, "dim": 192, "depth": 6, "heads": 3, "mlp_ratio": 2.0}

    def check(self) -> None:
        for key in ("patch", "dim", "depth", "heads"):
            self.require(int(self.params[key]) > 0, key, "must be a positive integer")
        self.require(int(self.dim) % int(self.heads) == 0, "dim", "must be divisible by heads")
        self.require(float(self.mlp_ratio) > 0, "mlp_ratio", "must be positive")

    def build(self, input_shape: Sequence[int], num_classes: int) -> ViT:
        channels, height, width = input_shape
        if height != width:
            raise ValueError(f"arch 'vit' expects square images, got {height}×{width}")
        return ViT(channels, height, num_classes, int(self.patch), int(self.dim), int(self.depth),
                   int(self.heads), float(self.mlp_ratio))
