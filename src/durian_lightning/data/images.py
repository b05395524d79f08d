"""Opening dataset images of any mode and size into RGB, with errors that say what is wrong."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

from PIL import Image

from durian_lightning._imaging import high_depth_to_uint8


class ImageError(ValueError):
    """An image that cannot be used: missing, corrupt, truncated, or of an unexpected type."""


def image_bytes(value, base_dir: Path | None) -> tuple[bytes | None, Image.Image | None, str]:
    """The raw bytes (or an already decoded PIL image) behind a dataset image value, and a name for messages.

    Accepted values: a path (relative paths are resolved against ``base_dir``, the folder of the data file), raw
    bytes, a ``{"bytes": ..., "path": ...}`` dict as the ``datasets`` Image feature stores it, or a PIL image.
    """
    if isinstance(value, Image.Image):
        return None, value, "<PIL image>"
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), None, str(value.get("path") or "<bytes>")
        value = value.get("path")
        if not value:
            raise ImageError("image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None, "<bytes>"
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        return path.read_bytes(), None, str(path)
    raise ImageError(f"expected an image path, bytes or PIL image, got {type(value).__name__}")


def content_hash(raw: bytes | None, image: Image.Image | None) -> str:
    """sha256 of the image file's bytes (or of a decoded image's mode, size and pixels)."""
    digest = hashlib.sha256()
    if raw is not None:
        digest.update(raw)
    else:
        digest.update(f"{image.mode}|{image.size}|".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL mode: alpha is composited on white, palettes applied, 16-bit keeps its top 8 bits,
    32-bit int / float images are rescaled from their own min..max."""
    if image.mode == "RGB":
        return image
    deep = high_depth_to_uint8(image)
    if deep is not None:
        return Image.fromarray(deep).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(raw: bytes | None, image: Image.Image | None, name: str, max_side: int | None = 2048) -> Image.Image:
    """Decode fully (so a truncated file fails here, not in a worker later), convert to RGB, and shrink so the
    longer side is at most ``max_side`` (aspect kept) before any processor sees it."""
    if image is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # big is fine; we shrink it
                image = Image.open(io.BytesIO(raw))
                if max_side:
                    image.draft("RGB", (max_side, max_side))  # JPEG decodes at reduced size directly
                image.load()
        except Image.DecompressionBombError as error:  # Pillow's guard against memory exhaustion: kept
            raise ImageError(
                f"image {name} is too large to decode safely ({error}): shrink it beforehand, or, for files you trust, "
                "raise PIL.Image.MAX_IMAGE_PIXELS before the data loads"
            ) from None
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageError(f"cannot decode image {name}: {error}") from None
    if image.width < 1 or image.height < 1:
        raise ImageError(f"image {name} is empty ({image.width}x{image.height})")
    image = to_rgb(image)
    if max_side and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image
