"""Resizing a ViT's position embeddings to another resolution, as EVA's `interpolate_pos_embed` does."""

from __future__ import annotations

import numpy as np

from c3l_jax.convert.common import ConversionError


def bicubic_resize_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
  """`[size_out, size_in]` weights of torch's 1-D bicubic interpolation (`align_corners=False`).

  As `torch.nn.functional.interpolate(mode="bicubic")`: source coordinate `(o + 0.5) * in / out - 0.5`
  (not clamped), Keys' cubic convolution with `a = -0.75`, out-of-range taps clamped to the border.
  """
  def cubic(x):
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))

  m = np.zeros((size_out, size_in), np.float64)
  for o in range(size_out):
    src = (o + 0.5) * size_in / size_out - 0.5
    base = int(np.floor(src))
    t = src - base
    for k, offset in enumerate((-1, 0, 1, 2)):
      m[o, min(max(base + offset, 0), size_in - 1)] += cubic(t - offset)
  return m


def interpolate_position_embedding(pos: np.ndarray, grid_out: int) -> np.ndarray:
  """`[1 + g*g, D]` (CLS first) -> `[1 + grid_out^2, D]`: EVA's `interpolate_pos_embed` (bicubic)."""
  n, d = pos.shape
  g = int(round((n - 1) ** 0.5))
  if g * g != n - 1:
    raise ConversionError(f"position embedding of {n - 1} patches is not a square grid")
  if g == grid_out:
    return pos
  m = bicubic_resize_matrix(g, grid_out)
  grid = pos[1:].astype(np.float64).reshape(g, g, d)
  out = np.einsum("ih,jw,hwd->ijd", m, m, grid).reshape(grid_out * grid_out, d)
  return np.concatenate([pos[:1], out.astype(pos.dtype)], axis=0)
