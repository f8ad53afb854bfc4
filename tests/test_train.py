"""Training: dataset building from a real video (mesh mode), losses, trainer steps, exact resume, DDP.

The network is a small variant of TINY (56 px source, 64 px render) so CPU steps take ~2 s; the
CPU splatting stands in for gsplat (tested against the compiled rasterizer here).
"""

import dataclasses
import datetime
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gaga_ros.avatar.gagavatar import FULL, TINY, GAGAvatar, load_state_dict_strict
from gaga_ros.camera import Camera, frontal_transform
from gaga_ros.gaussians import Gaussians
from gaga_ros.render import rasterize
from gaga_ros.train.dataset import DatasetError, PairDataset, build_dataset
from gaga_ros.train.losses import FacePerceptualLoss, GagaLoss, box_pixels, lifting_loss
from gaga_ros.train.splatting import splat
from gaga_ros.train.trainer import TrainConfig, Trainer, parameter_groups

TEST_CFG = dataclasses.replace(TINY, image_size=56, render_size=64)
FRAMES = 40
STOP_AT = 14


class Interrupt(RuntimeError):
    pass


def _stop(video, frame):
    if frame == STOP_AT:
        raise Interrupt


@pytest.fixture(scope="module")
def built(media_dir, tmp_path_factory):
    """The first 40 frames of obama.mp4, built with an interruption after frame 14, then resumed."""
    root = tmp_path_factory.mktemp("obama_ds")
    with pytest.raises(Interrupt):
        build_dataset(media_dir / "obama.mp4", root, max_frames=FRAMES, progress=False, on_frame=_stop)
    first = [json.loads(line) for line in (root / "obama" / "progress.jsonl").read_text().splitlines()]
    second = build_dataset(media_dir / "obama.mp4", root, max_frames=FRAMES, progress=False)
    third = build_dataset(media_dir / "obama.mp4", root, max_frames=FRAMES, progress=False)
    return root, first, second, third


def test_builder_resumes_without_redoing_work(built):
    root, first, second, third = built
    assert len(first) == STOP_AT + 1
    assert second.frames_processed == FRAMES - (STOP_AT + 1)
    assert third.frames_processed == 0 and third.skipped_videos == ["obama"]
    index = json.loads((root / "obama" / "index.json").read_text())
    assert index["frames_processed"] == FRAMES
    assert index["frames"] + sum(index["dropped"].values()) == FRAMES
    assert index["frames"] >= 30  # a clear talking-head video: few drops
    with np.load(root / "obama" / "records.npz") as rec:
        frames, offsets, lengths = rec["frame"], rec["offset"], rec["length"]
        assert np.all(np.diff(frames) > 0) and frames[-1] < FRAMES
        assert np.array_equal(offsets[1:], offsets[:-1] + lengths[:-1])  # no duplicate after the resume
        assert rec["transform"].shape == (len(frames), 3, 4)
        assert rec["landmarks"].shape == (len(frames), 478, 3)
        assert np.all((rec["bbox"] >= 0) & (rec["bbox"] <= 1))
        assert 7.0 < np.median(rec["transform"][:, 2, 3]) < 12.0  # GAGAvatar camera distance (~9)
    assert (root / "obama" / "frames.bin").stat().st_size == offsets[-1] + lengths[-1]
    assert np.load(root / "obama" / "vertices.npy").shape == (len(frames), 5023, 3)
    assert not (root / "obama" / "progress.jsonl").exists()


def test_built_crops_hold_a_centred_face(built):
    from gaga_ros.tracking.landmarks import FaceLandmarker

    ds = PairDataset(built[0], 518, 512)
    item = ds.pair(len(ds) // 2)
    crop = (item["t_image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert crop.shape == (512, 512, 3)
    with FaceLandmarker(static_image_mode=True) as lm:
        faces = lm.detect(crop)
    assert faces, "no face in a stored crop"
    centre = faces[0].points[:, :2].mean(0)
    assert np.all(np.abs(centre - 256) < 80)
    assert item["source_frame"] != item["target_frame"]
    assert item["f_image"].shape == (3, 518, 518)


def test_pairs_are_deterministic_and_from_the_same_video(built):
    ds = PairDataset(built[0], 56, 64, seed=3)
    a, b = ds[5], ds[5]
    assert torch.equal(a["f_image"], b["f_image"]) and a["source_frame"] == b["source_frame"]
    sources = {int(ds[5 + e * len(ds)]["source_frame"]) for e in range(6)}
    assert len(sources) > 1  # a new source each epoch
    with pytest.raises(DatasetError, match="not a built dataset"):
        PairDataset(built[0] / "obama", 56, 64)


def test_lifting_loss_zero_on_vertices_positive_elsewhere():
    g = torch.Generator().manual_seed(0)
    verts = torch.rand(2, 300, 3, generator=g)
    far = torch.rand(2, 1000, 3, generator=g) + 5
    lifted = torch.cat([far[:, :500], verts.flip(1), far[:, 500:]], dim=1).requires_grad_()
    assert lifting_loss(verts, lifted, chunk=64).item() == 0.0
    moved = (lifted.detach() + 0.01 * torch.randn(lifted.shape, generator=g)).requires_grad_()
    loss = lifting_loss(verts, moved, chunk=64)
    d = np.linalg.norm(verts.numpy()[:, :, None] - moved.detach().numpy()[:, None], axis=-1).min(-1)
    assert loss.item() == pytest.approx(10 * (d**2).mean(), rel=1e-4)
    loss.backward()
    assert moved.grad.abs().sum() > 0


def test_box_follows_spec():
    assert box_pixels(torch.tensor([[0.25, 0.25, 0.75, 0.75]]), 512) == [(115, 115, 396, 396)]
    # a box near the edge is capped to stay inside the image: side <= 2 * cx
    x0, y0, x1, y1 = box_pixels(torch.tensor([[0.0, 0.3, 0.2, 0.5]]), 100)[0]
    assert x0 == 0 and x1 == 20 and (y1 - y0) == 20


def test_cpu_splat_matches_compiled_rasterizer_and_has_gradients():
    g = torch.Generator().manual_seed(1)
    n = 400
    means = (torch.rand(n, 3, generator=g) - 0.5) * 1.2
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=1)
    scales = torch.rand(n, 3, generator=g) * 0.01 + 0.002
    gauss = Gaussians(means.requires_grad_(), quats, scales, torch.rand(n, generator=g) * 0.9,
                      torch.rand(n, 32, generator=g).requires_grad_())
    camera = Camera.from_transform(frontal_transform(), 64, 12.0)
    ours = splat(gauss, camera, max_radius=8)
    ref = rasterize(gauss, camera, backend="cpu").image.permute(2, 0, 1)
    assert (ours.detach() - ref).abs().max() < 1e-4
    ours[:3].sum().backward()
    assert gauss.means.grad.abs().sum() > 0 and gauss.colors.grad[:, :3].abs().sum() > 0
    assert gauss.colors.grad[:, 3:].abs().sum() == 0


def test_published_parameter_groups_and_checkpoint_keys(reference_dir):
    with torch.device("meta"):
        model = GAGAvatar(FULL)
        percep = FacePerceptualLoss()
    groups = parameter_groups(model, 1e-4, 1e-5)
    sizes = [sum(p.numel() for p in g["params"]) / 1e6 for g in groups]
    assert [g["lr"] for g in groups] == [1e-5, 1e-4, 1e-4]
    assert sizes[0] == pytest.approx(4.20, abs=0.01) and sizes[1] == pytest.approx(1.40, abs=0.01)
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    keys |= {f"percep_loss.{k}": list(v.shape) for k, v in percep.state_dict().items()}
    rows = [line.split("\t") for line in (reference_dir / "state_dict_keys.tsv").read_text().splitlines()]
    published = {r[0]: json.loads(r[1]) for r in rows if len(r) >= 2 and r[1].startswith("[")}
    assert keys == published


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), model="tiny", batch_size=1, steps=4, workers=0, log_every=1,
                sample_every=2, checkpoint_every=0)
    return TrainConfig(**(base | kw))


def test_training_lowers_the_loss_on_one_pair(built, tmp_path):
    trainer = Trainer(_cfg(built[0], tmp_path, lr=1e-3, style_lr=1e-4, randomize_noise=False), TEST_CFG)
    batch = next(iter(trainer.loader(0, 0)))
    totals = [trainer.train_step(batch)["total"] for _ in range(10)]
    assert np.mean(totals[-3:]) < np.mean(totals[:3])
    assert all(np.isfinite(totals))


def test_resume_is_bit_exact(built, tmp_path):
    straight = Trainer(_cfg(built[0], tmp_path / "a"), TEST_CFG)
    losses_a = straight.fit(4)
    first = Trainer(_cfg(built[0], tmp_path / "b"), TEST_CFG)
    losses_b = first.fit(2)
    path = first.save()
    resumed = Trainer(_cfg(built[0], tmp_path / "b"), TEST_CFG)
    resumed.load(path)
    assert resumed.step == 2
    losses_b += resumed.fit(4)
    assert [x["total"] for x in losses_a] == [x["total"] for x in losses_b]
    for (name, pa), pb in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(),
                              strict=True):
        assert torch.equal(pa, pb), name
    # the published layout: a strict load into a fresh model, meta_cfg, logs and samples on disk
    blob = torch.load(path, weights_only=False)
    load_state_dict_strict(GAGAvatar(TEST_CFG), blob["model"])
    assert blob["meta_cfg"]["MODEL"]["NAME"] == "GAGAvatar" and blob["perceptual"].startswith("substitute")
    assert (tmp_path / "b" / "log.csv").read_text().count("\n") == 5
    assert (tmp_path / "b" / "samples" / "step_0000002.png").is_file()


def _one_step(data, out, items: list[int], dtype: torch.dtype = torch.float32):
    """Losses and gradients of one step on `items` of the first global batch of 2, on one rank."""
    trainer = Trainer(_cfg(data, out, batch_size=2, randomize_noise=False, sample_every=0), TEST_CFG)
    batch = {k: v[items] for k, v in next(iter(trainer.loader(0, 0))).items()}
    if dtype != torch.float32:
        trainer.step_module.to(dtype)  # the model and the loss (its SSIM window)
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    losses = trainer.train_step(batch)
    return losses, {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_batch_gradient_is_the_mean_of_item_gradients(built, tmp_path):
    """The maths DDP relies on: the loss of a batch is the mean of its items' losses, so the batch
    gradient is the mean of the item gradients. Checked in float64, where summation order changes a
    gradient by about u = 1.1e-16 times its cancellation factor (here <= 1e5, measured: float32 runs
    of this check differ by up to 1.3e-3 of a tensor's largest entry, 2e4 u32); 1e-8 of the tensor's
    largest entry allows a factor 1e8, while a term that couples the items would differ at O(1)."""
    batch_losses, batch_grads = _one_step(built[0], tmp_path, [0, 1], torch.float64)
    items = [_one_step(built[0], tmp_path, [i], torch.float64) for i in (0, 1)]
    assert batch_losses["total"] == pytest.approx((items[0][0]["total"] + items[1][0]["total"]) / 2,
                                                  rel=1e-12)
    assert batch_grads.keys() == items[0][1].keys() == items[1][1].keys()
    for name, g in batch_grads.items():
        mean = (items[0][1][name] + items[1][1][name]) / 2
        assert (g - mean).abs().max() <= 1e-8 * g.abs().max(), name


def _ddp_worker(rank: int, world: int, store: str, data: str, out: str) -> None:
    torch.set_num_threads(1)  # as the reference: the same kernels make the same sums
    # A file rendezvous: no port to race for; a timeout so a lost peer fails the test instead of hanging.
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(minutes=5))
    try:
        trainer = Trainer(_cfg(data, out, batch_size=2, randomize_noise=False, sample_every=0), TEST_CFG)
        losses = trainer.train_step(next(iter(trainer.loader(0, 0))))
        if rank == 0:
            grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
            torch.save({"losses": losses, "grads": grads}, os.path.join(out, "ddp.pt"))
        torch.distributed.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.usefixtures("one_torch_thread")
def test_ddp_two_ranks_average_the_ranks_gradients_exactly(built, tmp_path):
    """Two gloo ranks with one item each give exactly the mean of the two one-item gradients: DDP
    divides each rank's gradient by 2 (exact in binary) and sums two numbers (commutative), and each
    rank computes its item as one rank alone does, on one thread. That the mean equals the batch
    gradient is the maths checked above in float64."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(built[0]), str(tmp_path)), nprocs=2,
             join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    items = [_one_step(built[0], tmp_path / "one", [i]) for i in (0, 1)]
    assert ddp["losses"]["total"] == (items[0][0]["total"] + items[1][0]["total"]) / 2
    assert ddp["grads"].keys() == items[0][1].keys()
    for name, g in ddp["grads"].items():
        assert torch.equal(g, (items[0][1][name] + items[1][1][name]) / 2), name


def test_gaga_loss_rejects_mismatched_images():
    with pytest.raises(ValueError, match="must be equal"):
        GagaLoss()(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4),
                   torch.zeros(1, 4), torch.zeros(1, 5, 3), torch.zeros(1, 5, 3))


@pytest.mark.gpu
def test_tiny_training_on_cuda_uses_gsplat(built, tmp_path):
    trainer = Trainer(_cfg(built[0], tmp_path, steps=3), TINY)
    losses = trainer.fit()
    assert all(np.isfinite(x["total"]) for x in losses)
    assert trainer.model.gs_generator_l0.gaussian_conv[0].weight.grad.abs().sum() > 0
