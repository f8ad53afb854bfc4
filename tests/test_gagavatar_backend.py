"""The GAGAvatar backend behind the shared avatar interface: tiny config, synthetic FLAME, CPU."""

import dataclasses

import numpy as np
import pytest
import torch

from gaga_ros.avatar.base import Avatar
from gaga_ros.avatar.gagavatar.backend import GagaAvatarBackend, GagaPrepared
from gaga_ros.avatar.gagavatar.model import GAGAvatar
from gaga_ros.avatar.gagavatar.sizes import TINY
from gaga_ros.expression import Expression, FaceModel
from gaga_ros.faces.synthetic_flame import write_synthetic_flame


def make_models_dir(root):
    """A models/ folder with the synthetic FLAME and tiny random GAGAvatar weights."""
    write_synthetic_flame(root / "flame", seed=0)
    (root / "flame" / "FLAME_with_eye.pt").exists() or next((root / "flame").glob("*.pt")).rename(
        root / "flame" / "FLAME_with_eye.pt")
    torch.manual_seed(0)
    (root / "gagavatar").mkdir()
    torch.save({"model": GAGAvatar(TINY).state_dict()}, root / "gagavatar" / "GAGAvatar.pt")
    return root


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    root = make_models_dir(tmp_path_factory.mktemp("models"))
    return GagaAvatarBackend.load(root, config="tiny")


@pytest.fixture(scope="module")
def avatar(backend, media_dir):
    import cv2

    rgb = cv2.cvtColor(cv2.imread(str(media_dir / "monroe.jpg")), cv2.COLOR_BGR2RGB)
    return backend.reconstruct(rgb)


def test_reconstruct_and_render_flame_expressions(backend, avatar):
    assert avatar.backend == "gagavatar" and avatar.gaussians.colors.shape[1] == 32
    assert len(avatar) > 5023
    neutral = Expression(FaceModel.FLAME, transform=avatar.source_transform)
    a = backend.render(avatar, neutral, size=128)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8 and a.std() > 0
    jaw = Expression(FaceModel.FLAME, transform=avatar.source_transform, jaw_pose=[0.4, 0, 0],
                     expression=np.full(20, 1.5, np.float32))
    moved = (backend.frame(avatar, jaw).splat - backend.frame(avatar, neutral).splat).abs().mean()
    assert moved > 1e-4, "expression must move the expression Gaussians"

def test_mesh_expressions_are_converted_to_flame(backend, avatar):
    """The scripted driver and mesh tracking send MESH mode: the backend fits FLAME to it."""
    from test_conversion import open_jaw_mesh

    from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES

    neutral = Expression(FaceModel.MESH, vertices=CANONICAL_VERTICES)
    opened = Expression(FaceModel.MESH, vertices=open_jaw_mesh(0.1))
    image = backend.render(avatar, neutral, size=128)
    assert image.shape == (128, 128, 3) and image.std() > 0
    moved = (backend.frame(avatar, opened).splat - backend.frame(avatar, neutral).splat).abs().mean()
    assert moved > 1e-4, "a mesh-mode jaw opening must move the expression Gaussians"


def test_message_arrays_round_trip_renders_the_same(backend, avatar):
    neutral = Expression(FaceModel.FLAME, transform=avatar.source_transform)
    restored = Avatar.from_arrays(avatar.to_arrays())
    assert restored.backend == "gagavatar"
    # the backend's prepared state: reconstruction leaves it, an avatar from a message gets it on
    # its first frame, built from its arrays
    assert isinstance(avatar.prepared, GagaPrepared) and restored.prepared is None
    direct = backend.frame(avatar, neutral).splat
    via_message = backend.frame(restored, neutral).splat
    assert isinstance(restored.prepared, GagaPrepared)
    assert torch.allclose(direct, via_message, atol=1e-5)


def test_missing_assets_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch-assets"):
        GagaAvatarBackend.load(tmp_path, config="tiny")


@pytest.mark.gpu
def test_fast_path_matches_reference_on_gpu(tmp_path, media_dir):
    """The backend's default CUDA path (FastRenderer) stays within 40 dB of the fp32 reference."""
    from PIL import Image

    from gaga_ros.camera import frontal_transform

    root = make_models_dir(tmp_path / "models")
    crop = np.asarray(Image.open(media_dir / "monroe.jpg").convert("RGB").resize((512, 512)))
    fast = GagaAvatarBackend.load(root, config="tiny", device="cuda", fast=True)
    fast.model.cfg = dataclasses.replace(fast.model.cfg, randomize_noise=False)  # comparable noise
    avatar = fast.reconstruct_crop(crop, frontal_transform(9.0), np.zeros(300, np.float32))
    reference = GagaAvatarBackend(fast.model, fast.flame_assets, "cuda", fast=False)
    expr = Expression(FaceModel.FLAME, transform=avatar.source_transform, jaw_pose=[0.2, 0, 0])
    size = fast.model.cfg.render_size
    a = fast.render(avatar, expr, size).astype(np.float64)
    b = reference.render(avatar, expr, size).astype(np.float64)
    psnr = 10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-12))
    assert psnr >= 40, psnr


def test_backend_factory_chooses_and_builds(tmp_path):
    """The one factory every node uses (gaga_ros.avatar.backends)."""
    from gaga_ros.avatar.backends import choose_backend, make_backend, renderer_for, resolve_device
    from gaga_ros.avatar.base import AvatarError
    from gaga_ros.avatar.geometric import GeometricAvatar
    from gaga_ros.errors import InputError

    empty = tmp_path / "empty"
    empty.mkdir()
    name, note = choose_backend("auto", empty)
    assert name == "geometric" and "not found" in note
    models = make_models_dir(tmp_path / "models")
    assert choose_backend("auto", models) == ("gagavatar", "")
    assert choose_backend("geometric", models) == ("geometric", "")
    with pytest.raises(InputError, match="accepted are auto, geometric and gagavatar"):
        choose_backend("nerf", models)
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="accepted are auto, cpu and cuda"):
        resolve_device("tpu")
    geometric = make_backend("geometric", "cpu", models, grid=48)
    assert isinstance(geometric, GeometricAvatar) and geometric.grid == 48
    assert isinstance(make_backend("gagavatar", "cpu", models, config="tiny"), GagaAvatarBackend)
    with pytest.raises(FileNotFoundError):
        make_backend("gagavatar", "cpu", empty, config="tiny")
    # a renderer refuses what an arriving avatar names but cannot be rendered here as AvatarError
    assert isinstance(renderer_for("gagavatar", "cpu", models, config="tiny"), GagaAvatarBackend)
    with pytest.raises(AvatarError, match="a gagavatar avatar arrived but"):
        renderer_for("gagavatar", "cpu", empty, config="tiny")
    with pytest.raises(AvatarError, match="avatar backend 'nerf': accepted are geometric and gagavatar"):
        renderer_for("nerf", "cpu", models)
