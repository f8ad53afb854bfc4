"""Command line: `python -m gaga_ros.train build VIDEOS OUT` and `python -m gaga_ros.train fit DATA OUT`.

Multi-GPU: `torchrun --nproc_per_node N -m gaga_ros.train fit DATA OUT ...` (batch is global).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _build(args: argparse.Namespace) -> int:
    from gaga_ros.train.dataset import build_dataset

    report = build_dataset(args.videos, args.out, mode=args.mode, flame_path=args.flame, every=args.every,
                           max_frames=args.max_frames, blur_threshold=args.blur,
                           min_confidence=args.min_confidence, jpeg_quality=args.quality,
                           progress=not args.quiet)
    print(report.summary())
    return 0


def _fit(args: argparse.Namespace) -> int:
    from gaga_ros.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(data=args.data, out=args.out, model=args.model, batch_size=args.batch, steps=args.steps,
                      lr=args.lr, style_lr=args.style_lr, decay_steps=args.decay_steps, seed=args.seed,
                      workers=args.workers, log_every=args.log_every, sample_every=args.sample_every,
                      checkpoint_every=args.checkpoint_every, init=args.init, dino=args.dino,
                      perceptual=args.perceptual)
    trainer = Trainer(cfg)
    latest = Path(args.out) / "latest.pt"
    if args.resume and latest.is_file():
        trainer.load(latest)
        if trainer.rank == 0:
            print(f"resumed from {latest} at step {trainer.step}")
    trainer.fit()
    trainer.save()
    trainer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gaga_ros.train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="track and crop videos into a training dataset (resumable)")
    b.add_argument("videos", nargs="+", help="video files or folders of videos")
    b.add_argument("out", help="dataset folder")
    b.add_argument("--mode", default="auto", choices=("auto", "mesh", "flame"),
                   help="auto: flame when --flame is given, else mesh (synthetic stand-in vertices)")
    b.add_argument("--flame", help="FLAME model (FLAME_with_eye.pt or FLAME .pkl) for FLAME mode")
    b.add_argument("--every", type=int, default=1, help="keep one frame in N")
    b.add_argument("--max-frames", type=int, help="read at most N frames per video")
    b.add_argument("--blur", type=float, default=20.0, help="drop crops with Laplacian variance below this")
    b.add_argument("--min-confidence", type=float, default=0.5)
    b.add_argument("--quality", type=int, default=90, help="JPEG quality of stored crops")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    f = sub.add_parser("fit", help="train GAGAvatar on a built dataset")
    f.add_argument("data", help="dataset folder from `build`")
    f.add_argument("out", help="run folder: latest.pt, log.csv, samples/, tensorboard/")
    f.add_argument("--model", default="full", choices=("full", "tiny"))
    f.add_argument("--batch", type=int, default=8, help="global batch over all ranks")
    f.add_argument("--steps", type=int, default=200_000)
    f.add_argument("--lr", type=float, default=1e-4)
    f.add_argument("--style-lr", type=float, default=1e-5)
    f.add_argument("--decay-steps", type=int, default=200_000)
    f.add_argument("--seed", type=int, default=42)
    f.add_argument("--workers", type=int, default=4)
    f.add_argument("--log-every", type=int, default=50)
    f.add_argument("--sample-every", type=int, default=1000)
    f.add_argument("--checkpoint-every", type=int, default=5000)
    f.add_argument("--init", help="GAGAvatar.pt to start from")
    f.add_argument("--dino", help="DINOv2 ViT-B/14 weights (dinov2_vitb14_pretrain.pth)")
    f.add_argument("--perceptual", help="file with percep_loss.* weights (the published GAGAvatar.pt)")
    f.add_argument("--resume", action="store_true", help="continue from OUT/latest.pt when present")
    args = parser.parse_args(argv)
    try:
        return _build(args) if args.command == "build" else _fit(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
