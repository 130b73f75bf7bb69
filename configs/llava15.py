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
  return common.get_model_config("llava15", arg, VALID_ARGS)
