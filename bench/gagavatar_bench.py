"""GAGAvatar speed: reconstruction once per source, then the per-frame path (expression branch,
rasterize, StyleUNet refine, readback to a uint8 host image), and peak GPU memory.

Full size with the deterministic reference weights of docs/gagavatar.md (realistic Gaussian sizes
and opacities for the rasterizer), matmul precision 'high' as the published inference sets. Prints a
table and writes bench/results/gagavatar.json (gagavatar_tiny.json with --tiny).
Run on the GPU machine: python bench/gagavatar_bench.py ; CPU smoke check: --tiny --frames 3
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from record import stats, timed_ms, write

from gaga_ros.avatar.gagavatar import FULL, TINY, GAGAvatar, load_state_dict_strict
from gaga_ros.avatar.gagavatar.checkpoint import reference_fill
from gaga_ros.camera import Camera, frontal_transform
from gaga_ros.render import rasterize

RESULTS = Path(__file__).resolve().parent / "results"


def head_vertices(frame: int) -> torch.Tensor:
    """5023 points on a head-sized ellipsoid whose lower half opens and closes with the frame."""
    gen = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(5023, 3, generator=gen), dim=1)
    v = v * torch.tensor([0.45, 0.6, 0.5])
    v[:, 1] -= 0.05 * (1 + np.sin(frame / 5)) * (v[:, 1] < 0)
    return v


def timed(fn: Callable[[], object], sync: Callable[[], None], repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each of `repeats` calls after `warmup` untimed ones (bench/record.py)."""
    return list(timed_ms(lambda _: fn(), range(warmup + repeats), warmup, sync))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke check)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--backend", default="auto", help="rasterizer backend")
    parser.add_argument("--fixed-noise", action="store_true", help="stored noise maps instead of fresh")
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")
    torch.set_grad_enabled(False)

    cfg = dataclasses.replace(TINY if args.tiny else FULL, randomize_noise=not args.fixed_noise)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = GAGAvatar(cfg).eval()
    load_state_dict_strict(model, reference_fill({k: tuple(v.shape) for k, v in model.state_dict().items()}))
    model.to(device)
    image = torch.rand((3, cfg.image_size, cfg.image_size), generator=torch.Generator().manual_seed(1))
    transform = frontal_transform(9.0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warm = 1 if args.tiny else 2
    recon = timed(lambda: model.reconstruct(image, transform), sync, 3, warm)
    source = model.reconstruct(image, transform)
    verts = [head_vertices(i).to(device) for i in range(args.frames)]
    camera = Camera.from_transform(transform, cfg.render_size, cfg.focal)
    counter = iter(range(10 ** 9))

    def frame() -> np.ndarray:
        out = model.render(source, verts[next(counter) % args.frames], transform, backend=args.backend)
        return (out.refined[0].permute(1, 2, 0) * 255).to(torch.uint8).cpu().numpy()

    warmup = 2 if args.tiny else 10
    per_frame = timed(frame, sync, args.frames, warmup)
    gaussians = source.frame_gaussians(verts[0])
    splat = rasterize(gaussians, camera, backend=args.backend).image.permute(2, 0, 1)[None]
    refined = model.upsampler(splat, randomize_noise=cfg.randomize_noise)
    stages = {
        "expression branch": timed(lambda: source.frame_gaussians(verts[1]), sync, args.frames, warmup),
        "rasterize": timed(lambda: rasterize(gaussians, camera, backend=args.backend), sync, args.frames,
                           warmup),
        "refine (StyleUNet)": timed(lambda: model.upsampler(splat, randomize_noise=cfg.randomize_noise),
                                    sync, args.frames, warmup),
        "readback (uint8 to host)": timed(
            lambda: (refined[0].permute(1, 2, 0) * 255).to(torch.uint8).cpu().numpy(), sync, args.frames,
            warmup),
    }
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if cuda else None

    prefix = "gagavatar tiny" if args.tiny else "gagavatar"
    frame_stats = stats(per_frame)
    rows = [{"name": f"{prefix} reconstruction ms", **stats(recon)},
            {"name": f"{prefix} per-frame ms", **frame_stats, "fps": 1e3 / frame_stats["median_ms"]}]
    rows += [{"name": f"{prefix} per-frame: {stage} ms", **stats(t)} for stage, t in stages.items()]
    if peak_gb is not None:
        rows.append({"name": f"{prefix} GPU memory GB", "value": peak_gb})
    print(f"{'benchmark':<52} {'median':>10} {'min':>10} {'max':>10}")
    for row in rows:
        if "value" in row:
            print(f"{row['name']:<52} {row['value']:>10.2f}")
        else:
            times = (row["median_ms"], row["min_ms"], row["max_ms"])
            print(f"{row['name']:<52} " + " ".join(f"{t:>10.2f}" for t in times))
    path = RESULTS / ("gagavatar_tiny.json" if args.tiny else "gagavatar.json")
    config = {"gaussians": len(gaussians), "render_size": cfg.render_size, "image_size": cfg.image_size,
              "randomize_noise": cfg.randomize_noise, "frames": args.frames, "matmul_precision": "high"}
    write(path, {"config": config, "backend": args.backend, "rows": rows})


if __name__ == "__main__":
    main()
