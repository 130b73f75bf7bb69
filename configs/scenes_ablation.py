"""The paper's Table 4 on the synthetic scenes world: `python launch.py --config=configs/scenes_ablation.py`.

Per seed, the demo's initial data (generate -> filter -> score) is shared by four rows — filtering only,
+ CLM, + CRM, + CRM + CLM — and two C3L variants (final data in the other final mode; S(I2C) normalised
by answer length); each row makes its final data, fine-tunes a fresh copy of the student
(`checkpoints/scenes_student`) on it, with the student's own instruction data as half of the records
(VLIT; `ablation.student_data`), and evaluates that model on held-out scenes VQA and scenes POPE
(random / popular / adversarial). The reference row is the student fine-tuned on its own data alone.
Three seeds, each a new world, new generation and new fine-tuning randomness; the table shows mean±95 %
interval. See `c3l_jax/pipeline/ablation.py`.
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
    # docs/scenes.md). As the paper's student (LLaVA-7B) already follows instructions, every fine-tune
    # mixes in the student's own instruction data, built from the world's ground truth on the training
    # scenes (c3l_jax/scenes/student.py: short VQA, balanced yes / no object questions, descriptions),
    # at half of its records: enough that the student learns to answer (and keeps it), while the
    # generated data, the thing measured, are the other half of every fine-tune. The reference row is
    # the student fine-tuned on its own half alone.
    config.ablation.student = "checkpoints/scenes_student"
    config.ablation.student_data = "scenes"
    config.ablation.student_data_share = 0.5
    config.ablation.student_steps = 1000
    config.ablation.student_learning_rate = 1e-3
    config.ablation.seed_keys = "seed,data.scenes_seed"  # generation / fine-tuning and the world
  config.lock()
  return config
