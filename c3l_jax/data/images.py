"""Image loading with clear failures: every problem becomes an `ImageError` with a reason.

RGB conversion follows LLaVA (`Image.open(path).convert("RGB")`): grey, palette, CMYK and RGBA are
converted by PIL (alpha is dropped), 16-bit and float images are rescaled to 8 bits first, and EXIF
orientation is applied. Images over `max_pixels` are refused before decoding (decompression bombs).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps

DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(ValueError):
  """The image cannot be used; `str(e)` is the quarantine reason."""


def _to_8bit(img: PIL.Image.Image) -> PIL.Image.Image:
  arr = np.asarray(img, dtype=np.float64)
  lo, hi = float(arr.min()), float(arr.max())
  scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
  return PIL.Image.fromarray(scaled.round().astype(np.uint8), mode="L")


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> PIL.Image.Image:
  """An RGB PIL image from `path`, or `ImageError` (missing, empty, not an image, truncated, too big)."""
  if not os.path.exists(path):
    raise ImageError(f"missing image file {path}")
  if os.path.getsize(path) == 0:
    raise ImageError(f"zero-byte image file {path}")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
      with PIL.Image.open(path) as img:
        width, height = img.size
        if width * height > max_pixels:
          raise ImageError(f"image {path} has {width}x{height} pixels, over the limit of {max_pixels}")
        img.load()
        img = PIL.ImageOps.exif_transpose(img)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
          img = _to_8bit(img)
        return img.convert("RGB")
  except ImageError:
    raise
  except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
    raise ImageError(f"image {path} is over the pixel limit ({e})") from None
  except PIL.UnidentifiedImageError:
    raise ImageError(f"not an image file {path}") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageError(f"corrupt or truncated image {path}: {e}") from None
