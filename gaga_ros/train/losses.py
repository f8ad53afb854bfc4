"""GAGAvatar's training losses (docs/gagavatar.md): image, box, perceptual and lifting terms.

The perceptual term uses the published FacePerceptualLoss structure (AlexNet + VGG-Face features,
unit-normalised, weighted L1) when its weights are available: they ship inside the published
GAGAvatar.pt as `percep_loss.*`, or in any file holding those keys. They cannot be downloaded here;
without them a weight-free substitute, 1 - SSIM (Gaussian window 11, sigma 1.5), takes its place at
the same 1e-2 weight. That substitute is flagged in logs and checkpoints: it is not the paper's loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gaga_ros.errors import InputError

#: Per-layer weights of the perceptual loss; the VGG-Face branch uses half of them.
LAYER_WEIGHTS = (0.1, 0.1, 1.0, 1.0, 1.0)
PERCEPTUAL_WEIGHT = 1e-2
POINT_WEIGHT = 10.0
BOX_SCALE = 1.1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGGFACE_MEAN = (129.186279296875, 104.76238250732422, 93.59396362304688)
#: VGG16 `features` layout: conv widths with "M" for max-pooling (31 modules).
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
#: ReLU outputs relu_1_1 ... relu_5_1 of VGG16 `features`.
_VGG_TAPS = (1, 6, 11, 18, 25)


class LossInputError(InputError):
    """Loss inputs of the wrong shape, or a perceptual weight file without the published keys."""


def lifting_loss(vertices: torch.Tensor, lifted: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """10 x mean over vertices of the squared distance to the nearest lifted point (docs/gagavatar.md).

    vertices (B,V,3), lifted (B,M,3). The nearest point is found without gradient, in chunks of
    vertices so the (chunk, M) distance block stays small (no faiss); the gradient reaches `lifted`.
    """
    if vertices.ndim != 3 or lifted.ndim != 3 or vertices.shape[-1] != 3 or lifted.shape[-1] != 3 \
            or vertices.shape[0] != lifted.shape[0]:
        raise LossInputError(f"lifting_loss needs vertices (B,V,3) and lifted points (B,M,3), got "
                             f"{tuple(vertices.shape)} and {tuple(lifted.shape)}")
    with torch.no_grad():
        index = torch.cat([torch.cdist(vertices[:, s:s + chunk], lifted).argmin(-1)
                           for s in range(0, vertices.shape[1], chunk)], dim=1)
    nearest = torch.gather(lifted, 1, index[..., None].expand(-1, -1, 3))
    return POINT_WEIGHT * (vertices - nearest).pow(2).sum(-1).mean()


def box_pixels(bbox: torch.Tensor, size: int) -> list[tuple[int, int, int, int]]:
    """Integer crop boxes (x0, y0, x1, y1) in a size x size image from head boxes (B,4) in [0,1]:
    a square of 1.1 sqrt(w h) around the centre, capped to stay inside the image (docs/gagavatar.md)."""
    boxes = []
    for x0, y0, x1, y1 in bbox.detach().double().cpu().tolist():
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        side = BOX_SCALE * max((x1 - x0) * (y1 - y0), 0.0) ** 0.5
        side = min(side, 2 * cx, 2 * cy, 2 * (1 - cx), 2 * (1 - cy))
        box = [min(max(v, 0.0), 1.0) * size for v in (cx - side / 2, cy - side / 2,
                                                       cx + side / 2, cy + side / 2)]
        bx0, by0, bx1, by1 = (int(v) for v in box)
        boxes.append((bx0, by0, max(bx1, bx0 + 1), max(by1, by0 + 1)))
    return boxes


def box_crops(images: torch.Tensor, boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """Crop each image (B,C,S,S) to its box and resize back to S x S (bilinear, antialiased)."""
    size = images.shape[-1]
    return torch.cat([F.interpolate(img[None, :, y0:y1, x0:x1], size=(size, size), mode="bilinear",
                                    align_corners=False, antialias=True)
                      for img, (x0, y0, x1, y1) in zip(images, boxes, strict=True)])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


def _layer_distance(fa: list[torch.Tensor], fb: list[torch.Tensor],
                    weights: tuple[float, ...]) -> torch.Tensor:
    terms = [w * (_unit(a) - _unit(b)).abs().sum(1).mean() for a, b, w in zip(fa, fb, weights, strict=True)]
    total = terms[0]
    for term in terms[1:]:  # left to right, as sum() adds
        total = total + term
    return total


class AlexNetSlices(nn.Module):
    """torchvision AlexNet `features` split after each ReLU, keeping its module indices as keys."""

    def __init__(self) -> None:
        super().__init__()
        def seq(**mods: nn.Module) -> nn.Sequential:
            s = nn.Sequential()
            for k, m in mods.items():
                s.add_module(k.lstrip("_"), m)
            return s
        self.slice1 = seq(_0=nn.Conv2d(3, 64, 11, 4, 2), _1=nn.ReLU())
        self.slice2 = seq(_2=nn.MaxPool2d(3, 2), _3=nn.Conv2d(64, 192, 5, padding=2), _4=nn.ReLU())
        self.slice3 = seq(_5=nn.MaxPool2d(3, 2), _6=nn.Conv2d(192, 384, 3, padding=1), _7=nn.ReLU())
        self.slice4 = seq(_8=nn.Conv2d(384, 256, 3, padding=1), _9=nn.ReLU())
        self.slice5 = seq(_10=nn.Conv2d(256, 256, 3, padding=1), _11=nn.ReLU())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in (self.slice1, self.slice2, self.slice3, self.slice4, self.slice5):
            x = s(x)
            out.append(x)
        return out


class VggFace(nn.Module):
    """VGG16 `features` (31 modules) as `network`, for the VGG-Face weights."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16:
            if isinstance(v, str):  # "M": a max pool
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.network = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(list(self.network)[:_VGG_TAPS[-1] + 1]):
            x = layer(x)
            if i in _VGG_TAPS:
                out.append(x)
        return out


class FacePerceptualLoss(nn.Module):
    """The published perceptual loss P(a, b) on images in [0,1]; frozen, in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = AlexNetSlices()
        self.vggface = VggFace()
        self.register_buffer("imagenet_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("vgg_mean", torch.tensor(VGGFACE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    imagenet_mean: torch.Tensor  # buffers (declared for the type checker)
    imagenet_std: torch.Tensor
    vgg_mean: torch.Tensor

    def train(self, mode: bool = True) -> FacePerceptualLoss:
        return super().train(False)  # always eval, as published

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        alex = _layer_distance(self.net((a - self.imagenet_mean) / self.imagenet_std),
                               self.net((b - self.imagenet_mean) / self.imagenet_std), LAYER_WEIGHTS)
        vgg = _layer_distance(self.vggface(a * 255 - self.vgg_mean), self.vggface(b * 255 - self.vgg_mean),
                              tuple(0.5 * w for w in LAYER_WEIGHTS))
        return alex + vgg


class SSIMLoss(nn.Module):
    """Weight-free stand-in for the perceptual loss: 1 - SSIM (Gaussian 11x11, sigma 1.5, C1/C2 of
    Wang et al. 2004 for images in [0,1]), averaged over channels and pixels."""

    def __init__(self, window: int = 11, sigma: float = 1.5) -> None:
        super().__init__()
        x = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
        g = torch.exp(-x * x / (2 * sigma * sigma))
        g = g / g.sum()
        self.register_buffer("kernel", (g[:, None] * g[None, :])[None, None], persistent=False)

    kernel: torch.Tensor  # a buffer (declared for the type checker)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        c = a.shape[1]
        k = self.kernel.expand(c, 1, -1, -1)

        def blur(x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, k, groups=c)
        mu_a, mu_b = blur(a), blur(b)
        var_a = blur(a * a) - mu_a * mu_a
        var_b = blur(b * b) - mu_b * mu_b
        cov = blur(a * b) - mu_a * mu_b
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        return 1 - ssim.mean()


def load_perceptual(path: str | Path) -> FacePerceptualLoss:
    """The published perceptual networks with weights from a file holding `percep_loss.*` keys (the
    published GAGAvatar.pt does, under `model`), or the bare `net.*` / `vggface.*` keys."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(blob, Mapping) and isinstance(blob.get("model"), Mapping):
        blob = blob["model"]
    if not isinstance(blob, Mapping):
        raise LossInputError(f"{path} holds a {type(blob).__name__}; expected a state dict with "
                             "percep_loss.* keys (e.g. the published GAGAvatar.pt)")
    state = {k.removeprefix("percep_loss."): v for k, v in blob.items()
             if k.startswith("percep_loss.") or k.startswith(("net.", "vggface."))}
    module = FacePerceptualLoss()
    own = module.state_dict()
    if set(state) != set(own) or any(tuple(state[k].shape) != tuple(own[k].shape) for k in own):
        raise LossInputError(f"{path} does not hold the published perceptual weights: expected the "
                             f"{len(own)} percep_loss.* tensors (AlexNet net.slice1..5, "
                             f"vggface.network), found {len(state)} matching keys")
    module.load_state_dict(state)
    return module


class GagaLoss(nn.Module):
    """The sum of the four published terms (docs/gagavatar.md); `perceptual` is FacePerceptualLoss or
    the SSIM substitute."""

    def __init__(self, perceptual: nn.Module | None = None) -> None:
        super().__init__()
        self.perceptual = perceptual if perceptual is not None else SSIMLoss()
        self.substitute = not isinstance(self.perceptual, FacePerceptualLoss)

    def forward(self, coarse: torch.Tensor, refined: torch.Tensor, target: torch.Tensor, bbox: torch.Tensor,
                vertices: torch.Tensor, lifted: torch.Tensor) -> dict[str, torch.Tensor]:
        """Terms and `total`: images (B,3,S,S), bbox (B,4) in [0,1], vertices (B,V,3), lifted (B,M,3)."""
        if coarse.shape != target.shape or refined.shape != target.shape or target.ndim != 4:
            raise LossInputError(f"coarse {tuple(coarse.shape)}, refined {tuple(refined.shape)} and target "
                                 f"{tuple(target.shape)} must be equal (B,3,S,S) images")
        img = 0.5 * (F.l1_loss(coarse, target) + F.l1_loss(refined, target))
        boxes = box_pixels(bbox, target.shape[-1])
        box_coarse, box_refined, box_target = (box_crops(x, boxes) for x in (coarse, refined, target))
        box = 0.5 * (F.l1_loss(box_coarse, box_target) + F.l1_loss(box_refined, box_target))
        percep = PERCEPTUAL_WEIGHT * (self.perceptual(box_coarse, box_target)
                                      + self.perceptual(box_refined, box_target))
        point = lifting_loss(vertices, lifted)
        return {"img_loss": img, "box_loss": box, "percep_loss": percep, "point_loss": point,
                "total": img + box + percep + point}
