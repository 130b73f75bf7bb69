"""Ground-truth quality of generated QA data in the synthetic scenes world (does C3L raise relevance?).

For every QA record, `c3l_jax.scenes.checker.check` against the record's scene gives: is it
image-dependent, is it correct, which absent objects it mentions. Over a dataset:

  relevance      fraction of QA that are image-dependent
  accuracy       fraction of image-dependent QA whose correctness can be decided that are correct
  hallucination  fraction of QA mentioning an object absent from the scene
  avg_question_words / avg_answer_words   whitespace words, as Table 2 of the paper
  mean_i2c       mean S(I2C) (records scored with the base model)
  i2c_auc        ROC-AUC of S(I2C) for telling image-dependent from image-independent QA

`scenes_vqa` is the `scenes_vqa` eval benchmark (registered by `c3l_jax.scenes`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from c3l_jax.data.records import write_jsonl
from c3l_jax.scenes import checker as checker_lib
from c3l_jax.scenes import text as text_lib
from c3l_jax.scenes import world as world_lib


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
  """Area under the ROC curve: P(score of a random positive > a random negative), ties count 1/2.

  None when one class is empty. Computed with average ranks (the Mann-Whitney U statistic).
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels, bool)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    return None
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores), np.float64)
  sorted_scores = scores[order]
  i = 0
  while i < len(scores):  # average ranks over ties
    j = i
    while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
  return float(u / (n_pos * n_neg))


def verdicts(rows: Sequence[dict], scene_of: Callable[[str], world_lib.Scene]) -> list[dict]:
  """The checker's verdict on each QA row, as the registry's `verdicts` hook returns it."""
  out = []
  for r in rows:
    v = checker_lib.check(scene_of(r["image"]), r["question"], r["answer"])
    out.append({"image_dependent": v.image_dependent, "correct": v.correct,
                "hallucinated": bool(v.hallucinated), "kind": v.kind})
  return out


def dataset_quality(rows: Sequence[dict], scene_of: Callable[[str], world_lib.Scene]) -> dict:
  """The metrics above for QA `rows` (`image`, `question`, `answer`, optional `i2c`)."""
  if not rows:
    return {"instances": 0}
  verdicts = [checker_lib.check(scene_of(r["image"]), r["question"], r["answer"]) for r in rows]
  dependent = [v.image_dependent for v in verdicts]
  decided = [v.correct for v in verdicts if v.image_dependent and v.correct is not None]
  out = {
      "instances": len(rows),
      "relevance": float(np.mean(dependent)),
      "accuracy": float(np.mean(decided)) if decided else None,
      "hallucination": float(np.mean([bool(v.hallucinated) for v in verdicts])),
      "avg_question_words": float(np.mean([len(r["question"].split()) for r in rows])),
      "avg_answer_words": float(np.mean([len(r["answer"].split()) for r in rows])),
  }
  scored = [(r["i2c"], d) for r, d in zip(rows, dependent) if isinstance(r.get("i2c"), (int, float))]
  if scored:
    out["mean_i2c"] = float(np.mean([s for s, _ in scored]))
    out["i2c_auc"] = roc_auc([s for s, _ in scored], [d for _, d in scored])
  return out


def scene_lookup(source) -> Callable[[str], world_lib.Scene]:
  """`image key -> Scene` over a scenes `ImageSource` (its tfds elements carry the annotation)."""
  cache: dict[str, world_lib.Scene] = {}

  def scene_of(image: str) -> world_lib.Scene:
    if image not in cache:
      cache[image] = world_lib.Scene.from_json(source.element(image)["annotation"])
    return cache[image]

  return scene_of


def vqa_questions(items: Sequence, seed: int, per_image: int = 2) -> list[dict]:
  """Grounded VQA over held-out scenes: `per_image` questions per `ImageItem` (kinds cycle), seeded."""
  rng = np.random.default_rng(seed)
  out = []
  for item in items:
    scene = world_lib.Scene.from_json(item.annotation)
    for k in range(per_image):
      kind = text_lib.QA_KINDS[(len(out) + k) % len(text_lib.QA_KINDS)]
      question, answer = text_lib.grounded_qa(scene, rng, kind)
      out.append({"image": item.image, "question": question, "reference": answer, "scene": scene})
  return out


def scenes_vqa(inf, limit: int = 100, seed: int = 0, max_new_tokens: int = 8,
               answers_path: str | None = None) -> dict:
  """Accuracy of the model's short answers to grounded questions, judged by `scenes.check`.

  `inf` is a `c3l_jax.pipeline.common.Inference` whose source is the scenes world (use the `val` split
  for held-out scenes). An answer counts as right when the checker says it is correct for the scene.
  `answers_path`: where to write one JSON line per question (`image`, `question`, `reference`,
  `answer`, `kind`, `correct`: true / false / null when the checker cannot decide, `hallucinated`), so
  the accuracy can be recounted from the file (metrics' `answers`).
  """
  import jax

  from c3l_jax.data.prompts import eval_prompts

  items, _ = inf.source.items(limit)
  questions = vqa_questions(items, seed)
  # The family's short-answer VQA words (LLaVA-1.5's, which the scenes model is trained on, for llava15)
  cfg = getattr(getattr(inf, "model", None), "cfg", None)
  ask = eval_prompts(getattr(cfg, "family", "llava15")).ask_short
  prompts, pixels = [], []
  for q in questions:
    ids, px = inf.builder.encode_prompt(ask(q["question"]), inf.source.load(q["image"]))
    prompts.append(ids)
    pixels.append(px)
  keys = jax.random.split(jax.random.key(seed), len(prompts))
  answers, _ = inf.generate(prompts, pixels, keys, max_new_tokens)
  verdicts = [checker_lib.check(q["scene"], q["question"], a) for q, a in zip(questions, answers)]
  by_kind: dict[str, list[bool]] = {}
  kinds = [checker_lib.check(q["scene"], q["question"], q["reference"]).kind for q in questions]
  for kind, v in zip(kinds, verdicts):
    by_kind.setdefault(kind, []).append(v.correct is True)
  extra = {}
  if answers_path:
    write_jsonl(answers_path, [
        {"image": q["image"], "question": q["question"], "reference": q["reference"], "answer": a,
         "kind": kind, "correct": v.correct, "hallucinated": list(v.hallucinated)}
        for q, a, kind, v in zip(questions, answers, kinds, verdicts)])
    extra["answers"] = answers_path
  return {**extra, "questions": len(questions),
          "accuracy": float(np.mean([v.correct is True for v in verdicts])) if verdicts else None,
          "hallucination": float(np.mean([bool(v.hallucinated) for v in verdicts])) if verdicts else None,
          "by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}}


__all__ = ["dataset_quality", "roc_auc", "scene_lookup", "scenes_vqa", "verdicts", "vqa_questions"]
