"""FastRenderer speed and accuracy on one CUDA GPU against the plain float32 GAGAvatar.render path.

Full-size model with the deterministic reference weights (docs/gagavatar.md, "Reference data") and
the stored noise maps (fresh noise would make every two renders differ). Measures: FLAME on the
GPU, and per stage of the fast frame (expression upload, rasterize, refine, readback) at batch
sizes 1/4/8/16; whole frames, frames/s and peak GPU memory per batch size; refine time and PSNR
against the strict-fp32 reference for each precision; reconstruction (reference and fast encoder)
and new-source-to-first-frame latency.
Prints a table and writes bench/results/fast.json.
Run on the GPU machine: python bench/fast_bench.py [--compile max-autotune-no-cudagraphs]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from record import stats, timed_ms, write

from gaga_ros.avatar.gagavatar import FULL, GAGAvatar, load_state_dict_strict
from gaga_ros.avatar.gagavatar.checkpoint import reference_fill
from gaga_ros.avatar.gagavatar.fast import FastRenderer, _captured, precision_mode, psnr
from gaga_ros.expression import frontal_transform
from gaga_ros.faces.flame import Flame
from gaga_ros.faces.synthetic_flame import make_synthetic_flame
from gaga_ros.render.rasterize import EPS2D, NEAR_PLANE

RESULTS = Path(__file__).resolve().parent / "results" / "fast.json"


def timed(fn: Callable[[], object], repeats: int, warmup: int = 3) -> dict:
    """Median, p90, least and most milliseconds of `repeats` calls of `fn` after `warmup` untimed
    ones, each followed by a device sync (host clock, bench/record.py)."""
    return stats(timed_ms(lambda _: fn(), range(warmup + repeats), warmup, torch.cuda.synchronize))


def dynamic_rasterization(fr: FastRenderer) -> torch.Tensor:
    """gsplat.rasterization (sizes its buffers on the host) of the renderer's current inputs, (B,H,W,C)."""
    import gsplat

    from gaga_ros.render.static_splat import TRIU

    covars = torch.empty(*fr._covars.shape[:2], 3, 3, device=fr._covars.device)
    covars[..., TRIU[0], TRIU[1]] = fr._covars
    covars[..., TRIU[1], TRIU[0]] = fr._covars
    image, _, _ = gsplat.rasterization(
        fr._means, None, None, fr._opacities, fr._colors, fr._view, fr._K, fr.size, fr.size,
        near_plane=NEAR_PLANE, eps2d=EPS2D, sh_degree=None, packed=False, rasterize_mode="classic",
        covars=covars)
    return image[:, 0]


def profile(fr: FastRenderer) -> None:
    """Top CUDA kernels of eager rasterization (static and gsplat's) and of the refiner, 3 calls each."""
    for label, fn in (("static rasterization", fr._rasterize),
                      ("gsplat.rasterization", lambda: dynamic_rasterization(fr)),
                      ("refiner", fr._refine)):
        fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        launches = sum(e.count for e in kernels) // 3
        busy_ms = sum(getattr(e, "self_device_time_total", 0) for e in kernels) / 3e3
        print(f"--- {label}, batch {fr.batch}, 3 calls: {launches} kernel launches a call, "
              f"{busy_ms:.3f} ms of kernel time a call")
        print(events.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))


def flame_params(batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"expression": 0.7 * torch.randn(batch, 100, generator=g),
            "jaw_pose": 0.15 * torch.randn(batch, 3, generator=g),
            "global_pose": 0.1 * torch.randn(batch, 3, generator=g)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--precision", default="fp16", help="precision of the staged/batched runs")
    parser.add_argument("--compile", default=None, help="torch.compile mode for an extra refiner variant")
    parser.add_argument("--tuning", action="store_true",
                        help="inductor's coordinate-descent tuning of the compiled kernels' launch sizes")
    parser.add_argument("--skip-variants", action="store_true", help="skip the per-precision table")
    parser.add_argument("--profile", action="store_true",
                        help="top CUDA kernels of rasterization and refinement at the largest batch")
    parser.add_argument("--skip-encoder", action="store_true", help="skip the reconstruction rows")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.tuning:
        import torch._inductor.config as inductor

        inductor.coordinate_descent_tuning = True
    batches = [int(b) for b in args.batches.split(",")]
    dev = torch.device("cuda")
    rows: list[dict] = []

    cfg = dataclasses.replace(FULL, randomize_noise=False)
    model = GAGAvatar(cfg).eval()
    load_state_dict_strict(model, reference_fill({k: tuple(v.shape) for k, v in model.state_dict().items()}))
    model.to(dev)
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand((3, cfg.image_size, cfg.image_size), generator=gen) for _ in range(4)]
    transform = frontal_transform(9.0)
    with precision_mode("fp32"):
        sources = [model.reconstruct(im, transform) for im in images[:2]]
    flame = Flame(make_synthetic_flame(seed=3)).to(dev)
    frames = [flame(**{k: v.to(dev) for k, v in flame_params(max(batches), s).items()}) for s in range(4)]

    # FLAME on the GPU (the render node's expression -> vertices step).
    for b in batches:
        params = {k: v.to(dev) for k, v in flame_params(b, 9).items()}
        rows.append({"name": f"FLAME vertices B={b}", "batch": b, **timed(lambda p=params: flame(**p),
                                                                           args.frames)})
        out = flame(**params)
        try:
            graph = _captured(lambda p=params, o=out: o.copy_(flame(**p)))
            rows.append({"name": f"FLAME vertices B={b} (CUDA graph)", "batch": b,
                         **timed(graph.replay, args.frames)})
        except RuntimeError as error:  # FLAME not capturable as written: report, carry on
            print(f"FLAME graph capture failed: {error}")

    # Accuracy and refine time per precision (batch 1) against strict fp32 GAGAvatar.render.
    def reference(source, verts) -> torch.Tensor:
        with precision_mode("fp32"):
            return model.render(source, verts, transform).refined

    refs = [reference(sources[0], f[0]) for f in frames]
    variants = [(p, True, None) for p in ("fp32", "tf32", "fp16", "bf16")] + [(args.precision, False, None)]
    if args.compile:
        variants.append((args.precision, True, args.compile))
    for precision, graph, mode in [] if args.skip_variants else variants:
        start = time.perf_counter()
        fr = FastRenderer(model, sources[0], precision=precision, cuda_graph=graph, compile_mode=mode)
        setup_s = time.perf_counter() - start
        worst = min(psnr(fr.frame(f[0], transform), r) for f, r in zip(frames, refs, strict=True))
        refine = timed(lambda fr=fr, g=graph: fr._refine_graph.replay() if g else fr._refine(),
                       args.frames)
        name = f"{precision}{' graph' if graph else ''}{f' compile={mode}' if mode else ''}"
        rows.append({"name": f"refine {name}", "batch": 1, "psnr_db": worst, "setup_s": setup_s, **refine})
        rows.append({"name": f"frame {name}", "batch": 1,
                     **timed(lambda fr=fr: fr.render(frames[0][0], transform), args.frames)})
        if args.profile and not graph:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fr._refine()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                            max_name_column_width=70))
        del fr

    # Stages, whole frames, fps and memory per batch size.
    for b in batches:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fr = FastRenderer(model, [sources[i % 2] for i in range(b)], precision=args.precision,
                          compile_mode=args.compile)
        verts = [f[:b] for f in frames]
        counter = iter(range(10 ** 9))
        tag = f"B={b}"
        fr.render(verts[0], transform)  # sizes the intersection buffers, captures rasterization
        stage = {
            "expression upload": lambda fr=fr, verts=verts: fr._inputs(verts[1], transform),
            "gsplat.rasterization (host sync)": lambda fr=fr: dynamic_rasterization(fr),
            "rasterize (graph)": lambda fr=fr: fr._raster_graph.replay(),
            "refine (graph)": lambda fr=fr: fr._refine_graph.replay(),
            "readback": lambda fr=fr: fr._host[0].copy_(fr._u8, non_blocking=True),
            "join (set_source)": lambda fr=fr: fr.set_source(0, sources[0]),  # slot 0's own source
            "frame (render)": lambda fr=fr, verts=verts, c=counter: fr.render(verts[next(c) % 4], transform),
        }
        for label, fn in stage.items():
            t = timed(fn, args.frames)
            row = {"name": f"fast {label} {tag}", "batch": b, **t}
            if label == "frame (render)":
                row["fps_total"] = 1e3 * b / t["median_ms"]
                row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
                row["capacity"] = fr.capacity
                row["intersections"] = int(fr._total)
            rows.append(row)
        out = fr.frame(verts[2], transform)
        worst = min(psnr(out[i], reference(sources[i % 2], verts[2][i])) for i in range(min(b, 4)))
        rows[-1]["psnr_db"] = worst
        splat = fr._splat.permute(0, 2, 3, 1).clone()
        rows[-1]["splat_max_diff"] = (splat - dynamic_rasterization(fr)).abs().max().item()
        if args.profile and b == batches[-1]:
            profile(fr)
        del fr

    # Reconstruction: reference fp32 / tf32, fast encoder graph tf32 / bf16; new source -> first frame.
    for precision in [] if args.skip_encoder else ("fp32", "tf32"):
        with precision_mode(precision):
            t = timed(lambda: model.reconstruct(images[2], transform), 10, 2)
        rows.append({"name": f"reference reconstruction {precision}", "batch": 1, **t})
    for enc in [] if args.skip_encoder else ("tf32", "fp16", "bf16"):
        fr = FastRenderer(model, sources[0], precision=args.precision, encoder_precision=enc)
        t = timed(lambda fr=fr: fr.reconstruct(images[2], transform), 10, 2)
        fast_src = fr.reconstruct(images[3], transform)
        with precision_mode("fp32"):
            ref_src = model.reconstruct(images[3], transform)
        quality = psnr(reference(fast_src, frames[0][0]), reference(ref_src, frames[0][0]))
        rows.append({"name": f"fast reconstruction {enc} graph", "batch": 1, "psnr_db": quality, **t})

        picks = iter(range(10 ** 9))

        def first_frame(fr=fr, picks=picks) -> None:
            fr.set_source(0, fr.reconstruct(images[next(picks) % 4], transform))
            fr.render(frames[1][0], transform)

        rows.append({"name": f"new source -> first frame ({enc} encoder)", "batch": 1,
                     **timed(first_frame, 10, 2)})
        del fr

    print(f"{'benchmark':<52} {'median ms':>10} {'min ms':>9} {'fps':>8} {'PSNR dB':>8} {'peak GB':>8}")
    for row in rows:
        extra = [f"{row['fps_total']:>8.1f}" if "fps_total" in row else f"{'':>8}",
                 f"{row['psnr_db']:>8.1f}" if "psnr_db" in row else f"{'':>8}",
                 f"{row['peak_gb']:>8.2f}" if "peak_gb" in row else f"{'':>8}"]
        extra.append(f" isect {row['intersections']}/{row['capacity']}" if "capacity" in row else "")
        extra.append(f" splat diff {row['splat_max_diff']:.1e}" if "splat_max_diff" in row else "")
        print(f"{row['name']:<52} {row['median_ms']:>10.2f} {row['min_ms']:>9.2f} " + " ".join(extra))
    config = {"gaussians": int(len(sources[0].opacities)), "render_size": cfg.render_size,
              "precision": args.precision, "compile": args.compile, "tuning": args.tuning,
              "frames": args.frames, "randomize_noise": False, "numpy": np.__version__}
    write(RESULTS, {"config": config, "rows": rows})


if __name__ == "__main__":
    main()
