"""GAGAvatar training speed on the GPU: full-size model, published optimiser, gsplat splatting.

Runs a few hundred steps on a dataset built beforehand (`python -m gaga_ros.train build`), needs no
mediapipe. DINOv2 and the perceptual networks have no downloadable weights here, so the encoder is
random and the perceptual term is the 1-SSIM substitute unless --dino / --perceptual are given: the
numbers are speed and memory, the loss curve only shows the optimiser works.
Prints a table and writes bench/results/train.json (train_tiny.json with --tiny).
GPU machine: python bench/train_bench.py --data .data/obama ; CPU smoke: --tiny --steps 3 --batch 1
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from record import write

from gaga_ros.train.trainer import TrainConfig, Trainer

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=".data/obama", help="built dataset folder")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps (gsplat JIT, cudnn)")
    parser.add_argument("--batch", type=int, default=8, help="published batch size")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--dino")
    parser.add_argument("--perceptual")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=args.data, out=out, model="tiny" if args.tiny else "full",
                          batch_size=args.batch,
                          steps=args.warmup + args.steps, workers=args.workers, log_every=10**9,
                          sample_every=0, checkpoint_every=0, dino=args.dino, perceptual=args.perceptual)
        trainer = Trainer(cfg)
        cuda = trainer.device.type == "cuda"
        trainer.fit(args.warmup)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        losses = trainer.fit(args.warmup + args.steps)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        save_start = time.perf_counter()
        trainer.save()
        save_s = time.perf_counter() - save_start

    totals = [x["total"] for x in losses]
    every = max(len(totals) // 20, 1)
    curve = [{"step": losses[i]["step"], "total": float(np.mean(totals[i:i + every])),
              **{k: float(np.mean([x[k] for x in losses[i:i + every]]))
                 for k in ("img_loss", "box_loss", "percep_loss", "point_loss")}}
             for i in range(0, len(totals), every)]
    steps_per_s = args.steps / seconds
    memory_gb = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    device = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    result = {
        "training steps/s": round(steps_per_s, 3),
        "training memory GB": None if memory_gb is None else round(memory_gb, 2),
        "images/s": round(steps_per_s * args.batch, 2),
        "checkpoint save s": round(save_s, 2),
        "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "model": cfg.model, "frames": len(trainer.dataset), "device": device,
        "torch": torch.__version__, "perceptual": "published" if args.perceptual else "1-SSIM substitute",
        "dino": "loaded" if args.dino else "random (no weights)",
        "loss_first": curve[0]["total"], "loss_last": curve[-1]["total"], "loss_curve": curve,
    }
    print(f"{'metric':<24}{'value':>12}")
    for k in ("training steps/s", "training memory GB", "images/s", "checkpoint save s"):
        print(f"{k:<24}{str(result[k]):>12}")
    print(f"device {device}, batch {args.batch}, {args.steps} timed steps, model {cfg.model}")
    print("loss curve (step: total):", ", ".join(f"{c['step']}: {c['total']:.4f}" for c in curve))
    write(RESULTS / ("train_tiny.json" if args.tiny else "train.json"), result)


if __name__ == "__main__":
    main()
