"""Reading images as the checks and the dataset do: the header (size, EXIF orientation), a full
decode, and the one EXIF rule: rotate only when the JSON's size is the rotated image's. Errors name
the file (`ImageReadError`), never a bare OSError."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 = as stored, 2-8 = mirrored and/or rotated
SWAPS_SIDES = (5, 6, 7, 8)  # orientations that turn the image by 90 degrees


class ImageReadError(RuntimeError):
    """An image that cannot be opened or decoded; the message names the file."""


@dataclass(frozen=True)
class ImageInfo:
    width: int  # as stored, before any EXIF rotation
    height: int
    orientation: int  # EXIF orientation, 1 when absent


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 when absent). A PNG's is read only from the chunks before its pixels:
    PIL's `getexif()` on a PNG decodes the whole image to look behind them."""
    if im.format == "PNG":
        raw = im.info.get("exif")
        exif = Image.Exif()
        if raw:
            exif.load(raw)
        found = exif.get(EXIF_ORIENTATION, 1)
    else:
        found = im.getexif().get(EXIF_ORIENTATION, 1)
    try:
        found = int(found or 1)
    except (TypeError, ValueError):
        return 1
    return found if 1 <= found <= 8 else 1


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")


def read_header(path: Path, decode: bool = False) -> ImageInfo:
    """Size and orientation from the header; `decode` also decodes every pixel (the doctor does,
    a run reads headers only). Raises FileNotFoundError or ImageReadError."""
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            return ImageInfo(im.width, im.height, orientation(im))
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
        raise ImageReadError(f"cannot read image {path}: {_reason(e)}") from e


def rotated_size(info: ImageInfo) -> tuple[int, int]:
    """(width, height) after applying the EXIF orientation."""
    return (info.height, info.width) if info.orientation in SWAPS_SIDES else (info.width, info.height)


def fit(info: ImageInfo, json_size: tuple[int, int]) -> str:
    """Which image the JSON's (width, height) describes: `stored`, `rotated` (a 90-degree EXIF turn
    whose turned size is the JSON's), `ambiguous` (an EXIF flip or half turn: the size cannot tell,
    the stored pixels are used) or `mismatch`."""
    stored = (info.width, info.height)
    if info.orientation in SWAPS_SIDES and rotated_size(info) == json_size and stored != json_size:
        return "rotated"
    if stored == json_size:
        return "ambiguous" if info.orientation not in (1, *SWAPS_SIDES) else "stored"
    return "mismatch"


def load_rgb(path: Path, json_size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 `[H, W, 3]` pixels. EXIF rotation is applied only when `json_size` is the rotated
    image's size (the boxes were drawn on the turned image); otherwise the stored pixels are kept.
    Raises ImageReadError naming the file (an image that became unreadable mid-run, say)."""
    try:
        with Image.open(path) as im:
            turn = orientation(im) if json_size is not None else 1
            if turn in SWAPS_SIDES and fit(ImageInfo(im.width, im.height, turn), json_size) == "rotated":
                im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ImageReadError(f"cannot read image {path}: {_reason(e)}") from e
