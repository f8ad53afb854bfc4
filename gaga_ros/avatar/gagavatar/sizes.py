"""Sizes of the GAGAvatar network: the published (full) model and a tiny one for CPU tests.

Both configurations run the same code; only widths, depths and resolutions change. The local
feature plane is 8x the backbone's patch grid (37 -> 296 for the published model).
"""

from __future__ import annotations

from dataclasses import dataclass

from gaga_ros.conventions import CROP_SIZE, FOCAL
from gaga_ros.errors import InputError


@dataclass(frozen=True)
class GagaSizes:
    """Widths and resolutions of every GAGAvatar sub-network."""

    image_size: int = 518
    patch_size: int = 14
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    fusion_channels: int = 256
    project_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    vertex_feature_dim: int = 256
    vertex_hidden: int = 256
    head_hidden: int = 128
    conv_hidden: int = 128
    gaussian_channels: int = 32
    harmonics: int = 4
    render_size: int = CROP_SIZE
    focal: float = FOCAL
    refiner_base: int = 16
    refiner_max: int = 256
    style_dim: int = 512
    style_mlp_layers: int = 8
    #: Official inference draws fresh StyleGAN noise on every call (docs/gagavatar.md); False uses the
    #: stored maps.
    randomize_noise: bool = True

    @property
    def grid(self) -> int:
        """Patches per side of the backbone's token grid."""
        return self.image_size // self.patch_size

    @property
    def plane_size(self) -> int:
        """Side of the local feature plane and of each dual-lifting Gaussian grid."""
        return 8 * self.grid

    @property
    def direction_dim(self) -> int:
        """Width of the harmonic view-direction encoding: sin, cos of 3*harmonics, plus the input."""
        return 3 * (2 * self.harmonics + 1)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise InputError(f"image_size {self.image_size} must be a multiple of patch_size "
                             f"{self.patch_size}")
        if self.depth < 4:
            raise InputError(f"depth must be at least 4 (the head reads the last four blocks), "
                             f"got {self.depth}")
        if self.render_size < 8 or self.render_size & (self.render_size - 1):
            raise InputError(f"render_size must be a power of two >= 8, got {self.render_size}")


#: The published GAGAvatar model (docs/gagavatar.md).
FULL = GagaSizes()

#: A few-MB model with the same code paths, for CPU tests and smoke benchmarks.
TINY = GagaSizes(image_size=126, embed_dim=48, depth=4, num_heads=2, fusion_channels=16,
                  project_channels=(16, 32, 64, 64), vertex_feature_dim=16, vertex_hidden=32,
                  head_hidden=16, conv_hidden=16, render_size=128, refiner_base=4, refiner_max=16,
                  style_dim=32, style_mlp_layers=2)
