"""POPE: Polling-based Object Probing Evaluation (Li et al., "Evaluating Object Hallucination in Large
Vision-Language Models", EMNLP 2023), as the reference code (github.com/RUCAIBox/POPE, `main.py`,
`utils.py`, `evaluate.py`) builds and scores it.

Construction (`build_splits`), from per-image ground-truth objects `{"image", "objects"}` (POPE's own
annotation format; COCO val2014 instance categories in the paper):

- images with at least `k` (3) ground-truth objects are eligible; `num_images` (500) are drawn at random;
- object frequencies and co-occurrence counts are computed over the *drawn* images (as the reference);
- per image, for each of its first `k` objects (the reference takes them in annotation order; here the
  order is a seeded shuffle, because the COCO builder lists names alphabetically) a "yes" question on
  that object is followed by a "no" question on an absent object, chosen by the split's strategy:
    random       uniform over all ground-truth object names of the drawn images,
    popular      the most frequent object (over the drawn images) not yet used and not present,
    adversarial  the object co-occurring most often with *this* positive object, not yet used and not
                 present,
  falling back to random when a ranking runs out (as the reference). So each image gives 2k questions,
  k "yes" and k "no", and a negative is never one of the image's objects.
- question: "Is there a {object} in the image?" ("an" before a vowel, as the official question files).
  The model is asked it in its family's words (`c3l_jax.data.prompts.EVAL_PROMPTS`: LLaVA-1.5 appends
  "\\nAnswer the question using a single word or phrase.", Qwen2.5-VL " Please answer yes or no.").

Answers are parsed as `evaluate.py` does (`parse_yes_no`) and scored with accuracy, precision, recall,
F1 and the yes-ratio (`metrics`; "yes" is the positive class). Official question files
(`coco_pope_{random,popular,adversarial}.json`, one JSON object per line: `question_id`, `image`, `text`,
`label`) are read by `read_question_files`.
"""

from __future__ import annotations

import glob
import os
import random
from typing import Any, Iterable, Sequence

from c3l_jax.data.records import BadInput, missing_field, read_jsonl

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
TEMPLATE = "Is there a {} in the image?"


def question_text(obj: str, template: str = TEMPLATE) -> str:
  """The POPE question for `obj`; "a" becomes "an" before a vowel (as in the official question files)."""
  if obj[:1].lower() in "aeiou" and obj[:1]:
    return template.replace(" a {}", " an {}").format(obj)
  return template.format(obj)


def object_statistics(images: Sequence[dict]) -> tuple[dict[str, int], dict[str, list[str]]]:
  """Per-object image counts and, per object, the other objects sorted by co-occurrence count.

  As the reference's `generate_ground_truth_objects` / `compute_co_occurrence`; ties (which the
  reference leaves to dict order) are broken by name, so the result does not depend on input order.
  """
  freq: dict[str, int] = {}
  pairs: dict[str, dict[str, int]] = {}
  for image in images:
    objects = list(dict.fromkeys(image["objects"]))
    for o in objects:
      freq[o] = freq.get(o, 0) + 1
      row = pairs.setdefault(o, {})
      for other in objects:
        if other != o:
          row[other] = row.get(other, 0) + 1
  ranked = {o: [b for b, _ in sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))]
            for o, row in pairs.items()}
  return freq, ranked


def _question(qid: int, image: dict, obj: str, label: str, split: str, template: str) -> dict:
  out = {"question_id": qid, "image": image["image"], "text": question_text(obj, template),
         "label": label, "object": obj, "category": split}
  if "image_id" in image:
    out["image_id"] = image["image_id"]
  return out


def build_split(images: Sequence[dict], strategy: str, k: int = 3, seed: int = 0,
                template: str = TEMPLATE, universe: Iterable[str] = ()) -> list[dict]:
  """The POPE questions of one split over already drawn `images` (`{"image", "objects"}`, >= k objects).

  Returns `[{"question_id", "image", "text", "label": "yes"|"no", "object", "category"}, ...]`:
  per image, k (positive, negative) pairs interleaved. `universe` adds object names to the random pool
  (the reference's pool is the drawn images' objects only).
  """
  if strategy not in SPLITS:
    raise ValueError(f"unknown POPE strategy {strategy!r} (valid: {', '.join(SPLITS)})")
  freq, co = object_statistics(images)
  pool = sorted(set(freq) | set(universe))
  popular = sorted(freq, key=lambda o: (-freq[o], o))
  rng = random.Random(f"pope:{strategy}:{seed}")
  questions: list[dict] = []
  for image in images:
    present = set(image["objects"])
    if len(present) < k:
      raise ValueError(f"image {image['image']!r} has {len(present)} objects; POPE needs >= {k}")
    history: list[str] = []
    for pos in list(dict.fromkeys(image["objects"]))[:k]:
      history.append(pos)
      questions.append(_question(len(questions), image, pos, "yes", strategy, template))
      ranking = {"random": [], "popular": popular, "adversarial": co.get(pos, [])}[strategy]
      neg = next((o for o in ranking if o not in history and o not in present), None)
      if neg is None:  # random, or the ranking ran out: uniform over the pool (the reference's loop)
        free = [o for o in pool if o not in history and o not in present]
        if not free:
          raise ValueError(f"image {image['image']!r}: no absent object left to ask about "
                           f"({len(pool)} object names in all)")
        neg = free[rng.randrange(len(free))]
      history.append(neg)
      questions.append(_question(len(questions), image, neg, "no", strategy, template))
  return questions


def draw_images(annotations: Sequence[dict], num_images: int, k: int = 3, seed: int = 0
                ) -> list[dict]:
  """POPE's image draw: images with >= k objects (and >= k absent names), `num_images` of them at random.

  Each image's objects are deduplicated and put in a seeded random order (the reference asks about
  the first k in annotation order). `num_images` = 0 or more than eligible: all eligible, in order.
  """
  universe = {o for a in annotations for o in a["objects"]}
  eligible = [a for a in annotations
              if len(set(a["objects"])) >= k and len(universe - set(a["objects"])) >= k]
  rng = random.Random(f"pope:images:{seed}")
  if num_images and num_images < len(eligible):
    eligible = rng.sample(eligible, num_images)
  drawn = []
  for a in eligible:
    objects = list(dict.fromkeys(a["objects"]))
    rng.shuffle(objects)
    drawn.append({**a, "objects": objects})
  return drawn


def effective_k(k: int, universe: Iterable[str]) -> int:
  """k, lowered to half the number of object names when there are too few (the scenes world has 5
  shapes: 2 present + 2 absent per image)."""
  return max(1, min(k, len(set(universe)) // 2))


def build_splits(annotations: Sequence[dict], num_images: int = 500, k: int = 3, seed: int = 0,
                 template: str = TEMPLATE) -> dict[str, list[dict]]:
  """The three POPE splits (`random`, `popular`, `adversarial`) over one image draw (POPE `main.py`)."""
  universe = {o for a in annotations for o in a["objects"]}
  images = draw_images(annotations, num_images, k, seed)
  if not images:
    raise ValueError(f"no image has >= {k} annotated objects and >= {k} absent object names "
                     f"({len(annotations)} images, {len(universe)} object names)")
  return {s: build_split(images, s, k, seed, template, universe) for s in SPLITS}


def _check_annotation(rec: dict) -> str | None:
  problem = missing_field(rec, ("image",), str)
  if problem is None and not (isinstance(rec.get("objects"), list)
                              and all(isinstance(o, str) and o.strip() for o in rec["objects"])):
    problem = "'objects' must be a list of object names"
  return problem


def read_annotations(path: str, strict: bool = False) -> tuple[list[dict], list[dict]]:
  """POPE's ground-truth object file: one `{"image": ..., "objects": [...]}` JSON object per line.
  Returns `(annotations, rejected)` (bad lines with their reason; `strict` raises on the first)."""
  return read_jsonl(path, _check_annotation, strict)


def _check_question(rec: dict) -> str | None:
  problem = missing_field(rec, ("image", "text", "label"), str)
  if problem is None and rec["label"].strip().lower() not in ("yes", "no"):
    problem = f"label must be yes or no, got {rec['label']!r}"
  return problem


def read_question_files(directory: str, strict: bool = False
                        ) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
  """Official POPE question files in `directory`: `*pope_{split}.json[l]` for each split (JSON lines).
  Returns the questions and the rejected lines per split (no image / text / yes-no label)."""
  out, rejected = {}, {}
  for split in SPLITS:
    paths = sorted(glob.glob(os.path.join(directory, f"*pope_{split}.json*")))
    if not paths:
      raise BadInput(f"no POPE {split} question file (*pope_{split}.json) in {directory!r}")
    rows, rejected[split] = read_jsonl(paths[0], _check_question, strict)
    for r in rows:
      r.setdefault("category", split)
    out[split] = rows
  return out, rejected


def parse_yes_no(text: str) -> str:
  """POPE `evaluate.py`: keep the first sentence, drop commas, split on spaces; "no" iff one of the
  words is exactly `No`, `no` or `not`, else "yes" (so "Not sure" and "NO" count as yes, as there)."""
  if "." in text:
    text = text.split(".")[0]
  words = text.replace(",", "").split(" ")
  return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
  """Accuracy, precision, recall, F1 (positive class "yes") and yes-ratio, as POPE `evaluate.py`.

  Where the reference divides by zero (no "yes" prediction or label) the value is 0.0.
  """
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  pred = [p == "yes" for p in predictions]
  gold = [str(lab).lower() != "no" for lab in labels]
  tp = sum(p and g for p, g in zip(pred, gold))
  fp = sum(p and not g for p, g in zip(pred, gold))
  tn = sum(not p and not g for p, g in zip(pred, gold))
  fn = sum(not p and g for p, g in zip(pred, gold))
  n = len(pred)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall,
          "f1": f1, "yes_ratio": sum(pred) / n if n else 0.0, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
          "n": n}


def summarize(per_split: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Per-split metrics plus their unweighted means over the splits (`mean_f1` is Table 1's POPE)."""
  out: dict[str, Any] = dict(per_split)
  for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
    values = [m[key] for m in per_split.values()]
    out[f"mean_{key}"] = sum(values) / len(values) if values else 0.0
  return out


__all__ = ["SPLITS", "TEMPLATE", "build_split", "build_splits", "draw_images",
           "effective_k", "metrics", "object_statistics", "parse_yes_no", "question_text",
           "read_annotations", "read_question_files", "summarize"]
