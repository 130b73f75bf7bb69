"""Static-shape batching helpers: bucketed lengths and left / right padding of token lists."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n (and >= `multiple`): the bucketed length."""
  return max(multiple, -(-n // multiple) * multiple)


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
