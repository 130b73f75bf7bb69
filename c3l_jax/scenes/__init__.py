"""The synthetic scenes testbed: a procedural world in which every generated QA pair can be checked.

It is not part of the C3L pipeline; it plugs into it. Importing this package registers (see
`c3l_jax.registry`)

- the image source `data.source=scenes`: the world through its tfds builder (`data.scenes_images`
  training scenes of seed `data.scenes_seed`; split `val` = held-out scenes), with a ground-truth
  `quality` check that the export stage runs on the initial and the final data (the demo's table);
- the eval benchmark `scenes_vqa`: grounded VQA on held-out scenes, judged by the checker;
- the source's own instruction data (`c3l_jax.scenes.student`): what the ablation's student is
  fine-tuned on besides the generated data (`config.ablation.student_data = "scenes"`).

A config turns it on with `config.plugins = "c3l_jax.scenes"` (`configs/scenes_*.py` do). Modules:

  world      scenes, rendering, co-occurrence statistics
  text       captions, grounded / generic QA, descriptions, the vocabulary
  checker    `check(scene, question, answer) -> Verdict`: image-dependent, correct, hallucinated
  dataset    the tfds builder (`load_split`)
  quality    dataset quality against ground truth, the `scenes_vqa` benchmark
  processor  the world's word-level tokenizer / image processor and the tiny model's training text
  student    the ablation student's own instruction data (`ablation.student_data=scenes`)
  pretrain   the command that trains the shipped model `checkpoints/scenes_tiny` and the student
             `checkpoints/scenes_student`: `python -m c3l_jax.scenes.pretrain` (see docs/scenes.md)
  grounded   its default recipe (`pretrain.recipe=grounded`): supervised tower, cached image tokens
  vision     its stage 0: supervised pretraining of the vision tower
  grounding  does a generator see? held-out measures and the thresholds a generator must meet
  modelio    base model, feature scale, export, generation through the loading path (shared)

The world's public names (`generate_world`, `render`, `captions`, `grounded_qa`, `check`, ...) are
re-exported here.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from c3l_jax import registry
from c3l_jax.scenes.checker import FOREIGN_SHAPES, Verdict, check
from c3l_jax.scenes.text import (NUMBER_WORDS, PUNCTUATION, QA_KINDS, SPECIAL_TOKENS, WORLD_COLOURS,
                                 captions, detailed_description, detokenize_words, generic_qa,
                                 grounded_qa, parse_qa_text, referring_expression, tokenize_words,
                                 vocabulary)
from c3l_jax.scenes.world import (BACKGROUNDS, COLOURS, GRID, IMAGE_SIZE, RGB, SHAPES, SIZE_FRACTION,
                                  SIZES, THEMES, TYPICAL_COLOUR, Scene, SceneObject, cooccurrence,
                                  file_name_for, generate_world, make_scene, negative_objects,
                                  object_names, render, render_png)

SOURCE = "scenes"
QUALITY_TITLE = "Generated data, checked against the scenes' ground truth:"


def _elements(config: Any, split: str) -> Sequence[dict]:
  from c3l_jax.data.sources import tfds_dir
  from c3l_jax.scenes import dataset

  return dataset.load_split(tfds_dir(config), split, config.data.scenes_images, config.data.scenes_seed)


def _quality(config: Any, source: Any, rows: Sequence[dict]) -> dict:
  del config
  from c3l_jax.scenes import quality

  return quality.dataset_quality(rows, quality.scene_lookup(source))


def _verdicts(config: Any, source: Any, rows: Sequence[dict]) -> list[dict]:
  del config
  from c3l_jax.scenes import quality

  return quality.verdicts(rows, quality.scene_lookup(source))


def _instruction_data(config: Any) -> list[dict]:
  from c3l_jax.scenes import student

  return student.from_config(config)


def _check(config: Any) -> str | None:
  n = config.data.scenes_images
  if not n >= 1:
    return f"config.data.scenes_images={n!r} is out of range (must be in [1, inf))"
  return None


def _scenes_vqa(evaluator: Any, eval_config: Any) -> dict:
  from c3l_jax.scenes import quality

  from c3l_jax import runtime

  # The answers go beside the eval's other files (WORKDIR/eval/), written by one process.
  path = os.path.join(evaluator.dir, "scenes_vqa_answers.jsonl") if runtime.get().is_lead else None
  if path:
    os.makedirs(evaluator.dir, exist_ok=True)
  return quality.scenes_vqa(evaluator.inf, eval_config.max_items or 100, evaluator.config.seed,
                            answers_path=path)


registry.register_source(registry.Source(SOURCE, _elements, quality=_quality,
                                         quality_title=QUALITY_TITLE, verdicts=_verdicts,
                                         check=_check, instruction_data=_instruction_data))
registry.register_benchmark(registry.Benchmark("scenes_vqa", _scenes_vqa, sources=(SOURCE,),
                                               summary=lambda m: {"vqa_acc": m.get("accuracy")}))

__all__ = ["BACKGROUNDS", "COLOURS", "FOREIGN_SHAPES", "GRID", "IMAGE_SIZE", "NUMBER_WORDS", "PUNCTUATION",
           "QA_KINDS", "QUALITY_TITLE", "RGB", "SHAPES", "SIZES", "SIZE_FRACTION", "SOURCE",
           "SPECIAL_TOKENS", "Scene", "SceneObject", "THEMES", "TYPICAL_COLOUR", "Verdict",
           "WORLD_COLOURS", "captions", "check", "cooccurrence", "detailed_description",
           "detokenize_words", "file_name_for", "generate_world", "generic_qa", "grounded_qa",
           "make_scene", "negative_objects", "object_names", "parse_qa_text", "referring_expression",
           "render", "render_png", "tokenize_words", "vocabulary"]
