"""Image loading with clear failures: every problem becomes an `ImageError` with a reason.

`load_image(path)` and `load_image_bytes(data)` share one decoder and the same guards:

- **Pixel limit** (decompression bombs): the size is read from the header by `PIL.Image.open`, which
  decodes nothing, and an image over `max_pixels` is refused before `.load()`. PIL's own guard is
  handled too: its `DecompressionBombWarning` (over `PIL.Image.MAX_IMAGE_PIXELS`, 89.5M pixels) is
  silenced because `max_pixels` decides, and its `DecompressionBombError` (over twice that, 179M
  pixels, whatever `max_pixels` says) becomes an "over the pixel limit" `ImageError`.
- **EXIF orientation** is applied (`PIL.ImageOps.exif_transpose`); malformed EXIF leaves the image as
  stored rather than rejecting it.
- **RGB conversion** follows LLaVA (`Image.open(f).convert("RGB")`) so images look as they did when the
  model was trained: grey (`L`), bilevel (`1`), `CMYK` (PIL's (255-C)(255-K)/255 formula), `YCbCr`,
  `LAB`, `HSV` are converted by PIL; **alpha is dropped, not composited** (`RGBA`, `LA`, `PA`, and
  palette images with a transparent index keep the colour stored under the transparency), exactly as
  LLaVA's `.convert("RGB")` does.
- **16-bit** grey (`I;16`, `I;16B`, `I;16L`, or `I` with values in 0..65535 but not all in 0..255) is
  scaled by full range, v * 255 / 65535 (PIL alone would clip every value above 255 to white); `I`
  images with values in 0..255 are kept as they are; `F` (float) images and `I` images outside 0..65535
  are stretched from their min..max to 0..255.

Reasons (`str(e)`, also `e.kind`): missing image file, zero-byte file, not an image file, corrupt or
truncated image, over the pixel limit.

LLaVA-1.5's `image_aspect_ratio="pad"` is `expand_to_square(img, pad_background(processor))` before the
HF image processor (`apply_image_aspect` picks it from `config.data.image_aspect`).

`image_path(root, name)` is where a dataset file's image name may point: under `root` only (no `..`
out of it, no absolute path, no symlink leading out of it), so a records or LLaVA file cannot make the
tool read arbitrary files; every reader of a dataset file goes through it.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import IO, Any

import numpy as np
import PIL.Image
import PIL.ImageOps

DEFAULT_MAX_PIXELS = 64_000_000

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageError(ValueError):
  """The image cannot be used; `str(e)` is the quarantine reason.

  `kind` is one of "missing", "zero-byte", "not-an-image", "corrupt", "too-large" for the decoder's
  own failures ("" when raised elsewhere with only a message).
  """

  def __init__(self, message: str, kind: str = "") -> None:
    super().__init__(message)
    self.kind = kind


def _to_8bit(img: PIL.Image.Image) -> PIL.Image.Image:
  """A single-channel 16-bit / 32-bit / float image as an 8-bit `L` image (see the module docstring)."""
  arr = np.asarray(img)
  if arr.ndim != 2:
    raise ValueError(f"unexpected {arr.shape} array for mode {img.mode}")
  arr = arr.astype(np.float64)
  lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
  if img.mode == "I" and lo >= 0 and hi <= 255:  # 32-bit ints holding 8-bit values: as they are
    scaled = arr
  elif (img.mode in _SIXTEEN_BIT_MODES or img.mode == "I") and lo >= 0 and hi <= 65535:
    scaled = arr * (255.0 / 65535.0)
  else:
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
  return PIL.Image.fromarray(np.clip(scaled.round(), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
  """`img` in RGB mode, converted as described in the module docstring (alpha dropped)."""
  if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
    img = _to_8bit(img)
  elif img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")  # PIL warns on P -> RGB with byte transparency; same colours via RGBA
  if img.mode != "RGB":
    img = img.convert("RGB")
  return img


def _exif_transpose(img: PIL.Image.Image) -> PIL.Image.Image:
  try:
    return PIL.ImageOps.exif_transpose(img)
  except Exception:  # malformed EXIF: use the image as stored
    return img


def _decode(source: str | IO[bytes], label: str, max_pixels: int) -> PIL.Image.Image:
  """Open (header only), check the pixel count, then decode, orient and convert to RGB."""
  try:
    with warnings.catch_warnings():
      # `max_pixels` decides; PIL's warning threshold is not a second, different limit.
      warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
      with PIL.Image.open(source) as img:
        width, height = img.size
        if width * height > max_pixels:
          raise ImageError(f"image {label} has {width}x{height} pixels, over the limit of {max_pixels}",
                           kind="too-large")
        img.load()
        return to_rgb(_exif_transpose(img))
  except ImageError:
    raise
  except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
    raise ImageError(f"image {label} is over the pixel limit ({e})", kind="too-large") from None
  except PIL.UnidentifiedImageError:
    raise ImageError(f"not an image file {label}", kind="not-an-image") from None
  except MemoryError:
    raise
  except Exception as e:  # OSError (truncated), SyntaxError, ValueError, struct.error, ... from a bad file
    raise ImageError(f"corrupt or truncated image {label}: {e}", kind="corrupt") from None


def image_path(root: str, name: str, allow_outside: bool = False) -> str:
  """The file a dataset's image `name` names under the directory `root` ('' = the working directory).

  Raises `ImageError` (kind "outside-root") when the path leaves `root`: an absolute `name`, `..`
  components that climb out of it, or a symlink (the file or a directory on the way) that resolves
  outside it; `allow_outside=True` (`config.data.allow_outside_root`) skips the check. Remote roots
  (`gs://...`) are checked by their components only (no symlinks there).
  """
  full = os.path.join(root, name)
  if allow_outside:
    return full
  hint = "(set data.allow_outside_root=True to read it anyway)"
  if os.path.isabs(name) or "://" in name:
    raise ImageError(f"image path {name!r} is absolute: it leaves data.image_root {hint}",
                     kind="outside-root")
  if "://" in root:
    if ".." in name.replace("\\", "/").split("/"):
      raise ImageError(f"image path {name!r} leaves data.image_root through '..' {hint}",
                       kind="outside-root")
    return full
  base = os.path.abspath(root or os.curdir)
  if not _inside(os.path.normpath(os.path.join(base, name)), base):
    raise ImageError(f"image path {name!r} leaves data.image_root through '..' {hint}",
                     kind="outside-root")
  real_base = os.path.realpath(base)
  if not _inside(os.path.realpath(os.path.join(base, name)), real_base):
    raise ImageError(f"image path {name!r} is a symlink (or under one) that leads out of "
                     f"data.image_root, to {os.path.realpath(os.path.join(base, name))} {hint}",
                     kind="outside-root")
  return full


def _inside(path: str, base: str) -> bool:
  return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> PIL.Image.Image:
  """An RGB PIL image from `path`, or `ImageError` (missing, empty, not an image, truncated, too big)."""
  if not os.path.exists(path):
    raise ImageError(f"missing image file {path}", kind="missing")
  if os.path.getsize(path) == 0:
    raise ImageError(f"zero-byte image file {path}", kind="zero-byte")
  return _decode(path, path, max_pixels)


def load_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "") -> PIL.Image.Image:
  """An RGB PIL image from encoded file bytes (e.g. COCO's `image_bytes`), with `load_image`'s guards.

  Args:
    data: the undecoded file contents.
    max_pixels: images with more pixels (read from the header) are refused before decoding.
    name: what the image is called in error messages (e.g. the file name); "" = "<bytes>".

  Raises:
    ImageError: "zero-byte file" (empty `data`), "not an image file", "corrupt or truncated image",
      or "over the limit" / "over the pixel limit".
  """
  label = name or "<bytes>"
  if not data:
    raise ImageError(f"zero-byte file: no image bytes for {label}", kind="zero-byte")
  return _decode(io.BytesIO(bytes(data)), label, max_pixels)


def expand_to_square(img: PIL.Image.Image, background: tuple[int, ...]) -> PIL.Image.Image:
  """LLaVA's `expand2square`: pad the short side equally (extra pixel after) to a square.

  The image is pasted at ((side - width) // 2, (side - height) // 2) on a `background` canvas in the
  image's own mode; a square image is returned as it is.
  """
  width, height = img.size
  if width == height:
    return img
  if width > height:
    result = PIL.Image.new(img.mode, (width, width), background)
    result.paste(img, (0, (width - height) // 2))
    return result
  result = PIL.Image.new(img.mode, (height, height), background)
  result.paste(img, ((height - width) // 2, 0))
  return result


def pad_background(image_processor: Any) -> tuple[int, ...]:
  """LLaVA-1.5's padding colour: `tuple(int(x * 255) for x in image_processor.image_mean)`.

  Accepts the image processor or a processor that has one (`processor.image_processor`).
  """
  if not hasattr(image_processor, "image_mean") and hasattr(image_processor, "image_processor"):
    image_processor = image_processor.image_processor
  return tuple(int(x * 255) for x in image_processor.image_mean)


def apply_image_aspect(img: PIL.Image.Image, aspect: str, image_processor: Any) -> PIL.Image.Image:
  """`config.data.image_aspect`: "resize" leaves the image to the processor; "pad" squares it first."""
  if aspect == "resize":
    return img
  if aspect == "pad":
    return expand_to_square(img, pad_background(image_processor))
  raise ValueError(f"image_aspect must be 'resize' or 'pad', not {aspect!r}")
