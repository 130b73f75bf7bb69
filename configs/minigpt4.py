"""MiniGPT-4: `--config=configs/minigpt4.py:ARG` with ARG in {vicuna7b, llama2, tiny}.

The architecture (EVA ViT-g, Q-Former or 4-patch concatenation, `llama_proj`, Llama decoder) and the
prompt template are read from the converted checkpoint's `c3l_model.json`, so no dimensions live here;
ARG only picks run settings. Point `--config.model.checkpoint` at a directory written by
`python -m c3l_jax.convert --family=minigpt4 --blip2_path=DIR --llm_path=DIR --proj_path=FILE --out=DIR`.
MiniGPT-4 trains only `llama_proj` (the ViT and Q-Former stay frozen); `train.trainable` keeps the
project default (connector = `llama_proj`, plus the decoder), as for LLaVA.
"""

from __future__ import annotations

import ml_collections

from configs import common

VALID_ARGS = ("vicuna7b", "llama2", "tiny")


def get_config(arg: str = "vicuna7b") -> ml_collections.ConfigDict:
  arg = (arg or "vicuna7b").strip().lower()
  if arg not in VALID_ARGS:
    raise ValueError(f"unknown arg {arg!r} (valid: {', '.join(VALID_ARGS)})")
  config = common.get_base_config()
  config.model.family = "minigpt4"
  if arg in ("vicuna7b", "llama2"):
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
