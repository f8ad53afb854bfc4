"""Loading the published GAGAvatar.pt, and the deterministic weight fill of the reference vectors.

The published file is a Lightning Fabric dict: `model` = the full state dict (597 keys, docs/gagavatar.md) and
`meta_cfg`. Every key inference uses must be present with the published shape; the perceptual-loss
networks (`percep_loss.*`) are training-only and skipped.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from gaga_ros.errors import InputError

#: models/GAGAvatar.pt in the repository (source checkout).
DEFAULT_PATH = Path(__file__).resolve().parents[3] / "models" / "GAGAvatar.pt"
DOWNLOAD_URL = "https://huggingface.co/xg-chu/GAGAvatar/resolve/main/assets/GAGAvatar.pt"
TRAINING_ONLY_PREFIXES = ("percep_loss.",)
_HOW_TO_GET = (f"download the published weights (about 750 MB) from {DOWNLOAD_URL} and put them at "
               f"{DEFAULT_PATH} (models/GAGAvatar.pt in the repository), or pass its path")


class CheckpointError(InputError):
    """The GAGAvatar checkpoint is missing, unreadable, or does not fit the published layout."""


def read_state_dict(path: str | Path = DEFAULT_PATH) -> dict[str, torch.Tensor]:
    """The inference state dict of a published GAGAvatar.pt (training-only keys dropped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GAGAvatar checkpoint not found at {path}: {_HOW_TO_GET}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({exc}); expected the "
                              f"published GAGAvatar.pt: {_HOW_TO_GET}") from exc
    if not isinstance(blob, Mapping) or not isinstance(blob.get("model"), Mapping):
        keys = list(blob)[:5] if isinstance(blob, Mapping) else type(blob).__name__
        raise CheckpointError(f"{path} is not a GAGAvatar checkpoint: expected a dict with a 'model' "
                              f"state dict (and 'meta_cfg'), found {keys}")
    meta = blob.get("meta_cfg")
    if isinstance(meta, Mapping):
        name = meta.get("MODEL", {}).get("NAME")
        plane = meta.get("DATASET", {}).get("POINT_PLANE_SIZE")
        if name not in (None, "GAGAvatar") or plane not in (None, 296):
            raise CheckpointError(f"{path} holds a {name!r} model with plane size {plane}; only the "
                                  f"published GAGAvatar (plane 296) is supported")
    return {k: v for k, v in blob["model"].items() if not k.startswith(TRAINING_ONLY_PREFIXES)}


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into `model`, requiring exactly the model's keys and shapes."""
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        details = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                   for label, keys in (("missing", missing), ("unexpected", unexpected),
                                       ("wrong shape", wrong)) if keys]
        raise CheckpointError("state dict does not match the GAGAvatar layout: " + "; ".join(details))
    model.load_state_dict(state, strict=True)


def reference_fill(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Deterministic weights of the reference data (docs/gagavatar.md): per-key CPU generator seeded
    with crc32(key), uniform in [-s, s], s = 0.25 for <=1-D, 1 for noise maps, else sqrt(3 / fan_in)."""
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        gen = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
        u = torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1
        numel = 1
        for n in shape:
            numel *= n
        if len(shape) <= 1:
            scale = 0.25
        elif ".noises.noise" in key:
            scale = 1.0
        else:
            scale = (3 / (numel // shape[0])) ** 0.5
        out[key] = u * scale
    return out
