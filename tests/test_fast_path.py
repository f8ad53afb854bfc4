"""FastRenderer: the reference switch is GAGAvatar.render exactly (CPU, tiny model); on CUDA the fast
path (fp16 refiner in a CUDA graph, batched gsplat) stays within 40 dB PSNR of strict float32."""

import dataclasses

import numpy as np
import pytest
import torch

from gaga_ros.avatar.gagavatar import FULL, TINY, GAGAvatar, load_state_dict_strict
from gaga_ros.avatar.gagavatar.checkpoint import reference_fill
from gaga_ros.avatar.gagavatar.fast import FastRenderer, FastRenderError, precision_mode, psnr
from gaga_ros.camera import frontal_transform


def filled_model(cfg) -> GAGAvatar:
    model = GAGAvatar(dataclasses.replace(cfg, randomize_noise=False)).eval()
    load_state_dict_strict(model, reference_fill({k: tuple(v.shape) for k, v in model.state_dict().items()}))
    return model


def head_vertices(seed: int) -> torch.Tensor:
    """5023 points on a head-sized ellipsoid with a little per-seed jitter."""
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(5023, 3, generator=g), dim=1)
    return v * torch.tensor([0.45, 0.6, 0.5]) + 0.01 * torch.randn(5023, 3, generator=g)


def source_images(cfg, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.rand(3, cfg.image_size, cfg.image_size, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    model = filled_model(TINY)
    sources = [model.reconstruct(im, frontal_transform()) for im in source_images(TINY, 2)]
    return model, sources


def test_reference_switch_is_gagavatar_render(tiny):
    model, sources = tiny
    fr = FastRenderer(model, sources, reference=True)
    verts = torch.stack([head_vertices(1), head_vertices(2)])
    transform = frontal_transform()
    rgb = fr.frame(verts, transform)
    for i in range(2):
        expected = model.render(sources[i], verts[i], transform).refined[0]
        assert torch.equal(rgb[i], expected)
    images = fr.render(verts, transform)
    assert images.shape == (2, TINY.render_size, TINY.render_size, 3) and images.dtype == np.uint8
    expected_u8 = (rgb.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(images, expected_u8)
    assert images.std() > 0  # a real picture, not a constant


def test_bad_inputs_raise_clear_errors(tiny):
    model, sources = tiny
    with pytest.raises(FastRenderError, match="CUDA"):
        FastRenderer(model, sources[0])
    with pytest.raises(FastRenderError, match="precision"):
        FastRenderer(model, sources[0], precision="int8", reference=True)
    with pytest.raises(FastRenderError, match="GagaSource"):
        FastRenderer(model, [], reference=True)
    fr = FastRenderer(model, sources, reference=True)
    with pytest.raises(FastRenderError, match=r"\(2,5023,3\)"):
        fr.frame(head_vertices(0), frontal_transform())
    with pytest.raises(FastRenderError, match="transforms"):
        fr.frame(torch.zeros(2, 5023, 3), np.eye(4))
    with pytest.raises(FastRenderError, match="slot"):
        fr.set_source(2, sources[0])
    with pytest.raises(ValueError):
        precision_mode("fp64").__enter__()


@pytest.mark.gpu
def test_fast_path_matches_fp32_reference():
    """fp16 refiner in a CUDA graph + batched gsplat vs strict-fp32 GAGAvatar.render, two slots."""
    model = filled_model(FULL).cuda()
    transform = frontal_transform()
    with precision_mode("fp32"):
        sources = [model.reconstruct(im, transform) for im in source_images(FULL, 2)]
    fr = FastRenderer(model, sources)
    for seed in (1, 2):
        verts = torch.stack([head_vertices(seed), head_vertices(seed + 10)]).cuda()
        fr._rgb.fill_(float("nan"))  # every pixel must be rewritten by the frame
        fast = fr.frame(verts, transform).clone()
        images = fr.render(verts, transform)
        for i in range(2):
            with precision_mode("fp32"):
                ref = model.render(sources[i], verts[i], transform).refined[0]
            value = psnr(fast[i], ref)
            print(f"slot {i} seed {seed}: fast vs reference PSNR {value:.1f} dB")
            assert value >= 40.0
            # The host image is this frame's refined RGB, rounded to uint8.
            expected = (fast[i].permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
            np.testing.assert_array_equal(images[i], expected)
    # A new source in a slot changes that slot only.
    fr.set_source(1, sources[0])
    verts = torch.stack([head_vertices(3), head_vertices(3)]).cuda()
    out = fr.frame(verts, transform)
    assert psnr(out[0], out[1]) > 60


def test_unfused_refiner_computes_the_same_function(tiny):
    """Input-scaled shared conv + output demodulation == the published per-sample weight modulation,
    for a batch of different inputs (so different styles), in float32 on the CPU."""
    from gaga_ros.avatar.gagavatar.fast import fast_refiner

    model, _ = tiny
    x = torch.rand(3, TINY.gaussian_channels, TINY.render_size, TINY.render_size,
                   generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model.upsampler(x, randomize_noise=False)
        got = fast_refiner(model.upsampler)(x.contiguous(memory_format=torch.channels_last),
                                            randomize_noise=False)
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the samples really differ
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
