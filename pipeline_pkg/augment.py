"""Data augmentation as batched tensor operations on the device: no per-sample Python in the training
loop. Images (N, C, H, W), uint8 or float: random crop with zero padding, horizontal flip. Point clouds
(N, P, 3): random anisotropic scale, shift and clipped jitter, the usual PointNet/DGCNN recipe. I/Q frames
(N, 2, L): random carrier phase, circular time shift, spectrum mirror, carrier frequency offset and
added noise, each of which leaves the modulation class unchanged."""

from __future__ import annotations

import math
from typing import Sequence

import torch

# Each name maps to f(batch, generator) → augmented batch.


def random_crop(x: torch.Tensor, generator: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """Pad by `pad` pixels (default H/8) and cut a random H×W window per image."""
    n, channels, height, width = x.shape
    pad = max(1, height // 8) if pad is None else pad
    padded = x.new_zeros((n, channels, height + 2 * pad, width + 2 * pad))
    padded[..., pad:pad + height, pad:pad + width] = x
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device).to(x.device)
    rows = (dy[:, None] + torch.arange(height, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(width, device=x.device))[:, None, :]  # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices around the channel slice put the channel last: (N, H, W, C).
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand((len(x),), generator=generator, device=generator.device).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator,
            device: torch.device) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, device=generator.device) * (high - low) + low).to(device)


def random_scale(x: torch.Tensor, generator: torch.Generator, low: float = 2 / 3,
                 high: float = 3 / 2) -> torch.Tensor:
    """Scale each cloud's x, y and z by factors drawn independently from [low, high]."""
    return x * uniform((len(x), 1, 3), low, high, generator, x.device)


def random_shift(x: torch.Tensor, generator: torch.Generator, bound: float = 0.2) -> torch.Tensor:
    """Translate each cloud by a vector drawn from [-bound, bound]^3."""
    return x + uniform((len(x), 1, 3), -bound, bound, generator, x.device)


def random_jitter(x: torch.Tensor, generator: torch.Generator, sigma: float = 0.01,
                  clip: float = 0.05) -> torch.Tensor:
    """Move every point by Gaussian noise (σ `sigma`), clipped to ±`clip` per coordinate."""
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    return x + (sigma * noise).clamp(-clip, clip)


def rotate_iq(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Multiply I/Q frames (N, 2, L) by e^{j·angle}; `angle` broadcasts against (N, L)."""
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    i, q = x[:, 0], x[:, 1]
    return torch.stack([i * cos - q * sin, i * sin + q * cos], dim=1)


def random_rotate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate each I/Q frame by a uniform random carrier phase."""
    return rotate_iq(x, uniform((len(x), 1), 0.0, 2 * math.pi, generator, x.device))


def random_roll(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each I/Q frame circularly in time by a uniform random number of samples."""
    length = x.shape[-1]
    shift = torch.randint(0, length, (len(x),), generator=generator, device=generator.device).to(x.device)
    index = (torch.arange(length, device=x.device)[None] + shift[:, None]) % length
    return torch.gather(x, 2, index[:, None].expand(-1, x.shape[1], -1))


def random_conjugate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Complex-conjugate each I/Q frame (mirror its spectrum) with probability 1/2."""
    mirror = torch.rand((len(x),), generator=generator, device=generator.device).to(x.device) < 0.5
    sign = torch.where(mirror, -1.0, 1.0).to(x.dtype)
    return torch.stack([x[:, 0], x[:, 1] * sign[:, None]], dim=1)


def random_cfo(x: torch.Tensor, generator: torch.Generator, max_cfo: float = 0.002) -> torch.Tensor:
    """Add a carrier frequency offset drawn from [-max_cfo, max_cfo] cycles/sample to each I/Q frame
    (RF1024's own channel draws its offsets from that range)."""
    cfo = uniform((len(x), 1), -max_cfo, max_cfo, generator, x.device)
    return rotate_iq(x, 2 * math.pi * cfo * torch.arange(x.shape[-1], device=x.device))


def random_noise(x: torch.Tensor, generator: torch.Generator, max_variance: float = 0.1) -> torch.Tensor:
    """Add complex white Gaussian noise of a variance drawn from [0, max_variance] to each unit-power I/Q
    frame and rescale it to unit power: a 20 dB frame falls to 9.5 dB at most, a 0 dB one by 0.8 dB at most."""
    variance = uniform((len(x), 1, 1), 0.0, max_variance, generator, x.device)
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    return ((x + noise * (variance / 2).sqrt()) / (1 + variance).sqrt()).to(x.dtype)


AUGMENTATIONS = {"crop": random_crop, "flip": random_flip,
                 "scale": random_scale, "shift": random_shift, "jitter": random_jitter,
                 "rotate": random_rotate, "roll": random_roll, "conjugate": random_conjugate,
                 "cfo": random_cfo, "noise": random_noise}
# The augmentations that make sense for each modality's data layout.
MODALITY_AUGMENTATIONS = {"image": ("crop", "flip"), "pointcloud": ("scale", "shift", "jitter"),
                          "rf": ("rotate", "roll", "conjugate", "cfo", "noise")}


def augmenter(names: Sequence[str], device: torch.device, seed: int):
    """A function batch → augmented batch drawing from one generator on `device`, seeded so that a
    resumed epoch sees the same augmentations (pass seed = f(run seed, epoch))."""
    unknown = sorted(set(names) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; valid: {sorted(AUGMENTATIONS)}")
    generator = torch.Generator(device=device).manual_seed(seed)

    def apply(x: torch.Tensor) -> torch.Tensor:
        for name in names:
            x = AUGMENTATIONS[name](x, generator)
        return x

    return apply
