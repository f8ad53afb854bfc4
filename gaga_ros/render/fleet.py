"""One render process serving many avatars: each one's newest expression, rendered in rounds.

A `Fleet` holds members by key (the fleet node keys them by ROS namespace). Each member has one
slot for its newest expression (a newer one replaces it unread, as the render node's mailbox does).
A round takes every member's unread expression and renders them: GAGAvatar avatars on CUDA with the
fast path go through shared FastRenderer batches, all of a batch's slots in one batched frame; every
other avatar (the geometric backend, the CPU, other sizes) renders in turn. A member is in a round
only when it has an expression to show and an avatar to show it on, so one whose avatar failed to
build, whose publishers vanished or whose expressions stopped costs the others nothing; a member whose
render raises is reported in the round and the rest of the round goes on.

What a join costs (`set_avatar`): the avatar's upload to the device; for a GAGAvatar member, a
`source` copy into a free slot of an existing batch (its Gaussians and covariances: about 1 ms on
the H200, `fast join (set_source)` in bench/fast_bench.py; nothing recaptured for the others), or,
when every batch is full (the first such avatar, or more than `slots`), a new FastRenderer batch:
its buffers and CUDA graph captures (seconds, once; the running avatars pause for it, since capture
needs the device to itself). A leave clears the slot; the last member of a batch frees the batch.

Memory: before a join takes memory, the fleet compares what the avatar needs (its tensors, plus a
new batch's buffers when one is needed) with what is available: the device's free memory on CUDA and,
with `memory_cap_mb`, the cap less what the fleet's avatars and batches already hold. A join that
does not fit, or that runs out of device memory while building, is refused with MemoryRefused naming
both figures; the members already serving are untouched.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gaga_ros.avatar.base import Avatar, AvatarError
from gaga_ros.errors import InputError
from gaga_ros.expression import Expression

MIB = 2**20
#: Slots of one GAGAvatar batch: the fast path's measured sweet spot is 16 avatars per batched frame.
DEFAULT_SLOTS = 16


class MemoryRefused(AvatarError):
    """A join that does not fit in memory; `needed` and `available` are bytes."""

    def __init__(self, key: str, needed: int, available: int, why: str) -> None:
        self.needed, self.available = needed, available
        super().__init__(f"{key}: join refused: needs {needed / MIB:.1f} MiB, {available / MIB:.1f} MiB "
                         f"available ({why}); the avatars already serving keep their memory")


@dataclass
class Frame:
    """One rendered image: the member's key, the expression it shows, RGB uint8 (H, W, 3)."""

    key: str
    expression: Expression
    image: np.ndarray


@dataclass
class Round:
    """What one round rendered, and the members whose frame failed (key -> what was raised)."""

    frames: list[Frame] = field(default_factory=list)
    errors: dict[str, Exception] = field(default_factory=dict)


@dataclass
class Member:
    """One served avatar: its backend, the avatar on the device, its unread expression."""

    key: str
    avatar: Avatar | None = None
    #: The member's backend stream: render() for every backend; to_flame(), flame_inputs() and source()
    #: too for a batched GAGAvatar one.
    backend: Any = None
    pending: Expression | None = None
    #: (batch, slot) for a GAGAvatar member on the fast path, else None (rendered in turn).
    slot: tuple[_Batch, int] | None = None
    nbytes: int = 0
    error: str = ""
    frames: int = 0
    dropped: int = 0


class _Batch:
    """A FastRenderer whose slots hold the sources of up to `capacity` avatars of one model; a slot
    without an owner is cleared (an empty splat, still rendered with the others) and not published."""

    def __init__(self, renderer, nbytes: int) -> None:
        self.renderer = renderer
        self.owners: list[str | None] = [None] * renderer.batch
        self.nbytes = nbytes
        self.vertices: torch.Tensor | None = None  # (B, 5023, 3): each slot's latest inputs
        self.transforms: torch.Tensor | None = None  # (B, 3, 4)

    def free_slot(self) -> int | None:
        return next((i for i, owner in enumerate(self.owners) if owner is None), None)


def avatar_bytes(avatar: Avatar) -> int:
    """Bytes an avatar's tensors take on a device."""
    g, b = avatar.gaussians, avatar.binding
    tensors = (g.means, g.quats, g.scales, g.opacities, g.colors, b.triangle, b.barycentric, b.offset,
               b.follow, avatar.neutral_vertices, avatar.triangles)
    return sum(t.numel() * t.element_size() for t in tensors)


def batch_bytes(slots: int, gaussians: int, channels: int, size: int) -> int:
    """A FastRenderer batch's own buffers (fast.py): per slot the Gaussians (means, covariances,
    opacities, features), the splat and refined images and two pinned readback buffers. The refiner's
    activations come on top; the measured size of the first batch replaces this for later ones."""
    per_gaussian = (3 + 9 + 1 + channels) * 4
    per_pixel = channels * 4 + 3 * 4 + 3 + 2 * 3
    return slots * (gaussians * per_gaussian + size * size * per_pixel)


class Fleet:
    """Many avatars, one device. Thread-safe: put() from callbacks, rounds from one worker thread.

    make_backend(name) builds the backend for avatars of backend `name`; it is called once per name,
    and each member renders through that backend's `stream()` when it has one (its own converter
    state, the shared model), else through the shared backend itself.
    """

    def __init__(self, make_backend: Callable[[str], Any], device: str = "cpu", size: int = 512,
                 slots: int = DEFAULT_SLOTS, memory_cap_mb: float = 0.0) -> None:
        if slots < 1:
            raise InputError(f"slots {slots}: accepted is at least 1")
        self.make_backend = make_backend
        self.device = torch.device(device)
        self.size = size
        self.slots = slots
        self.memory_cap = int(memory_cap_mb * MIB) if memory_cap_mb > 0 else 0
        self.members: dict[str, Member] = {}
        self.batches: list[_Batch] = []
        self._backends: dict[str, Any] = {}
        self._backend_lock = threading.Lock()  # two avatars arriving at once load one model
        self._lock = threading.Condition()  # members and their pending expressions
        self._device_lock = threading.Lock()  # rounds and batch changes: one user of the device

    # ---- membership ------------------------------------------------------------------------------

    def join(self, key: str) -> Member:
        """Add member `key` (no avatar yet: it is in no round until set_avatar); idempotent."""
        with self._lock:
            return self.members.setdefault(key, Member(key))

    def leave(self, key: str) -> None:
        """Remove member `key`, freeing its slot (and its batch when it was the last one there)."""
        with self._device_lock, self._lock:
            member = self.members.pop(key, None)
            if member is not None:
                self._release(member)

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self.members)

    def snapshot(self) -> list[Member]:
        """The members now (for reports; their counters keep changing)."""
        with self._lock:
            return list(self.members.values())

    def used_bytes(self) -> int:
        """Memory the fleet holds: its avatars and its batches."""
        with self._lock:
            return sum(m.nbytes for m in self.members.values()) + sum(b.nbytes for b in self.batches)

    def available_bytes(self) -> int:
        """What a join may take: the device's free memory (CUDA) and the cap less what is held."""
        free = math.inf
        if self.device.type == "cuda":
            idle, _ = torch.cuda.mem_get_info(self.device)
            free = idle + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if self.memory_cap:
            free = min(free, self.memory_cap - self.used_bytes())
        return int(max(0, free)) if free != math.inf else 2**62

    def set_avatar(self, key: str, avatar: Avatar) -> None:
        """Serve `avatar` (on any device; moved here) for member `key`, joining it if needed.

        Raises AvatarError (or a subclass: MemoryRefused) when it cannot; the member keeps its previous
        avatar then, and every other member is untouched.
        """
        member = self.join(key)
        if member.avatar is not None and member.avatar.avatar_id == avatar.avatar_id:
            return
        backend = self._stream(avatar.backend)
        batched = self._batched(backend)
        needed = avatar_bytes(avatar)
        with self._device_lock:
            new_batch = batched and not any(b.free_slot() is not None for b in self.batches)
            if new_batch:
                needed += self._batch_estimate(avatar)
            held = member.nbytes  # the previous avatar's memory comes back when this one replaces it
            available = self.available_bytes() + held
            if needed > available:
                raise MemoryRefused(key, needed, available, self._limit())
            try:
                on_device = avatar.to(self.device)
                slot = self._place(key, backend, on_device) if batched else None
            except torch.OutOfMemoryError as exc:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise MemoryRefused(key, needed, self.available_bytes() + held,
                                    f"out of device memory: {str(exc).splitlines()[0][:160]}") from None
            with self._lock:
                self._release(member)
                member.avatar, member.backend, member.slot = on_device, backend, slot
                member.nbytes, member.error = avatar_bytes(on_device), ""

    def fail(self, key: str, reason: str) -> None:
        """Record that member `key`'s avatar could not be used (it keeps serving a previous one)."""
        with self._lock:
            if key in self.members:
                self.members[key].error = reason

    # ---- expressions and rounds ------------------------------------------------------------------

    def put(self, key: str, expression: Expression) -> None:
        """Member `key`'s newest expression; an unread older one is dropped (counted)."""
        with self._lock:
            member = self.members.get(key)
            if member is None:
                raise KeyError(f"{key} is not a member of this fleet")
            if member.pending is not None:
                member.dropped += 1
            member.pending = expression
            self._lock.notify()

    def wait(self, timeout: float) -> bool:
        """Until some member with an avatar has an unread expression (True) or `timeout` passes."""
        with self._lock:
            return self._lock.wait_for(self._ready, timeout)

    def _ready(self) -> bool:
        return any(m.pending is not None and m.avatar is not None for m in self.members.values())

    def wake(self) -> None:
        """Wake a wait() now (the worker is stopping)."""
        with self._lock:
            self._lock.notify_all()

    def render_round(self) -> Round:
        """Render every member's unread expression once: batched GAGAvatar slots in one frame per
        batch, the others in turn. Failures are per member (Round.errors); nothing raises."""
        out = Round()
        with self._device_lock:
            with self._lock:
                work = [(m, m.pending) for m in self.members.values()
                        if m.pending is not None and m.avatar is not None]
                for m, _ in work:
                    m.pending = None
            for batch in self.batches:
                self._render_batch(batch, [(m, e, m.slot[1]) for m, e in work
                                           if m.slot is not None and m.slot[0] is batch], out)
            for member, expr in work:
                if member.slot is None:
                    self._render_one(member, expr, out)
        with self._lock:
            for frame in out.frames:
                shown = self.members.get(frame.key)
                if shown is not None:
                    shown.frames += 1
                    shown.error = ""
            for key, exc in out.errors.items():
                if key in self.members:
                    self.members[key].error = str(exc) or type(exc).__name__
        return out

    def _render_one(self, member: Member, expr: Expression, out: Round) -> None:
        try:
            image = member.backend.render(member.avatar, expr, size=self.size)
        except Exception as exc:  # noqa: BLE001 - one member's failure is reported, not the round's
            out.errors[member.key] = exc
            return
        out.frames.append(Frame(member.key, expr, image))

    def _render_batch(self, batch: _Batch, work: list[tuple[Member, Expression, int]], out: Round) -> None:
        shown = []
        for member, expr, slot in work:
            try:  # each member's own MESH -> FLAME converter; one member's failure is its own
                shown.append((member, expr, member.backend.to_flame(expr), slot))
            except Exception as exc:  # noqa: BLE001 - this slot keeps its last inputs, unpublished
                out.errors[member.key] = exc
        if not shown:
            return
        try:
            # One FLAME pass for the batch's members (the streams share the model and FLAME).
            vertices, transforms = shown[0][0].backend.flame_inputs([m.avatar for m, _, _, _ in shown],
                                                                   [flame for _, _, flame, _ in shown])
            if batch.vertices is None or batch.transforms is None:
                batch.vertices = vertices[:1].expand(batch.renderer.batch, *vertices.shape[1:]).clone()
                batch.transforms = transforms[:1].expand(batch.renderer.batch, 3, 4).clone()
            slots = torch.tensor([slot for _, _, _, slot in shown], device=vertices.device)
            batch.vertices[slots] = vertices
            batch.transforms[slots] = transforms
            images = batch.renderer.render(batch.vertices, batch.transforms)
        except Exception as exc:  # noqa: BLE001 - the batch's members fail this round, others go on
            for member, _, _, _ in shown:
                out.errors[member.key] = exc
            return
        for member, expr, _, slot in shown:
            out.frames.append(Frame(member.key, expr, images[slot].copy()))

    # ---- internals -------------------------------------------------------------------------------

    def _stream(self, name: str):
        """A backend for one more member of backend `name` (AvatarError when there is none)."""
        with self._backend_lock:
            shared = self._backends.get(name)
            if shared is None:
                shared = self._backends[name] = self.make_backend(name)
        stream = getattr(shared, "stream", None)
        return stream() if stream is not None else shared

    def _batched(self, backend) -> bool:
        """Whether this backend's avatars go through FastRenderer batches (GAGAvatar, CUDA, fast path,
        the model's own render size)."""
        return (getattr(backend, "fast", False) and hasattr(backend, "flame_inputs")
                and self.size == backend.model.cfg.render_size)

    def _batch_estimate(self, avatar: Avatar) -> int:
        if self.batches:
            return max(b.nbytes for b in self.batches)
        return batch_bytes(self.slots, len(avatar), int(avatar.gaussians.colors.shape[1]), self.size)

    def _limit(self) -> str:
        parts = []
        if self.device.type == "cuda":
            parts.append(f"free on {self.device}")
        if self.memory_cap:
            parts.append(f"memory_cap_mb {self.memory_cap / MIB:g} less {self.used_bytes() / MIB:.1f} MiB "
                         "held")
        return ", ".join(parts) or "no limit set"

    def _place(self, key: str, backend, avatar: Avatar) -> tuple[_Batch, int]:
        """Put the avatar's source in a free batch slot, making a new batch when all are full."""
        source = backend.source(avatar)
        for batch in self.batches:
            slot = batch.free_slot()
            if slot is not None:
                batch.renderer.set_source(slot, source)
                batch.owners[slot] = key
                return batch, slot
        from gaga_ros.avatar.gagavatar.fast import FastRenderer

        before = torch.cuda.memory_allocated(self.device)
        renderer = FastRenderer(backend.model, [source] + [None] * (self.slots - 1),
                                compile_mode=backend.compile_mode)
        batch = _Batch(renderer, torch.cuda.memory_allocated(self.device) - before)
        batch.owners[0] = key
        self.batches.append(batch)
        return batch, 0

    def _release(self, member: Member) -> None:
        """Free what the member holds (caller holds both locks, or the device lock before the member
        is visible to rounds)."""
        if member.slot is not None:
            batch, slot = member.slot
            batch.owners[slot] = None
            if all(owner is None for owner in batch.owners):
                self.batches.remove(batch)
            else:
                batch.renderer.clear_slot(slot)
        member.slot, member.avatar, member.nbytes = None, None, 0

