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
  return common.get_model_config("minigpt4", arg, VALID_ARGS)
