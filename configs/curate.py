"""Curate a LLaVA-format dataset you already have: `--config=configs/curate.py`.

    python launch.py --config=configs/curate.py --config.model.checkpoint=CK \
        --config.data.records=llava_v1_5_mix665k.json --config.data.image_root=DIR --workdir=W

runs the `curate` stage (c3l_jax/pipeline/curate.py): S(I2C) of every gpt turn of every entry with an
image, the top `select.top_fraction` (or `curate.top_count`) of the scored entries, exported verbatim to
WORKDIR/export/selected.json with scores.jsonl, stats.json and report.html. Any checkpoint family
(`model.family` is read from the checkpoint); bf16 by default, `--config.model.dtype=float32
--config.model.param_dtype=float32` for a tiny test checkpoint.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  config = common.get_base_config()
  config.stages = "curate"
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.lock()
  return config
