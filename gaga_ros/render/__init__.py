"""Rasterization of Gaussians: one entry point, `rasterize`, over gsplat, compiled CPU and reference."""

from gaga_ros.render.rasterize import BACKENDS, RenderInputError, RenderResult, rasterize

__all__ = ["BACKENDS", "RenderInputError", "RenderResult", "rasterize"]
