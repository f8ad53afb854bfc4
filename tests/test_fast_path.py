"""FastRenderer: the reference switch is GAGAvatar.render exactly (CPU, tiny model); on CUDA the fast
path (fp16 refiner and sync-free rasterization in CUDA graphs) stays within 40 dB PSNR of strict
float32, rasterizes bit for bit as gsplat.rasterization, and a batch of avatars renders each avatar
as a renderer of its own does."""

import dataclasses

import numpy as np
import pytest
import torch

from gaga_ros.avatar.gagavatar import FULL, TINY, GAGAvatar, load_state_dict_strict
from gaga_ros.avatar.gagavatar.checkpoint import reference_fill
from gaga_ros.avatar.gagavatar.fast import FastRenderer, FastRenderError, precision_mode, psnr
from gaga_ros.camera import frontal_transform
from gaga_ros.render.static_splat import TRIU


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
    with pytest.raises(FastRenderError, match="at least one"):
        FastRenderer(model, [None, None], reference=True)
    with pytest.raises(FastRenderError, match="GagaSource"):
        FastRenderer(model, [sources[0], "photo.jpg"], reference=True)
    fr = FastRenderer(model, sources, reference=True)
    with pytest.raises(FastRenderError, match=r"\(2,5023,3\)"):
        fr.frame(head_vertices(0), frontal_transform())
    with pytest.raises(FastRenderError, match="transforms"):
        fr.frame(torch.zeros(2, 5023, 3), np.eye(4))
    with pytest.raises(FastRenderError, match="slot"):
        fr.set_source(2, sources[0])
    with pytest.raises(FastRenderError, match="slot"):
        fr.clear_slot(-1)
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


def test_free_slot_renders_black_in_reference_mode(tiny):
    model, sources = tiny
    fr = FastRenderer(model, sources, reference=True)
    fr.clear_slot(1)
    rgb = fr.frame(torch.stack([head_vertices(1), head_vertices(2)]), frontal_transform())
    assert rgb[0].std() > 0 and torch.count_nonzero(rgb[1]) == 0
    starts_free = FastRenderer(model, [None, sources[1]], reference=True)
    rgb = starts_free.frame(torch.stack([head_vertices(1), head_vertices(2)]), frontal_transform())
    assert torch.count_nonzero(rgb[0]) == 0 and rgb[1].std() > 0
    fr.set_source(1, sources[0])
    rgb = fr.frame(torch.stack([head_vertices(1), head_vertices(1)]), frontal_transform())
    assert torch.equal(rgb[0], rgb[1])


@pytest.fixture(scope="module")
def full_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: run on the GPU machine (see README, Testing)")
    model = filled_model(FULL).cuda()
    images = source_images(FULL, 4)
    with precision_mode("fp32"):
        sources = [model.reconstruct(im, frontal_transform()) for im in images]
    return model, sources


def gsplat_splat(fr: FastRenderer, meta: bool = False):
    """gsplat.rasterization (host-sized buffers) of the renderer's current inputs, (B,H,W,C) (and
    gsplat's meta when `meta`)."""
    import gsplat

    covars = torch.empty(*fr._covars.shape[:2], 3, 3, device=fr._covars.device)
    covars[..., TRIU[0], TRIU[1]] = fr._covars
    covars[..., TRIU[1], TRIU[0]] = fr._covars
    image, _, info = gsplat.rasterization(fr._means, None, None, fr._opacities, fr._colors, fr._view, fr._K,
                                          fr.size, fr.size, near_plane=0.2, eps2d=0.3, packed=False,
                                          rasterize_mode="classic", covars=covars)
    return (image[:, 0], info) if meta else image[:, 0]


@pytest.mark.gpu
def test_graph_rasterization_equals_gsplat_and_grows(full_cuda):
    """The captured sync-free rasterization (culled, depth-ordered tile lists) gives
    gsplat.rasterization's splat bit for bit with fewer tile entries than gsplat makes; a buffer too
    small for a frame is grown and the frame rendered again, so the result is still exact."""
    model, sources = full_cuda
    fr = FastRenderer(model, sources[:2])
    verts = torch.stack([head_vertices(1), head_vertices(2)]).cuda()
    fr.frame(verts, frontal_transform())
    exact = gsplat_splat(fr)
    assert exact.abs().max() > 0
    assert torch.equal(fr._splat.permute(0, 2, 3, 1), exact)
    needed = int(fr._total)
    assert fr.capacity >= needed
    _, gsplat_meta = gsplat_splat(fr, meta=True)
    print(f"tile entries: {needed} kept of gsplat's {len(gsplat_meta['flatten_ids'])}")
    assert 0 < needed < len(gsplat_meta["flatten_ids"])
    fr._raster_graph = None
    fr._rasterizer.resize(needed // 2)
    fr._capture_raster()
    fr._splat.fill_(float("nan"))
    fr.frame(verts, frontal_transform())
    assert fr.capacity >= needed
    assert torch.equal(fr._splat.permute(0, 2, 3, 1), exact)


@pytest.mark.gpu
def test_batched_avatars_equal_per_avatar_renders(full_cuda):
    """Four avatars in one batch (eager and compiled refiner) render as four one-slot renderers do:
    the same splat bit for bit, the refined image within fp16 batching noise (>= 50 dB), and each
    within 40 dB of strict fp32. A join (set_source) recaptures nothing; a leave empties the slot."""
    model, sources = full_cuda
    transform = frontal_transform()
    verts = torch.stack([head_vertices(s) for s in (1, 2, 3, 4)]).cuda()
    single = FastRenderer(model, sources[0])
    alone = []
    for i in range(4):
        single.set_source(0, sources[i])
        image = single.render(verts[i], transform)[0].copy()
        alone.append((single.frame(verts[i], transform)[0].clone(), single._splat[0].clone(), image))
    for compile_mode in (None, "default"):
        fr = FastRenderer(model, sources, compile_mode=compile_mode)
        images = fr.render(verts, transform)
        rgb = fr.frame(verts, transform)
        for i in range(4):
            rgb_alone, splat_alone, image_alone = alone[i]
            assert torch.equal(fr._splat[i], splat_alone)
            value = psnr(rgb[i], rgb_alone)
            print(f"compile {compile_mode} slot {i}: batched vs alone {value:.1f} dB")
            assert value >= 50.0
            assert np.abs(images[i].astype(int) - image_alone.astype(int)).mean() < 0.5
        with precision_mode("fp32"):
            ref = model.render(sources[3], verts[3], transform).refined[0]
        assert psnr(rgb[3], ref) >= 40.0
    graphs = (fr._raster_graph, fr._refine_graph)
    fr.set_source(1, sources[3])
    fr.clear_slot(2)
    rgb = fr.frame(verts[[0, 3, 2, 3]], transform)
    assert (fr._raster_graph, fr._refine_graph) == graphs
    assert torch.equal(fr._splat[1], fr._splat[3])
    assert fr._splat[2].abs().max() == 0
    starts_free = FastRenderer(model, [None, sources[3]])  # a fleet renderer with a free slot
    starts_free.frame(verts[[0, 3]], transform)
    assert starts_free._splat[0].abs().max() == 0
    assert torch.equal(starts_free._splat[1], alone[3][1])
