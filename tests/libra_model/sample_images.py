"""Reproducible synthetic images for the libra_model tests."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def make_radiograph(seed: int, size: tuple[int, int] = (72, 60)) -> Image.Image:
    """Return a reproducible 8-bit grayscale picture with a smooth gradient plus noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    gradient = np.linspace(40, 200, width)[None, :] + np.linspace(0, 30, height)[:, None]
    pixels = np.clip(gradient + rng.normal(0, 25, (height, width)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def make_pixel_values(seed: int, image_size: int = 56) -> torch.Tensor:
    """Return reproducible normalised pixel values, shape (3, image_size, image_size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, image_size, image_size, generator=generator)
