"""LLaVA-1.5: `--config=configs/llava15.py:ARG` with ARG in {7b, 13b, tiny}.

The architecture (CLIP tower, projector, Llama decoder sizes) is read from the converted checkpoint's
`c3l_model.json`, so no dimensions live here; ARG only picks run settings. Point
`--config.model.checkpoint` at a directory written by `python -m c3l_jax.convert`.
"""

from __future__ import annotations

import ml_collections

from configs import common

VALID_ARGS = ("7b", "13b", "tiny")


def get_config(arg: str = "7b") -> ml_collections.ConfigDict:
  arg = (arg or "7b").strip().lower()
  if arg not in VALID_ARGS:
    raise ValueError(f"unknown arg {arg!r} (valid: {', '.join(VALID_ARGS)})")
  config = common.get_base_config()
  config.model.family = "llava15"
  if arg in ("7b", "13b"):
    config.model.dtype = "bfloat16"
  else:  # tiny: a small random/test checkpoint on CPU; small batches, short runs.
    config.data.batch_size = 2
    config.data.eval_batch_size = 2
    config.scoring.batch_size = 2
    config.generation.max_new_tokens = 16
    config.generation.num_final = 8
    config.train.batch_size = 2
    config.train.steps = 4
    config.train.checkpoint_every = 2
  config.lock()
  return config
