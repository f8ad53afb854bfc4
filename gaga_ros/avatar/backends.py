"""Choosing and building an avatar backend, in one place for every node that reconstructs or renders.

`choose_backend` turns a requested name (auto, geometric, gagavatar) into a backend, `resolve_device`
a requested device (auto, cpu, cuda) into one, and `make_backend` builds the backend. The renderers
(the render and fleet nodes) take their device from `render_device` and build the backend an arriving
avatar names with `renderer_for`. The licensed files come from the models folder (None:
$GAGA_ROS_MODELS or ./models, see gaga_ros.assets).
"""

from __future__ import annotations

from pathlib import Path

from gaga_ros.avatar.base import AvatarBackend, AvatarError
from gaga_ros.errors import InputError, UnavailableError

#: Avatar backends: asset-free geometric, and the published GAGAvatar (needs its weights and FLAME).
BACKENDS = ("geometric", "gagavatar")
#: Image sides a renderer's size accepts (the render and fleet nodes' `size`), pixels: within what
#: every backend renders (the geometric one 16..4096; GAGAvatar resizes its own render).
RENDER_SIDES = (64, 2048)


def choose_backend(requested: str, models_dir: str | Path | None = None) -> tuple[str, str]:
    """(backend, note): auto takes gagavatar only when its licensed files are present; the note
    says why auto fell back to geometric (empty otherwise)."""
    from gaga_ros.assets import find_assets

    if requested not in ("auto", *BACKENDS):
        raise InputError(f"backend {requested!r}: accepted are auto, {' and '.join(BACKENDS)}")
    if requested != "auto":
        return requested, ""
    if find_assets(models_dir).complete:
        return "gagavatar", ""
    return "geometric", ("GAGAvatar weights or FLAME not found, using the geometric backend "
                         "(`gaga-ros assets` explains; `gaga-ros fetch-assets` downloads them)")


def resolve_device(device: str) -> str:
    """cpu or cuda for a requested device; auto is cuda when one is visible."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"device {device!r}: accepted are auto, cpu and cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UnavailableError("device cuda requested but no CUDA device is visible")
    return device


def render_device(requested: str) -> str:
    """The device a renderer's `device` parameter names (resolve_device). On the CPU torch gets one
    thread: the per-frame torch work is many small ops, and extra threads only contend with numba's."""
    import torch

    device = resolve_device(requested)
    if device == "cpu":
        torch.set_num_threads(1)
    return device


def make_backend(name: str, device: str = "cpu", models_dir: str | Path | None = None,
                 config: str = "full", grid: int | None = None, fast: bool = True,
                 compile_mode: str = "") -> AvatarBackend:
    """The backend `name` on `device`: geometric (grid lifted pixels per side, its default when
    None) or gagavatar (`config` full or tiny, `fast` the GPU fast path with the refiner compiled in
    `compile_mode`, see its COMPILE_MODES), which raises FileNotFoundError, saying what is missing,
    without its files."""
    if name == "geometric":
        from gaga_ros.avatar.geometric import GRID, GeometricAvatar

        return GeometricAvatar(grid=GRID if grid is None else grid, device=device,
                               models_dir=None if models_dir is None else str(models_dir))
    if name == "gagavatar":
        from gaga_ros.avatar.gagavatar.backend import GagaAvatarBackend

        return GagaAvatarBackend.load(models_dir, config, device=device, fast=fast, compile_mode=compile_mode)
    raise InputError(f"avatar backend {name!r}: accepted are {' and '.join(BACKENDS)}")


def renderer_for(name: str, device: str, models_dir: str | Path | None = None, config: str = "full",
                 fast: bool = True, compile_mode: str = "") -> AvatarBackend:
    """The backend that renders avatars made by backend `name` (the name an arriving avatar carries);
    an unknown name, or a gagavatar avatar without the model files here, is refused as AvatarError."""
    if name not in BACKENDS:
        raise AvatarError(f"avatar backend {name!r}: accepted are {' and '.join(BACKENDS)}")
    try:
        return make_backend(name, device, models_dir, config, fast=fast, compile_mode=compile_mode)
    except FileNotFoundError as exc:
        raise AvatarError(f"a {name} avatar arrived but {exc}") from None
