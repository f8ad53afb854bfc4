"""Source photos: the built-in default face and safe loading of user-supplied images."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np

from gaga_ros.image import ImageError, check_rgb

#: Largest image accepted, in pixels (a 40-megapixel photo); larger headers are refused undecoded.
MAX_PIXELS = 40_000_000
#: Formats accepted by load_image (PIL format names).
ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "PPM")
#: Smallest source photo side accepted, in pixels: below it no face is found.
MIN_SIDE = 16


def default_source() -> np.ndarray:
    """The built-in source face: scikit-image's public-domain astronaut portrait, 512x512 RGB uint8."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3), refusing bad files before they cost memory.

    The header is read first (PIL opens lazily), so a decompression bomb is rejected from its
    declared size without decoding a pixel. EXIF orientation is applied, as phone photos need.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    accepted = f"accepted is a readable {'/'.join(ACCEPTED_FORMATS)} file"
    try:  # non-blocking, then checked: a FIFO given as a path must not hang the caller
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file; {accepted}") from None
    except OSError as err:
        raise ImageError(f"{path}: cannot open ({err.strerror}); {accepted}") from None
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(kind) else "not a regular file (a FIFO, device or socket)"
        raise ImageError(f"{path} is {what}; {accepted}")
    file = os.fdopen(fd, "rb")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError,
            OSError) as err:
        file.close()
        detail = str(err).split(" <_io.")[0]  # PIL names the file object, not the path
        raise ImageError(f"{path}: not a readable image ({detail}); accepted formats: "
                         f"{', '.join(ACCEPTED_FORMATS)}") from None
    with file, image:
        if image.format not in ACCEPTED_FORMATS:
            raise ImageError(f"{path}: format {image.format} is not supported; accepted formats: "
                             f"{', '.join(ACCEPTED_FORMATS)}")
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{path}: {width}x{height} pixels exceeds the limit of {max_pixels} "
                             "pixels; downscale the photo first")
        if width < 1 or height < 1:
            raise ImageError(f"{path}: empty image ({width}x{height})")
        try:
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"{path}: truncated or corrupt {image.format} data ({err}); accepted is "
                             "a complete image file") from None
        return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def as_rgb(image: np.ndarray) -> np.ndarray:
    """An in-memory source photo checked (gaga_ros.image.check_rgb, at least MIN_SIDE each way)."""
    return check_rgb(image, MIN_SIDE)
