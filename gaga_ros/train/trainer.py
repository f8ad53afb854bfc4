"""GAGAvatar training as published (docs/gagavatar.md), on one or many GPUs (torchrun / DDP) or the CPU.

One step: encode the source frame (DINOv2 frozen), generate the expression Gaussians at the target's
FLAME vertices and the dual-lifted ones from the source camera's plane, splat all 32 channels in the
target camera (gsplat on CUDA, differentiable), refine with the StyleUNet, and minimise
img + box + perceptual + lifting losses. Adam with betas (0, 0.99) in the published three parameter
groups, LinearLR 1.0 -> 0.1 over the decay steps, stepped every iteration.

Distributed: `torch.distributed` is initialised from the torchrun environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) with NCCL on CUDA and gloo on the CPU; the global batch is split over
ranks; rank 0 writes logs, samples and checkpoints. Checkpoints hold the published layout (`model`
= state dict with the published keys, `meta_cfg`) plus optimiser, scheduler, step and every rank's
RNG state, so a resumed run continues bit-exactly on the same hardware and world size.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from gaga_ros.avatar.gagavatar import (
    FULL,
    TINY,
    GagaSizes,
    GagaSource,
    GAGAvatar,
    load_state_dict_strict,
    read_state_dict,
)
from gaga_ros.camera import Camera
from gaga_ros.conventions import FLAME_SCALE
from gaga_ros.errors import InputError
from gaga_ros.image import to_uint8
from gaga_ros.train.dataset import PairDataset, PairSampler, steps_per_epoch
from gaga_ros.train.losses import FacePerceptualLoss, GagaLoss, load_perceptual
from gaga_ros.train.splatting import CPU_MAX_RADIUS, splat

MODELS = {"full": FULL, "tiny": TINY}
#: Parameters that no forward pass reaches (docs/gagavatar.md: keys present but unused); frozen so DDP
#: needs no unused-parameter search. They would get no gradient either way.
UNUSED = ("base_model.refinenet.0.resConfUnit1.", "upsampler.toRGB.")
LOSS_NAMES = ("img_loss", "box_loss", "percep_loss", "point_loss", "total")


class TrainError(InputError):
    """A training option, checkpoint or data set that cannot be used; the message says why."""


@dataclass
class TrainConfig:
    """Published defaults (docs/gagavatar.md): batch 8, 200k steps, lr 1e-4 (1e-5 for the style MLP),
    seed 42."""

    data: str
    out: str
    model: str = "full"
    batch_size: int = 8  # global, over all ranks
    steps: int = 200_000
    lr: float = 1e-4
    style_lr: float = 1e-5
    decay_steps: int = 200_000
    end_factor: float = 0.1
    seed: int = 42
    workers: int = 4
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 5000
    init: str | None = None  # a GAGAvatar.pt (published or ours) to start from
    dino: str | None = None  # DINOv2 ViT-B/14 weights (the hub's dinov2_vitb14_pretrain.pth keys)
    perceptual: str | None = None  # a file with percep_loss.* weights (the published GAGAvatar.pt has them)
    cpu_splat_radius: int = CPU_MAX_RADIUS
    randomize_noise: bool = True


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group torchrun describes in the environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), local


def parameter_groups(model: GAGAvatar, lr: float, style_lr: float) -> list[dict]:
    """The published Adam groups: style MLP + final_linear at style_lr; Gaussian heads; the rest."""
    groups: dict[str, list[nn.Parameter]] = {"style": [], "gaussian": [], "rest": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "style_mlp" in name or "final_linear" in name:
            groups["style"].append(p)
        elif "gaussian_conv" in name or ("gs_generator_g" in name and "feature_layers" not in name):
            groups["gaussian"].append(p)
        else:
            groups["rest"].append(p)
    return [{"params": groups["style"], "lr": style_lr, "name": "style"},
            {"params": groups["gaussian"], "lr": lr, "name": "gaussian"},
            {"params": groups["rest"], "lr": lr, "name": "rest"}]


class TrainStep(nn.Module):
    """Forward pass and losses of one batch; the module DDP wraps."""

    def __init__(self, model: GAGAvatar, loss: GagaLoss, splat_radius: int, randomize_noise: bool) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.splat_radius, self.randomize_noise = splat_radius, randomize_noise

    def forward(self, batch: dict[str, torch.Tensor],
                cameras: list[Camera]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        m = self.model
        features = m.base_model(batch["f_image"])
        groups = m.gaussian_groups(features, batch["f_transform"], batch["t_points"],
                                   planes=(batch["f_plane_points"], batch["f_plane_dirs"]))
        splats = []
        for b, camera in enumerate(cameras):
            source = GagaSource.from_groups(groups, batch["f_transform"][b], b)
            splats.append(splat(source.frame_gaussians(batch["t_points"][b]), camera, self.splat_radius))
        rendered = torch.stack(splats)
        coarse = rendered[:, :3]
        refined = m.upsampler(rendered, randomize_noise=self.randomize_noise)
        lifted = torch.cat([groups[1].xyz, groups[2].xyz], dim=1)  # type: ignore[list-item]  # local groups
        terms = self.loss(coarse, refined, batch["t_image"], batch["t_bbox"], batch["t_points"], lifted)
        return terms, coarse.detach(), refined.detach()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    """Builds model, data, optimiser and schedule from a TrainConfig; `fit` trains, `save`/`load` resume.

    gaga_cfg overrides the network size named by cfg.model (tests use small variants of TINY).
    """

    def __init__(self, cfg: TrainConfig, gaga_cfg: GagaSizes | None = None) -> None:
        if cfg.model not in MODELS and gaga_cfg is None:
            raise TrainError(f"model {cfg.model!r}: accepted are {', '.join(MODELS)}")
        self.cfg = cfg
        self.rank, self.world, local = init_distributed()
        if cfg.batch_size < 1 or cfg.batch_size % self.world:
            raise TrainError(f"global batch {cfg.batch_size} must be a positive multiple of the world size "
                             f"{self.world}")
        self.per_rank = cfg.batch_size // self.world
        self.device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        torch.set_float32_matmul_precision("high")  # TF32 on the GPU, as published
        gcfg = gaga_cfg if gaga_cfg is not None else MODELS[cfg.model]
        self.gaga_cfg = dataclasses.replace(gcfg, randomize_noise=cfg.randomize_noise)

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = GAGAvatar(self.gaga_cfg)
        if cfg.init:
            load_state_dict_strict(self.model, read_state_dict(cfg.init))
        if cfg.dino:
            self._load_dino(cfg.dino)
        for name, p in self.model.named_parameters():
            if name.startswith(UNUSED):
                p.requires_grad_(False)
        perceptual = load_perceptual(cfg.perceptual) if cfg.perceptual else None
        self.loss = GagaLoss(perceptual)
        self.step_module = TrainStep(self.model, self.loss, cfg.cpu_splat_radius, cfg.randomize_noise)
        self.step_module.to(self.device)
        self.module: nn.Module = self.step_module
        if self.world > 1:
            self.module = DistributedDataParallel(
                self.step_module, device_ids=[local] if self.device.type == "cuda" else None)
        if self.rank:
            # Every rank seeded `seed` above for identical initial weights; left so, all ranks would draw
            # the same StyleUNet noise maps and the global batch would hold only per-rank-batch distinct
            # noise draws. Rank 0 keeps its stream, so world size 1 is unchanged.
            torch.manual_seed(cfg.seed + self.rank)
        self.optimizer = torch.optim.Adam(parameter_groups(self.model, cfg.lr, cfg.style_lr), lr=cfg.lr,
                                          betas=(0.0, 0.99))
        self.scheduler = torch.optim.lr_scheduler.LinearLR(self.optimizer, 1.0, cfg.end_factor,
                                                           total_iters=cfg.decay_steps)
        self.dataset = PairDataset(cfg.data, self.gaga_cfg.image_size, self.gaga_cfg.render_size, cfg.seed)
        self.steps_per_epoch = steps_per_epoch(len(self.dataset), self.world, self.per_rank)
        if self.steps_per_epoch < 1:
            raise TrainError(f"{len(self.dataset)} frames cannot fill one global batch of {cfg.batch_size}")
        self.step = 0
        self.out = Path(cfg.out)
        self.history: list[dict[str, float]] = []
        self._writer: Any = None  # a SummaryWriter on first use; False when tensorboard is missing
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.loss.substitute:
                print("percep_loss: published perceptual weights not given (--perceptual); using the "
                      "weight-free 1-SSIM SUBSTITUTE, not the paper's loss")
            if not cfg.init and not cfg.dino:
                print("DINOv2 weights not given (--dino or --init): the frozen encoder is random, so "
                      "this run only exercises the pipeline")

    def _load_dino(self, path: str) -> None:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state = blob.get("model", blob) if isinstance(blob, dict) else blob
        prefix = "base_model.dino_model."
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            self.model.base_model.dino_model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise TrainError(f"{path} is not a DINOv2 state dict for this encoder: {exc}") from exc

    # --- one step -----------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step on this rank's part of a global batch; returns losses averaged over ranks."""
        self.module.train()
        cameras = [Camera.from_transform(t.numpy(), self.gaga_cfg.render_size, self.gaga_cfg.focal)
                   for t in batch["t_transform"]]
        # the lifting planes are built on the CPU, as the published data pipeline does (lifting.py)
        points, dirs = self.model.planes(batch["f_transform"])
        batch = {k: v.to(self.device, non_blocking=True)
                 for k, v in (batch | {"f_plane_points": points, "f_plane_dirs": dirs}).items()}
        self.optimizer.zero_grad(set_to_none=True)
        terms, coarse, refined = self.module(batch, cameras)
        terms["total"].backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        values = torch.stack([terms[k].detach() for k in LOSS_NAMES]).double()
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        self._last_images = (batch["t_image"][:1].detach(), coarse[:1], refined[:1])
        return dict(zip(LOSS_NAMES, values.tolist(), strict=True))

    def loader(self, epoch: int, start_batch: int) -> DataLoader:
        """This rank's batches of `epoch`, from batch `start_batch` on."""
        sampler = PairSampler(self.dataset, self.world, self.rank, self.cfg.seed, start_batch * self.per_rank)
        sampler.set_epoch(epoch)
        return DataLoader(self.dataset, batch_size=self.per_rank, sampler=sampler, drop_last=True,
                          num_workers=self.cfg.workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.cfg.seed + epoch))

    def fit(self, steps: int | None = None) -> list[dict[str, float]]:
        """Train until `steps` (default cfg.steps) optimiser steps in total; returns this call's losses."""
        target = self.cfg.steps if steps is None else int(steps)
        done: list[dict[str, float]] = []
        tick, tick_step = time.perf_counter(), self.step
        while self.step < target:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            for batch in self.loader(epoch, offset):
                losses = self.train_step(batch)
                losses["step"], losses["epoch"] = self.step, epoch
                losses["lr"] = float(self.scheduler.get_last_lr()[-1])
                done.append(losses)
                self.history.append(losses)
                if self.step % self.cfg.log_every == 0 or self.step == target:
                    now = time.perf_counter()
                    losses["steps_per_s"] = (self.step - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, self.step
                    self._log(losses)
                if self.cfg.sample_every and self.step % self.cfg.sample_every == 0:
                    self._sample()
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self.save()
                if self.step >= target:
                    break
        return done

    # --- outputs ------------------------------------------------------------------------------------

    def _log(self, losses: dict[str, float]) -> None:
        if self.rank != 0:
            return
        fields = ["step", "epoch", "lr", *LOSS_NAMES, "steps_per_s"]
        path = self.out / "log.csv"
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(losses)
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._writer = False
        if self._writer:
            for k in (*LOSS_NAMES, "lr", "steps_per_s"):
                self._writer.add_scalar(f"train/{k}", losses[k], losses["step"])
        print(f"step {losses['step']}: " + " ".join(f"{k} {losses[k]:.4f}" for k in LOSS_NAMES)
              + f" lr {losses['lr']:.2e} {losses['steps_per_s']:.2f} steps/s", flush=True)

    def _sample(self) -> None:
        """PNG of target | coarse | refined for the first item of this step's batch (rank 0)."""
        if self.rank != 0:
            return
        import cv2

        row = torch.cat([x[0].float().cpu() for x in self._last_images], dim=2)
        image = to_uint8(row).permute(1, 2, 0).numpy()
        (self.out / "samples").mkdir(exist_ok=True)
        cv2.imwrite(str(self.out / "samples" / f"step_{self.step:07d}.png"), image[:, :, ::-1])

    def meta_cfg(self) -> dict:
        """The published checkpoint's meta_cfg (docs/gagavatar.md)."""
        c = self.cfg
        return {"MODEL": {"NAME": "GAGAvatar", "TASK": "reenactment"},
                "OPTIMIZE": {"NAME": "Adam", "LR_DECAY_RATE": c.end_factor, "LR_DECAY_ITER": c.decay_steps,
                             "LEARNING_RATE": c.lr},
                "TRAIN": {"BATCH_SIZE": c.batch_size, "TRAIN_ITER": c.steps,
                          "CHECK_INTERVAL": c.checkpoint_every,
                          "EXP_STR": Path(c.out).name, "TIME_STR": time.strftime("%b%d_%H%M")},
                "DATASET": {"NAME": Path(c.data).name, "LOADER": "gaga_ros.train.dataset.PairDataset",
                            "FLAME_SCALE": FLAME_SCALE, "FOCAL_LENGTH": self.gaga_cfg.focal,
                            "POINT_PLANE_SIZE": self.gaga_cfg.plane_size, "PATH": str(c.data)}}

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's state dict under the published keys; percep_loss.* only with real weights."""
        state = dict(self.model.state_dict())
        if isinstance(self.loss.perceptual, FacePerceptualLoss):
            state |= {f"percep_loss.{k}": v for k, v in self.loss.perceptual.state_dict().items()}
        return state

    def save(self, path: str | Path | None = None) -> Path:
        """Write the resumable checkpoint (rank 0; every rank must call it: RNG states are gathered)."""
        rng: list[Any] = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rng, _rng_state())
        else:
            rng[0] = _rng_state()
        path = Path(path) if path is not None else self.out / "latest.pt"
        if self.rank == 0:
            blob = {"model": self.model_state(), "meta_cfg": self.meta_cfg(),
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "step": self.step, "rng": rng, "world_size": self.world,
                    "train_cfg": dataclasses.asdict(self.cfg), "gaga_cfg": dataclasses.asdict(self.gaga_cfg),
                    "perceptual": ("substitute: 1-SSIM" if self.loss.substitute
                                   else "published FacePerceptualLoss")}
            tmp = path.with_suffix(".tmp")
            torch.save(blob, tmp)
            os.replace(tmp, path)
        if self.world > 1:
            dist.barrier()
        return path

    def load(self, path: str | Path) -> None:
        """Resume from a checkpoint written by `save`: model, optimiser, schedule, step and RNG."""
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(blob, dict) or "optimizer" not in blob:
            raise TrainError(f"{path} is not a resumable training checkpoint (no optimizer state); to start "
                             "from published weights use --init")
        if blob["gaga_cfg"] != dataclasses.asdict(self.gaga_cfg):
            raise TrainError(f"{path} was trained with another network size: {blob['gaga_cfg']}")
        load_state_dict_strict(self.model, blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.step = int(blob["step"])
        rng = blob["rng"]
        if len(rng) == self.world:
            _set_rng_state(rng[self.rank])
        elif self.rank == 0:
            print(f"checkpoint from world size {len(rng)}, now {self.world}: RNG streams restart")

    def close(self) -> None:
        if self._writer:
            self._writer.close()

