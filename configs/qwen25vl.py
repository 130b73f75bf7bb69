"""Qwen2.5-VL: `--config=configs/qwen25vl.py:ARG` with ARG in {7b, 3b, tiny}.

The architecture (vision tower, merger, Qwen2 decoder sizes, tied or untied head, the image processor's
pixel bounds) is read from the converted checkpoint's `c3l_model.json`, so no dimensions live here; ARG
only picks run settings, as `configs/llava15.py`: 7b / 3b compute in bfloat16, tiny (a small test
checkpoint on CPU) in float32 with small batches. Point `--config.model.checkpoint` at a directory
written by `python -m c3l_jax.convert --hf_path=Qwen2.5-VL-7B-Instruct`. Prompts go through the
checkpoint's own chat template; generation stops at its `generation_config.json` stop ids and samples
with `generation.*` (not the checkpoint's sampling settings). `--config.model.max_pixels=N` bounds each
picture's image tokens (N / 784).
"""

from __future__ import annotations

import ml_collections

from configs import common

VALID_ARGS = ("7b", "3b", "tiny")


def get_config(arg: str = "7b") -> ml_collections.ConfigDict:
  return common.get_model_config("qwen25vl", arg, VALID_ARGS)
