"""The default config (`python launch.py` with no flags): the whole pipeline on the synthetic scenes world.

The scenes world, its tiny checkpoint (`checkpoints/scenes_tiny`) and the stage implementations land in
later issues; until then this config validates (`--dry_run`) but a real run stops before doing anything
with a one-line error naming what is missing.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"takes no arg, got {arg!r}")
  config = common.get_base_config()
  config.model.family = "llava15"
  config.model.checkpoint = "checkpoints/scenes_tiny"
  config.lock()
  return config
