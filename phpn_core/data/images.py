"""Image decoding shared by the file-backed datasets (CUB-200-2011, ImageFolder).

One place decides how a file on disk becomes a float32 ``[3, S, S]`` tensor in ``[0, 1]``:

- open with PIL, refuse images over a pixel limit (decompression bombs) before any pixel is decoded,
- ``verify()`` (CRC checks for PNG), then decode fully so that truncated or corrupt files fail here, with an
  :class:`ImageLoadError` that names the file, instead of producing grey padding later,
- convert every mode (grayscale, RGBA, palette, CMYK, 16-bit) to 8-bit RGB,
- optionally crop to an integer box, then a plain (non aspect-preserving) bilinear resize, as ProtoEval does.

Datasets take ``on_error="raise" | "skip"``: with ``"skip"`` they call :func:`find_unreadable` once at
construction, drop the unreadable files from their index and list them in a ``skipped`` attribute, so that
``len()``, ``labels`` and item order stay consistent (a map-style dataset cannot drop an item lazily).
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from phpn_core.errors import InputValueError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ON_ERROR_CHOICES",
    "ImageLoadError",
    "check_on_error",
    "check_image_size",
    "check_max_pixels",
    "open_rgb",
    "pil_to_tensor",
    "load_image",
    "find_unreadable",
]

# PIL's own warning threshold (~89.5 Mpx, ~256 MiB as 24-bit RGB). CUB images are ~0.2 Mpx.
DEFAULT_MAX_PIXELS = 89_478_485

ON_ERROR_CHOICES = ("raise", "skip")

# What PIL and its plugins raise on a damaged file (SyntaxError and struct.error come from header parsers).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError,
                  Image.DecompressionBombError)


class ImageLoadError(InputValueError):
    """An image file is missing, unreadable, truncated, corrupt or over the pixel limit.

    ``path`` holds the offending file, so that callers (``on_error="skip"``) can record it.
    """

    def __init__(self, message: str, *, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = str(path)


def check_on_error(on_error: str) -> str:
    """Validate an ``on_error`` policy; returns it unchanged."""
    if on_error not in ON_ERROR_CHOICES:
        raise InputValueError(
            f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}. Use 'raise' to stop at the first "
            "unreadable image or 'skip' to leave unreadable images out (listed in the dataset's `skipped`)."
        )
    return on_error


def check_max_pixels(max_pixels: int | None) -> int | None:
    """Validate a pixel limit (a positive int, or None for no limit of ours); returns it unchanged."""
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels < 1):
        raise InputValueError(
            f"max_pixels must be a positive int (width * height) or None, got {max_pixels!r}. "
            f"The default is {DEFAULT_MAX_PIXELS}."
        )
    return max_pixels


def check_image_size(image_size: int) -> int:
    """Validate an output side length ``S``; returns it unchanged."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise InputValueError(
            f"image_size must be a positive int (the side S of the returned [3, S, S] images), got {image_size!r}."
        )
    return image_size


def _too_large(path, size: tuple[int, int], max_pixels: int) -> ImageLoadError:
    w, h = size
    return ImageLoadError(
        f"image '{path}' is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} pixels "
        "(a guard against decompression bombs). Expected a normal-sized photo. If the file is genuine, pass a "
        "larger max_pixels to the dataset (above 2 * PIL.Image.MAX_IMAGE_PIXELS also raise that global); "
        "otherwise remove the file or use on_error='skip'.",
        path=path,
    )


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is dropped (as torchvision's loader does), not composited."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # convert("RGB") would clip 16-bit values at 255 (an all-white image); rescale to 8 bits instead.
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if (im.mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
        if im.mode == "F":
            hi = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        a8 = np.clip(np.rint(a / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        # Palette transparency must go through RGBA (PIL warns otherwise).
        im = im.convert("RGBA")
    return im.convert("RGB")


def open_rgb(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file fully and return it as an 8-bit RGB PIL image (file closed).

    Raises :class:`ImageLoadError` naming ``path`` when the file is missing, not an image, truncated, corrupt,
    or has more than ``max_pixels`` pixels (checked from the header, before decoding).
    Note: a truncated file is only caught while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (PIL's default).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            # Our limit replaces PIL's warning threshold; PIL's hard error (2x) still applies and is reported.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
                    raise _too_large(path, im.size, max_pixels)
                im.verify()  # PNG: chunk CRCs; must reopen afterwards (PIL's rule)
            f.seek(0)
            with Image.open(f) as im:
                im.load()  # full decode: truncated data raises here; pixels stay in memory after the with
                return _to_rgb(im)
    except ImageLoadError:
        raise
    except FileNotFoundError as e:
        raise ImageLoadError(
            f"image file '{path}' does not exist. Expected the file listed by the dataset's index. Fix the path "
            "or restore the file, or use on_error='skip' to leave it out.",
            path=path,
        ) from e
    except Image.DecompressionBombError as e:
        raise ImageLoadError(
            f"image '{path}' was refused by PIL as a possible decompression bomb ({e}). Expected a normal-sized "
            "photo. If it is genuine, raise PIL.Image.MAX_IMAGE_PIXELS and the dataset's max_pixels; otherwise "
            "remove the file or use on_error='skip'.",
            path=path,
        ) from e
    except _DECODE_ERRORS as e:
        raise ImageLoadError(
            f"could not decode image '{path}' ({type(e).__name__}: {e}). Expected a complete, readable image "
            "file (JPEG, PNG, ...); the file is probably truncated or corrupt. Replace it (re-extract the "
            "dataset archive) or use on_error='skip' to leave it out.",
            path=path,
        ) from e


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image (height H, width W) -> new float32 tensor ``[3, H, W]`` in ``[0, 1]``."""
    a = np.array(im, dtype=np.uint8, copy=True)  # writable copy: torch warns on read-only arrays
    if a.ndim != 3 or a.shape[2] != 3:
        raise InputValueError(f"expected an RGB image (H, W, 3), got an array of shape {a.shape}; "
                              "convert with open_rgb() first.")
    return torch.from_numpy(a).permute(2, 0, 1).contiguous().to(torch.float32).div_(255.0)


def load_image(
    path: str | os.PathLike,
    *,
    image_size: int | None,
    crop_box: tuple[int, int, int, int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode, optionally crop, resize to ``image_size x image_size`` (bilinear, no aspect preservation).

    Args:
        path: image file.
        image_size: side ``S`` of the output; None keeps the (cropped) size.
        crop_box: integer ``(x0, y0, x1, y1)``, half-open, within the image (see the caller for clipping).
        max_pixels: decompression-bomb limit on ``W * H`` of the file, None for no limit of ours.

    Returns:
        ``(image, (W, H))``: image float32 ``[3, S, S]`` in ``[0, 1]``; ``(W, H)`` the original file's size.
    """
    im = open_rgb(path, max_pixels=max_pixels)
    orig_size = im.size
    if crop_box is not None:
        im = im.crop(crop_box)
    if image_size is not None and im.size != (image_size, image_size):
        # PIL's bilinear filter widens its support when downscaling (antialiased), like torchvision's Resize.
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return pil_to_tensor(im), orig_size


def _probe(path: str, max_pixels: int | None) -> str | None:
    """Cheap full-stream check: returns None if readable, else the error message."""
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
                    raise _too_large(path, im.size, max_pixels)
                im.verify()
            f.seek(0)
            with Image.open(f) as im:
                # JPEG: decode at 1/8 scale; every byte of the stream is still read, so truncation still fails.
                im.draft(None, (1, 1))
                im.load()
        return None
    except ImageLoadError as e:
        return str(e)
    except FileNotFoundError:
        return f"image file '{path}' does not exist"
    except _DECODE_ERRORS as e:
        return f"could not decode image '{path}' ({type(e).__name__}: {e})"


def find_unreadable(
    paths: Sequence[str | os.PathLike], *, max_pixels: int | None = DEFAULT_MAX_PIXELS, workers: int | None = None
) -> dict[int, str]:
    """Check every file once; returns ``{index in paths: reason}`` for the unreadable ones.

    Threads overlap the decoding (PIL releases the GIL while decoding). Used by ``on_error="skip"``.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images cannot be detected and will "
                      "not be skipped.", RuntimeWarning, stacklevel=2)
    n_workers = workers or min(8, os.cpu_count() or 1)
    str_paths = [str(p) for p in paths]
    if n_workers <= 1 or len(str_paths) < 16:
        results = [_probe(p, max_pixels) for p in str_paths]
    else:
        with ThreadPoolExecutor(max_workers=n_workers) as ex:
            results = list(ex.map(lambda p: _probe(p, max_pixels), str_paths, chunksize=32))
    return {i: r for i, r in enumerate(results) if r is not None}
