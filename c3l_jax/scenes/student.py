"""The scenes student's own instruction data: what a LLaVA-style model's own fine-tune mix would hold.

The paper's student (LLaVA-7B) already follows instructions when the generated data fine-tune it: its
own instruction mix (LLaVA-1.5's 665k: short-answer VQA, yes / no questions, conversations and
descriptions) taught it to. The scenes world's student (`checkpoints/scenes_student`) learnt captions
only, so the ablation mixes this data into every fine-tune (`config.ablation.student_data="scenes"`,
`c3l_jax/pipeline/ablation.py`). Built from the world's ground truth, on each scene of the
*training* split (scenes `0 .. data.scenes_images - 1` of world `data.scenes_seed`: the images the
generator writes its data for; the eval's held-out `val` scenes come after them and are never used):

  vqa          a grounded question (`scenes.grounded_qa`, kinds cycling over the scenes) with LLaVA's
               short-answer suffix, answered in a word or phrase (`processor.short_answer`)
  yes_no       "is there a <shape> ...?" with the suffix, answered "Yes" / "No": per scene as many
               questions on absent shapes as on present ones (min(present, absent) of each, shapes
               drawn at random), so an answer depends on the shape asked, not on the image alone
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
  """The records of `world` (see the module docstring): `id`, `image`, `question`, `answer`, `kind`,
  `scene` (the image id), in scene order."""
  out = []
  for i, scene in enumerate(world):
    rng = np.random.default_rng([seed, _SALT, scene.image_id])
    base = {"image": scene.file_name, "scene": scene.image_id}
    q, a = _short_vqa(scene, rng, text_lib.QA_KINDS[i % len(text_lib.QA_KINDS)])
    out.append({"id": f"student-{scene.image_id:06d}-vqa", **base, "question": q, "answer": a,
                "kind": "vqa"})
    present = world_lib.object_names(scene)
    absent = [s for s in world_lib.SHAPES if s not in present]
    pairs = min(len(present), len(absent))
    asked = [(str(s), "Yes") for s in rng.permutation(present)[:pairs]]
    asked += [(str(s), "No") for s in rng.permutation(absent)[:pairs]]
    for j in rng.permutation(len(asked)):
      shape, answer = asked[int(j)]
      template = YES_NO_TEMPLATES[int(rng.integers(len(YES_NO_TEMPLATES)))]
      article = text_lib._article(shape)  # noqa: SLF001
      q = text_lib.detokenize_words(template.format(a=article, s=shape).split())
      out.append({"id": f"student-{scene.image_id:06d}-yes_no-{shape}", **base,
                  "question": q + SHORT_ANSWER, "answer": answer, "kind": "yes_no"})
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
