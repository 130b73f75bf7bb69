"""Multiple-choice benchmarks: SEED-Bench (image tasks) and MMBench dev with CircularEval.

Files (official releases, read from disk; nothing is downloaded):

- SEED-Bench (v1, Li et al. 2023): `SEED-Bench.json` (`{"questions": [...], "question_type": {name: id}}`,
  each question `question_id`, `question`, `choice_a`..`choice_d`, `answer` (letter), `data_id`,
  `data_type`, `question_type_id`) and the image folder (`SEED-Bench-image/`, `data_id` = file name).
  As the C3L paper (following Du et al. 2023), only the image tasks are evaluated: `data_type == "image"`
  (dimensions 1-9); the video dimensions 10-12 are skipped.
- MMBench dev (Liu et al. 2023): the TSV (`mmbench_dev_20230712.tsv` as LLaVA-1.5 uses, or
  `MMBench_DEV_EN.tsv`) with columns `index, question, hint, A, B, C, D, answer, category, image` (base64;
  a short all-digit value refers to another row's image), options being the non-empty letter columns.

Answer selection (`eval.mc_mode`):

- `loglik`: SEED-Bench's official protocol (its `eval.py` + model interface): each option's text is scored
  as the answer to the bare question (plus MMBench's hint), and the option with the highest mean
  per-token log-likelihood (lowest loss) wins. Options are scored independently of their order, so
  CircularEval's rotations all get the same answer.
- `generate`: LLaVA-1.5's prompt: `{hint}\\n{question}\\nA. ..\\nB. ..` + "Answer with the option's letter
  from the given choices directly.", greedy; the letter is read from the text as MMBench's `can_infer`
  does (`parse_choice`).

CircularEval (MMBench): a question with N options is asked N times, the options rotated by one each
time (LLaVA's `--all-rounds`: `options[1:] + options[:1]`); it counts as right only if every rotation is
answered right (`circular_correct`). Accuracy is reported per task (SEED dimension / MMBench category)
and overall (over all questions).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import json
import os
import string
import sys
from typing import Any, Sequence

LETTERS = string.ascii_uppercase
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
SEED_IMAGE_TASKS = 9  # SEED-Bench v1 dimensions 1-9 are the image tasks


@dataclasses.dataclass(frozen=True)
class MCItem:
  """One multiple-choice question: `answer` indexes `options`; the image is a path or raw bytes."""

  id: str
  question: str
  options: tuple[str, ...]
  answer: int
  task: str
  hint: str = ""
  image: str = ""  # path (SEED) or a key (MMBench: "mmbench/<index>")
  image_bytes: bytes | None = None


def load_seed_bench(json_path: str, image_dir: str) -> list[MCItem]:
  """SEED-Bench v1 image questions (dimensions 1-9, `data_type == "image"`), in file order."""
  with open(json_path, encoding="utf-8") as f:
    data = json.load(f)
  questions = data["questions"] if isinstance(data, dict) else data
  names = {int(v): k for k, v in (data.get("question_type", {}) if isinstance(data, dict) else {}).items()}
  items = []
  for q in questions:
    if q.get("data_type") != "image" or int(q.get("question_type_id", 0)) > SEED_IMAGE_TASKS:
      continue
    options = tuple(str(q[f"choice_{c}"]) for c in "abcd")
    tid = int(q["question_type_id"])
    items.append(MCItem(id=str(q["question_id"]), question=str(q["question"]), options=options,
                        answer=LETTERS.index(str(q["answer"]).strip().upper()),
                        task=names.get(tid, f"dimension {tid}"),
                        image=os.path.join(image_dir, str(q["data_id"]))))
  return items


def _present(value: Any) -> bool:
  return value is not None and str(value).strip() != "" and str(value).strip().lower() != "nan"


def load_mmbench(tsv_path: str) -> list[MCItem]:
  """MMBench questions from its TSV (base64 images), in file order."""
  csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
  with open(tsv_path, encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  images = {str(r["index"]): r.get("image", "") for r in rows}
  items = []
  for r in rows:
    options = []
    for letter in LETTERS[:8]:
      if letter in r and _present(r[letter]):
        options.append(str(r[letter]))
      else:
        break
    image = r.get("image", "") or ""
    if image.isdigit() and len(image) < 64:  # a reference to another row's image
      image = images.get(image, "")
    answer = str(r.get("answer", "")).strip().upper()
    if answer not in LETTERS[:len(options)]:
      raise ValueError(f"{tsv_path}: question {r['index']!r} has answer {answer!r} outside its "
                       f"{len(options)} options (the dev split has answers; test does not)")
    items.append(MCItem(id=str(r["index"]), question=str(r["question"]), options=tuple(options),
                        answer=LETTERS.index(answer), task=str(r.get("category", "") or "all"),
                        hint=str(r["hint"]) if _present(r.get("hint")) else "",
                        image=f"mmbench/{r['index']}", image_bytes=base64.b64decode(image)))
  return items


def rotated(item: MCItem, r: int) -> tuple[tuple[str, ...], int]:
  """Options rotated left by `r` (CircularEval pass r) and the index of the right one among them."""
  n = len(item.options)
  r %= n
  return item.options[r:] + item.options[:r], (item.answer - r) % n


def question_text(item: MCItem) -> str:
  """The question as asked (the hint first, as LLaVA's MMBench prompt)."""
  return f"{item.hint}\n{item.question}" if item.hint else item.question


def choice_prompt(item: MCItem, options: Sequence[str]) -> str:
  """LLaVA-1.5's multiple-choice prompt (`model_vqa_mmbench.py` / the SEED question file)."""
  lines = [question_text(item)] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
  return "\n".join(lines) + "\n" + MC_SUFFIX


def parse_choice(text: str, options: Sequence[str]) -> int | None:
  """Which option a generated answer names, as MMBench's `can_infer` (option letter, then option text).

  1. Punctuation `.()[],:;!*#{}` becomes spaces; if exactly one option letter appears as a word, it.
  2. Else if exactly one option's text occurs in the answer (case-insensitive), it.
  3. Else None (counted wrong).
  """
  letters = LETTERS[:len(options)]
  mod = text
  for c in ".()[],:;!*#{}":
    mod = mod.replace(c, " ")
  words = mod.split()
  found = [i for i, ch in enumerate(letters) if ch in words]
  if len(found) == 1:
    return found[0]
  lower = text.lower()
  found = [i for i, o in enumerate(options) if o.strip() and o.lower() in lower]
  return found[0] if len(found) == 1 else None


def argmax_first(scores: Sequence[float]) -> int:
  """Index of the highest score (the first on ties)."""
  best = 0
  for i, s in enumerate(scores):
    if s > scores[best]:
      best = i
  return best


def circular_correct(predictions: Sequence[int | None], answers: Sequence[int]) -> bool:
  """CircularEval: right only if every rotation's prediction is that rotation's right option."""
  return len(predictions) == len(answers) and all(p == a for p, a in zip(predictions, answers))


def accuracy(results: Sequence[dict]) -> dict[str, Any]:
  """`results`: `{"task", "correct"}` per question -> `{"overall", "n", "per_task": {task: acc}}` (in %)."""
  per: dict[str, list[bool]] = {}
  for r in results:
    per.setdefault(r["task"], []).append(bool(r["correct"]))
  n = len(results)
  return {"overall": 100.0 * sum(bool(r["correct"]) for r in results) / n if n else 0.0, "n": n,
          "per_task": {t: 100.0 * sum(v) / len(v) for t, v in sorted(per.items())}}


__all__ = ["LETTERS", "MCItem", "MC_SUFFIX", "accuracy", "argmax_first", "choice_prompt",
           "circular_correct", "load_mmbench", "load_seed_bench", "parse_choice", "question_text",
           "rotated"]
