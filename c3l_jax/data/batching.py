"""Static-shape batching helpers: bucketed lengths and left / right padding of token lists."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n (and >= `multiple`): the bucketed length."""
  return max(multiple, -(-n // multiple) * multiple)


def bucket(n: int, minimum: int, per_octave: int = 8) -> int:
  """`n` rounded up to a multiple of `max(minimum, 2**floor(log2 n) / per_octave)`: at most
  `per_octave` static lengths between consecutive powers of two, so the padding stays under
  1 / per_octave of the length (12.5 %) while a run compiles a handful of shapes, not one per length."""
  step = max(minimum, (1 << max(n.bit_length() - 1, 0)) // per_octave)
  return round_up(n, step)


def right_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """`tokens [B, width]` int32 with each row at the start, and its 0/1 `mask`."""
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    mask[i, :len(r)] = 1
  return tokens, mask


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """`tokens [B, width]` int32 with each row at the end, and its 0/1 `mask`."""
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    if len(r):
      tokens[i, width - len(r):] = r
      mask[i, width - len(r):] = 1
  return tokens, mask
