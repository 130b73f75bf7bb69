"""The default config (`python launch.py` with no flags): C3L end to end on the synthetic scenes world.

The shipped tiny LLaVA (`checkpoints/scenes_tiny`, trained from scratch by `configs/scenes_pretrain.py`)
generates initial QA for a few hundred scenes; the pipeline filters, scores S(I2C), selects, trains the
generator with CE + contrastive loss, generates the final data and exports it. Because every scene has a
ground-truth annotation, the export stage measures the data (relevance, accuracy, hallucination, S(I2C)
ROC-AUC) for the initial and the final data and prints a table. CPU, a few minutes.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"takes no arg, got {arg!r}")
  config = common.get_base_config()
  config.stages = "initial,filter,score,select,train,final,export,eval"
  config.eval.benchmarks = "pope,scenes_vqa"
  config.model.family = "llava15"
  config.model.checkpoint = "checkpoints/scenes_tiny"

  config.plugins = "c3l_jax.scenes"  # registers data.source=scenes and the scenes_vqa benchmark
  config.data.source = "scenes"
  config.data.scenes_images = 300
  config.data.batch_size = 32

  config.generation.per_image = 3
  config.generation.max_new_tokens = 32
  config.generation.caption_max_new_tokens = 24
  config.generation.prompt_bucket = 16
  config.generation.shard_size = 100
  config.generation.num_final = 300

  config.scoring.batch_size = 32
  config.scoring.shard_size = 300

  config.select.top_fraction = 0.1

  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 5
  config.train.batch_size = 8
  config.train.steps = 60
  config.train.checkpoint_every = 30
  config.train.max_negatives = 2
  config.lock()
  return config
