"""GAGAvatar training on one and two GPUs of one machine: steps/s, scaling efficiency, DDP checks.

`torchrun --nproc_per_node N -m gaga_ros.train fit` is the documented multi-GPU path; only a run on
several GPUs shows whether it pays and whether it trains the same model. One call, one machine:
  1. world 1, batch 8 and world 2, batch 16 (8 per GPU), one after the other, timed after a warm-up;
  2. then side by side, untimed: world 1 at batch 16 on GPU 0; on GPU 1 the same with another noise
     stream after the same initial weights (the run-to-run noise that judges the world-2 curve,
     which sees the very same global batches), and a one-GPU resume of the world-2 checkpoint.
Every run is the command line itself (`gaga_ros.train.__main__.main`) under torchrun, with two hooks
in each process (`worker`): a timestamp after each optimiser step and a record of each torch.save.
gsplat's JIT build runs once first, so it is no part of any run's start-up.
Prints a table and writes bench/results/train_scaling.json (train_scaling_tiny.json with --tiny).
GPU machine (2 GPUs; NVLink multicast is turned off in every process): python
bench/train_scaling_bench.py --data .data/obama (about 8 min on two H200s, gsplat's build included)
CPU smoke (gloo, about 3 min on 2 cores): python bench/train_scaling_bench.py --tiny --steps 2
--warmup 2 --check-steps 3 --resume-steps 1 --batch 1 --workers 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
#: Kept off in every process (the device docs: NVLink multicast can take a shared host's GPUs down).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# --- inside each torchrun process -----------------------------------------------------------------

def worker(argv: list[str]) -> int:
    """Run `python -m gaga_ros.train` with `argv`, recording step times, losses and checkpoint writes.

    SCALING_RECORD names the folder for this rank's record; SCALING_NOISE_SEED, when set, reseeds the
    RNGs after the weights are built (same initial model, other noise maps).
    """
    import torch

    from gaga_ros.train import __main__ as cli
    from gaga_ros.train import trainer as tr

    started = time.monotonic()
    rank = int(os.environ.get("RANK", "0"))
    rec: dict = {"rank": rank, "started": started, "times": [], "losses": [], "saves": []}
    noise_seed = os.environ.get("SCALING_NOISE_SEED")

    real_save = torch.save

    def recorded_save(obj: object, f: object, *args: object, **kwargs: object) -> object:
        if isinstance(f, str | os.PathLike):  # all_gather_object pickles through torch.save to memory
            rec["saves"].append({"path": str(f), "time": time.monotonic()})
        return real_save(obj, f, *args, **kwargs)

    real_init, real_step, real_load = tr.Trainer.__init__, tr.Trainer.train_step, tr.Trainer.load

    def init(self: tr.Trainer, cfg: tr.TrainConfig, gaga_cfg: object = None) -> None:
        real_init(self, cfg, gaga_cfg)
        rec.update(world=self.world, device=str(self.device), frames=len(self.dataset),
                   steps_per_epoch=self.steps_per_epoch, ready=time.monotonic())
        if noise_seed:
            torch.manual_seed(int(noise_seed))

    def step(self: tr.Trainer, batch: dict) -> dict:
        losses = real_step(self, batch)  # ends in a host read of the losses: the step is done
        rec["times"].append(time.monotonic())
        rec["losses"].append(losses)  # fit adds step, epoch and lr to this dict afterwards
        return losses

    def load(self: tr.Trainer, path: object) -> None:
        real_load(self, path)
        rec["resumed_at"] = self.step

    torch.save = recorded_save
    tr.Trainer.__init__, tr.Trainer.train_step, tr.Trainer.load = init, step, load
    code = cli.main(argv)
    rec["ended"] = time.monotonic()
    if torch.cuda.is_available():
        rec["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        rec["gpu"] = torch.cuda.get_device_name()
    folder = Path(os.environ["SCALING_RECORD"])
    (folder / f"rank{rank}.json").write_text(json.dumps(rec))
    return code


# --- the driver -----------------------------------------------------------------------------------

class Run:
    """One torchrun launch: its command, environment, log and, once done, every rank's record."""

    def __init__(self, name: str, folder: Path, world: int, batch: int, steps: int, args: argparse.Namespace,
                 port: int, gpus: str | None, noise_seed: int | None = None, resume: bool = False) -> None:
        self.name, self.world, self.batch, self.steps = name, world, batch, steps
        self.folder = folder / name
        self.record = self.folder / "record"
        self.record.mkdir(parents=True, exist_ok=True)
        self.out = self.folder / "out"
        fit = ["fit", str(args.data), str(self.out), "--batch", str(batch), "--steps", str(steps),
               "--workers", str(args.workers), "--log-every", str(10**9), "--sample-every", "0",
               "--checkpoint-every", "0", "--model", "tiny" if args.tiny else "full"]
        if resume:
            fit.append("--resume")
        self.command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                        str(world), "--master_addr", "127.0.0.1", "--master_port", str(port),
                        str(Path(__file__).resolve()), "worker", *fit]
        self.env = os.environ | NO_MULTICAST | {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1", "SCALING_RECORD": str(self.record), "OMP_NUM_THREADS": "4"}
        if gpus is not None:
            self.env["CUDA_VISIBLE_DEVICES"] = gpus
        if noise_seed is not None:
            self.env["SCALING_NOISE_SEED"] = str(noise_seed)
        self.proc: subprocess.Popen | None = None
        self.ranks: list[dict] = []

    def start(self) -> Run:
        self.launched = time.monotonic()
        self.log = open(self.folder / "log.txt", "w")  # noqa: SIM115 (closed in wait)
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        return self

    def wait(self) -> Run:
        assert self.proc is not None
        code = self.proc.wait()
        self.exited = time.monotonic()
        self.log.close()
        if code:
            tail = (self.folder / "log.txt").read_text()[-4000:]
            raise RuntimeError(f"run {self.name} exited with {code}:\n{tail}")
        self.ranks = [json.loads((self.record / f"rank{r}.json").read_text()) for r in range(self.world)]
        return self

    def totals(self) -> np.ndarray:
        return np.array([x["total"] for x in self.ranks[0]["losses"]])

    def timing(self, warmup: int) -> dict:
        """Steady steps/s after `warmup` steps (rank 0), and the start-up: launch to the first step's end."""
        r0 = self.ranks[0]
        t = np.array(r0["times"])
        timed = len(t) - warmup
        seconds = float(t[-1] - t[warmup - 1])
        steps_per_s = timed / seconds
        dt = np.diff(t)
        epochs = np.array([x["epoch"] for x in r0["losses"]])
        first_of_epoch = np.flatnonzero(np.diff(epochs)) + 1  # index of each epoch's first step
        starts = dt[first_of_epoch[first_of_epoch > warmup] - 1]
        others = np.delete(dt[warmup:], first_of_epoch[first_of_epoch > warmup] - 1 - warmup)
        startup = float(t[0] - self.launched)  # launch, imports, model, process group, first step
        training = float(t[-1] - self.launched)
        return {
            "world": self.world, "batch": self.batch, "per_gpu_batch": self.batch // self.world,
            "steps_timed": timed, "timed_s": round(seconds, 2),
            "training steps/s": round(steps_per_s, 3), "images/s": round(steps_per_s * self.batch, 2),
            "startup_s": round(startup, 2), "warmup_done_s": round(float(t[warmup - 1] - self.launched), 2),
            "process_to_trainer_ready_s": round(r0["ready"] - r0["started"], 2),
            "startup_fraction": round(startup / training, 3), "launch_to_last_step_s": round(training, 1),
            "save_and_exit_s": round(self.exited - float(t[-1]), 2),
            "step_ms_median": round(float(np.median(dt[warmup:])) * 1e3, 1),
            "epoch_first_step_ms_median": round(float(np.median(starts)) * 1e3, 1) if starts.size else None,
            "other_step_ms_median": round(float(np.median(others)) * 1e3, 1) if others.size else None,
            "steps_per_epoch": r0["steps_per_epoch"],
            "peak_memory_gb": [round(r["peak_memory_gb"], 2) for r in self.ranks if "peak_memory_gb" in r],
        }

    def saves(self) -> list[int]:
        """Number of torch.save calls per rank."""
        return [len(r["saves"]) for r in self.ranks]


def compare_curves(two: np.ndarray, one: np.ndarray, one_other_noise: np.ndarray) -> dict:
    """World-2 curve against world 1 at the same global batch, judged by world 1's own run-to-run noise.

    All three runs see the same global batches step for step, so the per-step differences measure
    the training trajectories alone. Noise: rms of (world 1) - (world 1, other noise maps). The
    world-2 curve matches within noise when its rms difference to each world-1 run is at most twice
    that noise rms, and its mean over the last 20 steps lies within 2 noise rms of world 1's.
    """
    n = min(len(two), len(one), len(one_other_noise))
    a, b, c = two[:n], one[:n], one_other_noise[:n]
    noise = float(np.sqrt(np.mean((c - b) ** 2)))
    to_one, to_other = float(np.sqrt(np.mean((a - b) ** 2))), float(np.sqrt(np.mean((a - c) ** 2)))
    tail = min(20, n)
    last = {k: float(np.mean(v[-tail:])) for k, v in (("world 2", a), ("world 1", b),
                                                       ("world 1 other noise", c))}
    ratio = max(to_one, to_other) / max(noise, 1e-12)
    return {"steps": n, "noise_rms": round(noise, 5), "rms_world2_vs_world1": round(to_one, 5),
            "rms_world2_vs_world1_other_noise": round(to_other, 5), "ratio_to_noise": round(ratio, 2),
            "mean_loss_world1": round(float(np.mean(b)), 4),
            "last20_mean": {k: round(v, 4) for k, v in last.items()},
            "within_noise": bool(ratio <= 2.0 and abs(last["world 2"] - last["world 1"]) <= 2 * noise)}


def check_resume(two: Run, resumed: Run) -> dict:
    """The one-GPU run loaded the world-2 checkpoint: it starts at its step, near its final loss."""
    r0 = resumed.ranks[0]
    steps = [x["step"] for x in r0["losses"]]
    before, after = two.totals(), resumed.totals()
    k = min(10, len(before), len(after))
    first, last, now = float(np.mean(before[:k])), float(np.mean(before[-k:])), float(np.mean(after[:k]))
    ok = (r0.get("resumed_at") == two.steps and steps[0] == two.steps + 1 and steps[-1] == resumed.steps
          and abs(now - last) < abs(now - first))
    return {"resumed_at": r0.get("resumed_at"), "first_step": steps[0], "last_step": steps[-1],
            "world2_first_mean": round(first, 4), "world2_last_mean": round(last, 4),
            "resumed_first_mean": round(now, 4), "continues": bool(ok), "saves_per_rank": resumed.saves()}


def gsplat_build() -> float | None:
    """Build (or load) gsplat's CUDA extension once, so no timed run pays its JIT compile."""
    import torch

    if not torch.cuda.is_available():
        return None
    start = time.monotonic()
    env = {"MAX_JOBS": "16", "TORCH_CUDA_ARCH_LIST": "9.0"} | os.environ
    subprocess.run([sys.executable, "-c", "from gsplat.cuda._backend import _C; assert _C is not None"],
                   check=True, env=env)
    return round(time.monotonic() - start, 1)


def machine() -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info |= {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                 "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
        try:
            info["topology"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                              timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["topology"] = f"nvidia-smi topo -m failed: {exc}"
    else:
        info["gpus"] = []
    return info


def write(result: dict, paths: list[Path]) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".data/obama", help="built dataset folder")
    parser.add_argument("--steps", type=int, default=320,
                        help="timed steps of the world 1 and world 2 runs (start-up took 14 s on H200s: "
                             "past ~300 it is under 10 %% of a run)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps (cudnn, allocator)")
    parser.add_argument("--batch", type=int, default=8, help="batch per GPU (published: 8)")
    parser.add_argument("--check-steps", type=int, default=100, help="steps of the world-1 loss-check runs")
    parser.add_argument("--resume-steps", type=int, default=20, help="steps after the resume on one GPU")
    parser.add_argument("--workers", type=int, default=8, help="data loader workers per rank")
    parser.add_argument("--tiny", action="store_true", help="tiny network (CPU smoke)")
    parser.add_argument("--runs", help="folder for the runs (default: a temporary one)")
    parser.add_argument("--mirror", help="folder that also gets the json and the runs' logs after each phase")
    parser.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    args = parser.parse_args()
    args.data = Path(args.data).resolve()

    import torch

    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < 2:
        raise SystemExit(f"needs 2 GPUs, sees {torch.cuda.device_count()}")
    runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="train_scaling_"))
    name = "train_scaling_tiny.json" if args.tiny else "train_scaling.json"
    outputs = [RESULTS / name] + ([Path(args.mirror) / name] if args.mirror else [])
    result: dict = {"commit": args.commit, "machine": machine(), "data": str(args.data), "model":
                    "tiny" if args.tiny else "full", "warmup": args.warmup, "env": NO_MULTICAST}
    result["gsplat_build_s"] = gsplat_build()
    print(f"gsplat build/load {result['gsplat_build_s']} s", flush=True)
    total = args.warmup + args.steps
    gpu = (lambda i: str(i)) if cuda else (lambda i: None)  # noqa: E731

    def mirror_logs() -> None:
        if args.mirror:
            with open(Path(args.mirror) / "run_logs.txt", "w") as f:
                for log in sorted(runs.glob("*/log.txt")):
                    f.write(f"===== {log.parent.name}\n{log.read_text()[-20000:]}\n")

    # 1. timed, alone on the machine
    b1, b2 = args.batch, 2 * args.batch
    one = Run(f"world1_batch{b1}", runs, 1, b1, total, args, 29501, gpu(0)).start().wait()
    result["world 1"] = one.timing(args.warmup)
    print("world 1:", json.dumps(result["world 1"]), flush=True)
    write(result, outputs)
    two = Run(f"world2_batch{b2}", runs, 2, b2, total, args, 29502, "0,1" if cuda else None).start().wait()
    result["world 2"] = two.timing(args.warmup)
    images = result["world 2"]["images/s"], result["world 1"]["images/s"]
    result["scaling efficiency %"] = round(100 * images[0] / (2 * images[1]), 1)
    result["checkpoint writes per rank (world 2)"] = two.saves()
    result["world 2 out files"] = sorted(str(p.relative_to(two.out)) for p in two.out.rglob("*")
                                         if p.is_file())
    print("world 2:", json.dumps(result["world 2"]), flush=True)
    write(result, outputs)
    mirror_logs()

    # 2. untimed checks, side by side: GPU 0 one run, GPU 1 two
    check_a = Run(f"world1_batch{b2}", runs, 1, b2, args.check_steps, args, 29503, gpu(0))
    check_b = Run(f"world1_batch{b2}_noise", runs, 1, b2, args.check_steps, args, 29504, gpu(1),
                  noise_seed=12345)
    resumed = Run("resume_world1", runs, 1, b2, total + args.resume_steps, args, 29505, gpu(1), resume=True)
    resumed.out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(two.out / "latest.pt", resumed.out / "latest.pt")
    for run in (check_a, check_b, resumed):
        run.start()
    for run in (check_a, check_b, resumed):
        run.wait()
    result["loss match"] = compare_curves(two.totals(), check_a.totals(), check_b.totals())
    result["resume"] = check_resume(two, resumed)
    result["rank 0 alone writes checkpoints"] = bool(two.saves()[0] >= 1 and not any(two.saves()[1:]))
    result["curves"] = {f"world 2 batch {b2}": two.totals().round(5).tolist(),
                        f"world 1 batch {b2}": check_a.totals().round(5).tolist(),
                        f"world 1 batch {b2} other noise": check_b.totals().round(5).tolist(),
                        f"world 1 batch {b1}": one.totals().round(5).tolist(),
                        f"resumed world 1 batch {b2}": resumed.totals().round(5).tolist()}
    write(result, outputs)
    mirror_logs()

    w1, w2, lm, rs = result["world 1"], result["world 2"], result["loss match"], result["resume"]
    print(f"\n{'':<28}{'world 1':>12}{'world 2':>12}")
    for k in ("batch", "training steps/s", "images/s", "step_ms_median", "epoch_first_step_ms_median",
              "startup_s", "startup_fraction", "peak_memory_gb"):
        print(f"{k:<28}{str(w1[k]):>12}{str(w2[k]):>12}")
    print(f"scaling efficiency %: {result['scaling efficiency %']}")
    print(f"loss match over {lm['steps']} steps at batch {b2}: rms(w2 - w1) {lm['rms_world2_vs_world1']}, "
          f"rms(w2 - w1 other noise) {lm['rms_world2_vs_world1_other_noise']}, noise rms {lm['noise_rms']} "
          f"(ratio {lm['ratio_to_noise']}), last 20 {lm['last20_mean']}: within noise {lm['within_noise']}")
    print(f"checkpoint writes per rank (world 2): {result['checkpoint writes per rank (world 2)']}; "
          f"files: {result['world 2 out files']}")
    print(f"resume on 1 GPU: at step {rs['resumed_at']}, steps {rs['first_step']}..{rs['last_step']}, "
          f"loss {rs['resumed_first_mean']} (world 2 first {rs['world2_first_mean']}, last "
          f"{rs['world2_last_mean']}): continues {rs['continues']}")
    print(f"machine: {result['machine']['gpus']}, torch {result['machine']['torch']}, commit {args.commit}")


if __name__ == "__main__":
    main()
