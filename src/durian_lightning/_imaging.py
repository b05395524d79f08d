"""One rule for images deeper than 8 bits, shared by pixel entropy and the data package's RGB conversion."""

from __future__ import annotations

import numpy as np
from PIL import Image


def high_depth_to_uint8(image: Image.Image) -> np.ndarray | None:
    """8-bit pixels of a 16-bit (``I;16*``: top 8 bits) or 32-bit int / float (``I``, ``F``: rescaled linearly from
    the image's own min..max) image; None for the 8-bit modes, which PIL converts itself."""
    if image.mode.startswith("I;16"):
        return (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
    if image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return np.rint(scaled).astype(np.uint8)
    return None
