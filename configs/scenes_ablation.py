"""The paper's Table 4 on the synthetic scenes world: `python launch.py --config=configs/scenes_ablation.py`.

Per seed, the demo's initial data (generate -> filter -> score) is shared by four rows — filtering only,
+ CLM, + CRM, + CRM + CLM — and two C3L variants (final data in the other final mode; S(I2C) normalised
by answer length); each row makes its final data, fine-tunes a fresh copy of the shipped base model on
it (VLIT) and evaluates that model on held-out scenes VQA and scenes POPE (random / popular /
adversarial); the base model is evaluated as a reference. Three seeds, each a new world, new generation
and new fine-tuning randomness; the table shows mean±95 % interval. See `c3l_jax/pipeline/ablation.py`.
"""

from __future__ import annotations

import ml_collections

from configs import scenes_demo


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  config = scenes_demo.get_config(arg)
  with config.unlocked():
    config.stages = "initial,filter,score,ablation"
    config.ablation.benchmarks = "pope,scenes_vqa"
    config.ablation.vlit_steps = 100
    config.ablation.vlit_learning_rate = 1e-4
    config.ablation.seeds = 3
    # The VLIT rows fine-tune the student (stage 0 + captions only, no VQA or instruction data;
    # docs/scenes.md), so what it learns about answering questions comes from the generated data.
    config.ablation.student = "checkpoints/scenes_student"
    config.ablation.seed_keys = "seed,data.scenes_seed"  # generation / fine-tuning and the world
  config.lock()
  return config
