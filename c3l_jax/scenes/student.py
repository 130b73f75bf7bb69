"""The scenes student's own instruction data: what a LLaVA-style model's own fine-tune mix would hold.

The paper's student (LLaVA-7B) already follows instructions when the generated data fine-tune it: its
own instruction mix (LLaVA-1.5's 665k: short-answer VQA, yes / no questions, conversations and
descriptions) taught it to. The scenes world's student (`checkpoints/scenes_student`) learnt captions
only, so the ablation mixes this data into every fine-tune (`config.ablation.student_data="scenes"`,
`c3l_jax/pipeline/ablation.py`). Built from the world's ground truth, three records per scene of the
*training* split (scenes `0 .. data.scenes_images - 1` of world `data.scenes_seed`: the images the
generator writes its data for; the eval's held-out `val` scenes come after them and are never used):

  vqa          a grounded question (`scenes.grounded_qa`, kinds cycling over the scenes) with LLaVA's
               short-answer suffix, answered in a word or phrase (`processor.short_answer`)
  yes_no       "is there a <shape> ...?" with the suffix, answered "Yes" / "No": exactly half of the
               scenes (rounded down) are asked about an absent shape, the others about a present one
               (a scene showing every shape always gets a present one)
  description  a detailed-description request -> `scenes.detailed_description(scene)`

Every record is a function of (`seed`, the scene): `student_data(world, seed)`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from c3l_jax.scenes import processor as sm
from c3l_jax.scenes import text as text_lib
from c3l_jax.scenes import world as world_lib

KINDS = ("vqa", "yes_no", "description")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # as the eval's prompts end
# Yes / no object questions about one shape (`{a}` is its article).
YES_NO_TEMPLATES = ("is there {a} {s} in the image ?", "is there {a} {s} ?", "do you see {a} {s} ?",
                    "does the image contain {a} {s} ?")
_SALT = 29


def _short_vqa(scene: world_lib.Scene, rng: np.random.Generator, kind: str) -> tuple[str, str]:
  """A grounded question of `kind` whose answer has a word-or-phrase form (16 draws), with the suffix."""
  for _ in range(16):
    q, a = text_lib.grounded_qa(scene, rng, kind)
    short = sm.short_answer(q, a)
    if short is not None:
      return q + SHORT_ANSWER, short
  q, a = text_lib.grounded_qa(scene, rng, "shape")  # "what shape is ...?" always has a one-word answer
  return q + SHORT_ANSWER, str(sm.short_answer(q, a) or a)


def student_data(world: Sequence[world_lib.Scene], seed: int) -> list[dict]:
  """Three records per scene of `world` (see the module docstring): `id`, `image`, `question`,
  `answer`, `kind`, `scene` (the image id), in scene order."""
  present = [world_lib.object_names(s) for s in world]
  can_be_absent = [i for i, p in enumerate(present) if len(p) < len(world_lib.SHAPES)]
  order = np.random.default_rng([seed, _SALT]).permutation(len(can_be_absent))
  absent_scenes = {can_be_absent[int(j)] for j in order[:len(world) // 2]}
  out = []
  for i, scene in enumerate(world):
    rng = np.random.default_rng([seed, _SALT, scene.image_id])
    base = {"image": scene.file_name, "scene": scene.image_id}
    q, a = _short_vqa(scene, rng, text_lib.QA_KINDS[i % len(text_lib.QA_KINDS)])
    out.append({"id": f"student-{scene.image_id:06d}-vqa", **base, "question": q, "answer": a,
                "kind": "vqa"})
    exists = i not in absent_scenes
    choices = present[i] if exists else [s for s in world_lib.SHAPES if s not in present[i]]
    shape = choices[int(rng.integers(len(choices)))]
    template = YES_NO_TEMPLATES[int(rng.integers(len(YES_NO_TEMPLATES)))]
    q = text_lib.detokenize_words(template.format(a=text_lib._article(shape), s=shape).split())  # noqa: SLF001
    out.append({"id": f"student-{scene.image_id:06d}-yes_no", **base, "question": q + SHORT_ANSWER,
                "answer": "Yes" if exists else "No", "kind": "yes_no"})
    request = sm.DESCRIPTION_REQUESTS[int(rng.integers(len(sm.DESCRIPTION_REQUESTS)))]
    out.append({"id": f"student-{scene.image_id:06d}-description", **base, "question": request,
                "answer": text_lib.detailed_description(scene), "kind": "description"})
  return out


def from_config(config: Any) -> list[dict]:
  """The registry hook: the data for the config's training split (`data.scenes_images` scenes of world
  `data.scenes_seed`, exactly the tfds `train` split's scenes) and `seed`."""
  world = world_lib.generate_world(config.data.scenes_images, config.data.scenes_seed)
  return student_data(world, config.seed)


__all__ = ["KINDS", "SHORT_ANSWER", "YES_NO_TEMPLATES", "from_config", "student_data"]
