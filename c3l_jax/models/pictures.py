"""Preprocessed pictures of the variable-resolution families, host side (no jax: the prompt builders
in `c3l_jax.data` make them)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class QwenPicture(NamedTuple):
  """One preprocessed picture: the image processor's `pixel_values` rows `[t*h*w, C*T*p*p]` and its
  patch grid `(t, h, w)` (`image_grid_thw`)."""

  pixel_values: np.ndarray
  grid: tuple[int, int, int]

  @property
  def num_patches(self) -> int:
    return int(np.prod(self.grid))
