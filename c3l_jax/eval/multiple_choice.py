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
- `generate`: the family's multiple-choice prompt (`c3l_jax.data.prompts.EVAL_PROMPTS`; LLaVA-1.5's is
  `{hint}\\n{question}\\nA. ..\\nB. ..` + "Answer with the option's letter from the given choices
  directly.", Qwen2.5-VL's VLMEvalKit's `Hint: ..\\nQuestion: ..\\nOptions:\\nA. ..` + "Please select the
  correct answer from the options above."), greedy; the letter is read from the text as MMBench's
  `can_infer` does (`parse_choice`).

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

from c3l_jax.data.records import BadInput, Quarantine, missing_field

LETTERS = string.ascii_uppercase
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


SEED_FIELDS = ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer",
               "data_id")


def load_seed_bench(json_path: str, image_dir: str, strict: bool = False
                    ) -> tuple[list[MCItem], list[dict]]:
  """SEED-Bench v1 image questions (dimensions 1-9, `data_type == "image"`), in file order, and the
  rejected ones (`{"raw", "reason", "index"}`: not an object, a missing field, an answer that is not
  A-D, a repeated `question_id`); `strict` raises on the first. Video questions are skipped."""
  data = _read_json(json_path)
  questions = data.get("questions") if isinstance(data, dict) else data
  if not isinstance(questions, list):
    raise BadInput(f"{json_path}: not a SEED-Bench file (a list of questions, or "
                   "{\"questions\": [...]})")
  types = data.get("question_type", {}) if isinstance(data, dict) else {}
  names = {int(v): k for k, v in types.items() if str(v).strip().isdigit()}
  items: list[MCItem] = []
  bad, seen = Quarantine(json_path, strict), set()
  for i, q in enumerate(questions):
    if not isinstance(q, dict):
      bad.add(q, f"a question must be a JSON object, got {type(q).__name__}", index=i)
      continue
    if q.get("data_type", "image") != "image":
      continue  # video dimensions 10-12: not evaluated
    tid = str(q.get("question_type_id", "")).strip()
    if not tid.isdigit():
      bad.add(q, f"question_type_id must be a dimension number, got {q.get('question_type_id')!r}",
              index=i)
      continue
    if int(tid) > SEED_IMAGE_TASKS:
      continue
    problem = missing_field(q, SEED_FIELDS, (str, int, float))
    answer = str(q.get("answer", "")).strip().upper()
    if problem is None and answer not in LETTERS[:4]:
      problem = f"answer {q['answer']!r} is not one of A-D"
    if problem is None and str(q["question_id"]) in seen:
      problem = f"duplicate question_id {q['question_id']!r}"
    if problem:
      bad.add(q, problem, index=i)
      continue
    seen.add(str(q["question_id"]))
    items.append(MCItem(id=str(q["question_id"]), question=str(q["question"]),
                        options=tuple(str(q[f"choice_{c}"]) for c in "abcd"),
                        answer=LETTERS.index(answer), task=names.get(int(tid), f"dimension {tid}"),
                        image=os.path.join(image_dir, str(q["data_id"]))))
  return items, bad.rows


def _read_json(path: str) -> Any:
  if not os.path.isfile(path):
    raise BadInput(f"{path}: file not found")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadInput(f"{path}: not a JSON file ({e})") from None


def _present(value: Any) -> bool:
  return value is not None and str(value).strip() != "" and str(value).strip().lower() != "nan"


def load_mmbench(tsv_path: str, strict: bool = False) -> tuple[list[MCItem], list[dict]]:
  """MMBench questions from its TSV (base64 images), in file order, and the rejected rows
  (`{"raw": row without its image, "reason", "line"}`: no index or question, fewer than 2 options, an
  answer outside the options (the test split has none), a missing, unknown or non-base64 image, a
  repeated index); `strict` raises on the first."""
  if not os.path.isfile(tsv_path):
    raise BadInput(f"{tsv_path}: file not found")
  csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
  with open(tsv_path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f, delimiter="\t")
    missing = [c for c in ("index", "question", "answer", "image") if c not in (reader.fieldnames or ())]
    if missing:
      raise BadInput(f"{tsv_path}: not an MMBench TSV (no column {missing[0]!r})")
    rows = [(reader.line_num, r) for r in reader]
  images = {str(r["index"]).strip(): r.get("image") or "" for _, r in rows}
  items: list[MCItem] = []
  bad, seen = Quarantine(tsv_path, strict), set()
  for line, r in rows:
    raw = {k: v for k, v in r.items() if k != "image" and k is not None}
    index = str(r.get("index") or "").strip()
    options = []
    for letter in LETTERS[:8]:
      if not _present(r.get(letter)):
        break
      options.append(str(r[letter]))
    image = (r.get("image") or "").strip()
    if image.isdigit() and len(image) < 64:  # a reference to another row's image
      image = images.get(image, "").strip()
    answer = str(r.get("answer") or "").strip().upper()
    problem = None
    if not index or not _present(r.get("question")):
      problem = "no index or no question"
    elif index in seen:
      problem = f"duplicate index {index!r}"
    elif len(options) < 2:
      problem = f"{len(options)} options (a question needs at least 2)"
    elif answer not in LETTERS[:len(options)]:
      problem = (f"answer {answer!r} is outside its {len(options)} options (the dev split has answers; "
                 "test does not)")
    elif not image or image.isdigit():
      problem = "no image (or a reference to a row without one)"
    else:
      try:
        data = base64.b64decode(image, validate=True)
      except ValueError:
        problem = "image is not valid base64"
    if problem:
      bad.add(raw, problem, line=line)
      continue
    seen.add(index)
    items.append(MCItem(id=index, question=str(r["question"]), options=tuple(options),
                        answer=LETTERS.index(answer), task=str(r.get("category", "") or "all"),
                        hint=str(r["hint"]) if _present(r.get("hint")) else "",
                        image=f"mmbench/{index}", image_bytes=data))
  return items, bad.rows


def rotated(item: MCItem, r: int) -> tuple[tuple[str, ...], int]:
  """Options rotated left by `r` (CircularEval pass r) and the index of the right one among them."""
  n = len(item.options)
  r %= n
  return item.options[r:] + item.options[:r], (item.answer - r) % n


def question_text(item: MCItem) -> str:
  """The question as asked (the hint first, as LLaVA's MMBench prompt)."""
  return f"{item.hint}\n{item.question}" if item.hint else item.question


def choice_prompt(item: MCItem, options: Sequence[str], prompts: Any = None) -> str:
  """The multiple-choice prompt of `prompts` (an `EvalPrompts`; None: LLaVA-1.5's, as its
  `model_vqa_mmbench.py` / SEED question file) for `item` with `options` in this order."""
  if prompts is None:
    from c3l_jax.data.prompts import LLAVA15_EVAL_PROMPTS as prompts
  return prompts.ask_choice(item.question, options, item.hint)


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


__all__ = ["LETTERS", "MCItem", "accuracy", "argmax_first", "choice_prompt",
           "circular_correct", "load_mmbench", "load_seed_bench", "parse_choice", "question_text",
           "rotated"]
