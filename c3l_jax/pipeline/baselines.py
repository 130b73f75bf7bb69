"""Alternative selections of C3L's pseudo-labels (Table 5 of the paper): `select.method` =
`self_instruct`, `vigc` or `random`, besides the paper's `i2c` (`select.annotate_i2c`).

Every method returns the rows with `role` (`positive | negative | unused`) and `top_fraction` (bool), the
contract of the select stage: per image at most one positive and `train.max_negatives` negatives (L_c,
eq. 3), and `top_fraction` on ceil(`select.top_fraction` x N) samples (L_r). The L_r budget is the same
as `i2c`'s so that only *which* samples are chosen differs.

- `self_instruct` (Wang et al. 2022, "Self-Instruct"): the paper applies Self-Instruct's filtering and
  post-processing and takes the surviving samples as positives. Filters (`self_instruct_problem`), with
  the question as the instruction and the answer as the output:
    from `bootstrap_instructions.py`: questions of <= 3 or > 150 words; starting with punctuation or a
    non-ASCII character; starting with "Write a program"; a question whose ROUGE-L F-measure with an
    already kept question (of the same image) is > 0.7. The keyword filter ("image", "picture", ...) is
    left out: it removes what a text-only LM cannot do, which is the point of VLIT data.
    from `prepare_for_finetuning.py`: an empty answer; the answer equal to the question; a question or
    answer ending with ":"; the same question with different answers (all of them dropped); exact
    duplicates (the first kept).
  Per image the first surviving sample is the positive and the filtered ones are the negatives;
  `top_fraction` is drawn at random (seeded) among the survivors. `select_reason` says why a sample was
  filtered ("" = kept).
- `vigc` (Wang et al. 2023, "VIGC"): the model regenerates an answer for each image's first question by
  iterative generation: round r prompts with the image, the question and the sentences kept so far
  (as the start of the answer) and keeps the first sentence of what it writes, for up to
  `VIGC_MAX_ROUNDS` rounds or until a round writes nothing. These iterative samples (new rows,
  `generator = "vigc_iterative"`, id `<first id>_vigc`, scored with S(I2C) like the score stage so every
  row has the same fields) are the positives, the image's directly generated samples the negatives;
  `top_fraction` is drawn at random among the iterative samples. Needs the model (the select stage
  loads it for this method).
- `random`: a seeded random positive and negatives per image and a random `top_fraction` (control).

ROUGE-L is implemented here (`rouge_l`): the LCS F-measure over lower-cased alphanumeric tokens, as the
`rouge_score` package that Self-Instruct uses (no stemming).
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Sequence

import numpy as np

ROUGE_THRESHOLD = 0.7  # Self-Instruct: a new instruction with ROUGE-L > 0.7 to a kept one is dropped
VIGC_MAX_ROUNDS = 4
SALT = 4  # = common.SALTS["select"]


# ------------------------------------------------------------------------------------------- ROUGE-L

def rouge_tokens(text: str) -> list[str]:
  """`rouge_score.tokenize`: lower case, non-alphanumerics to spaces, split."""
  return [t for t in re.sub(r"[^a-z0-9]+", " ", text.lower()).split() if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
  if not a or not b:
    return 0
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(target: str, prediction: str) -> float:
  """ROUGE-L F-measure (`rouge_score.rouge_scorer` `rougeL`): P = LCS/|prediction|, R = LCS/|target|,
  F = 2PR/(P+R); 0 when either text has no token."""
  t, p = rouge_tokens(target), rouge_tokens(prediction)
  lcs = lcs_length(t, p)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(p), lcs / len(t)
  return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------ Self-Instruct

def self_instruct_problem(question: str, answer: str) -> str | None:
  """Why one sample fails Self-Instruct's per-sample filters (None = it passes)."""
  q, a = question.strip(), answer.strip()
  n = len(q.split())
  if n <= 3 or n > 150:
    return f"question has {n} words (Self-Instruct keeps 4-150)"
  if q[0] in string.punctuation:
    return "question starts with punctuation"
  if not q[0].isascii():
    return "question starts with a non-ASCII character"
  if q.startswith("Write a program"):
    return "question starts with 'Write a program'"
  if not a:
    return "empty answer"
  if q == a:
    return "answer equals the question"
  if q.endswith(":") or a.endswith(":"):
    return "question or answer ends with ':' (incomplete)"
  return None


def self_instruct_filter(rows: Sequence[dict], threshold: float = ROUGE_THRESHOLD) -> list[str]:
  """Per row, why Self-Instruct's filtering drops it ("" = kept); duplicates are looked for per image."""
  reasons = [self_instruct_problem(str(r.get("question", "")), str(r.get("answer", ""))) or ""
             for r in rows]
  by_image: dict[str, list[int]] = {}
  for i, r in enumerate(rows):
    by_image.setdefault(r["image"], []).append(i)
  for members in by_image.values():
    answers: dict[str, set[str]] = {}
    for i in members:
      answers.setdefault(rows[i]["question"].strip(), set()).add(rows[i]["answer"].strip())
    kept: list[int] = []
    seen: set[tuple[str, str]] = set()
    for i in members:
      if reasons[i]:
        continue
      q, a = rows[i]["question"].strip(), rows[i]["answer"].strip()
      if len(answers[q]) > 1:
        reasons[i] = "the same question has different answers"
        continue
      if (q, a) in seen:
        reasons[i] = "duplicate"
        continue
      best = max((rouge_l(rows[k]["question"], q) for k in kept), default=0.0)
      if best > threshold:
        reasons[i] = f"near duplicate question (ROUGE-L {best:.2f} > {threshold})"
        continue
      seen.add((q, a))
      kept.append(i)
  return reasons


def _budget(n: int, fraction: float) -> int:
  return max(1, math.ceil(fraction * n)) if n else 0


def _rng(config: Any, method: str) -> np.random.Generator:
  return np.random.default_rng([int(config.seed), SALT, sum(map(ord, method))])


def _groups(rows: Sequence[dict]) -> dict[str, list[int]]:
  out: dict[str, list[int]] = {}
  for i, r in enumerate(rows):
    out.setdefault(r["image"], []).append(i)
  return out


def _with_roles(rows: Sequence[dict], role: list[str], top: set[int], **extra: list) -> list[dict]:
  return [{**r, "role": role[i], "top_fraction": i in top, **{k: v[i] for k, v in extra.items()}}
          for i, r in enumerate(rows)]


def annotate_self_instruct(rows: Sequence[dict], config: Any) -> list[dict]:
  """Self-Instruct filtering: survivors are positives (first per image), the filtered negatives."""
  reasons = self_instruct_filter(rows)
  role = ["unused"] * len(rows)
  for members in _groups(rows).values():
    kept = [i for i in members if not reasons[i]]
    dropped = [i for i in members if reasons[i]][:config.train.max_negatives]
    if kept and dropped:
      role[kept[0]] = "positive"
      for i in dropped:
        role[i] = "negative"
  survivors = [i for i in range(len(rows)) if not reasons[i]]
  order = _rng(config, "self_instruct").permutation(len(survivors))
  top = {survivors[k] for k in order[:_budget(len(rows), config.select.top_fraction)]}
  return _with_roles(rows, role, top, select_reason=reasons)


def annotate_random(rows: Sequence[dict], config: Any) -> list[dict]:
  """A random positive and random negatives per image (>= 2 samples), a random top fraction."""
  rng = _rng(config, "random")
  role = ["unused"] * len(rows)
  for members in _groups(rows).values():
    if len(members) < 2:
      continue
    order = [members[k] for k in rng.permutation(len(members))]
    role[order[0]] = "positive"
    for i in order[1:1 + config.train.max_negatives]:
      role[i] = "negative"
  top = {int(k) for k in rng.permutation(len(rows))[:_budget(len(rows), config.select.top_fraction)]}
  return _with_roles(rows, role, top)


# --------------------------------------------------------------------------------------------- VIGC

_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def first_sentence(text: str) -> str:
  """The first sentence of `text` (up to and including the first . ! ? followed by a space or the end);
  the whole (stripped) text when it has no sentence end."""
  text = " ".join(text.split())
  m = _SENTENCE_END.search(text)
  return text[:m.end()] if m else text


def iterative_answers(inf: Any, jobs: Sequence[tuple[str, Any]], max_rounds: int = VIGC_MAX_ROUNDS,
                      seed: int = 0) -> list[str]:
  """VIGC-style iterative generation for `(question, image)` jobs: per round, every unfinished job is
  prompted with its question and the answer so far (as the start of the assistant's turn) and keeps the
  first sentence of the continuation; a job finishes when a round adds nothing."""
  from c3l_jax.pipeline import common

  builder = inf.builder
  encoded = [builder.encode_prompt(q, image) for q, image in jobs]
  answers = [""] * len(jobs)
  active = list(range(len(jobs)))
  max_new = inf.config.generation.max_new_tokens
  for round_ in range(max_rounds):
    if not active:
      break
    prompts, keep = [], []
    for j in active:
      ids = list(encoded[j][0]) + (builder.encode_answer(answers[j]) if answers[j] else [])
      if len(ids) + max_new <= inf.max_len:
        prompts.append(ids)
        keep.append(j)
    if not prompts:
      break
    keys = common.row_keys(seed, "select", round_, keep)
    texts, _ = inf.generate(prompts, [encoded[j][1] for j in keep], keys, max_new)
    active = []
    for j, text in zip(keep, texts):
      sentence = first_sentence(text)
      if sentence:
        answers[j] = f"{answers[j]} {sentence}".strip()
        active.append(j)
  return answers


def annotate_vigc(rows: Sequence[dict], config: Any) -> list[dict]:
  """VIGC: iterative answers (new rows) are the positives, each image's direct samples its negatives."""
  import dataclasses

  from c3l_jax import scoring
  from c3l_jax.data.images import ImageError
  from c3l_jax.pipeline import common

  inf = common.Inference(config)
  base = inf.sampling_config
  inf.sampling_config = lambda n: dataclasses.replace(base(n), temperature=0.0, top_k=0, top_p=1.0)
  groups = _groups(rows)
  jobs, firsts, images = [], [], {}
  for image, members in groups.items():
    try:
      images[image] = inf.source.load(image)
    except ImageError:
      continue  # the score stage already quarantined such images; nothing to regenerate
    firsts.append(members[0])
    jobs.append((rows[members[0]]["question"], images[image]))
  answers = iterative_answers(inf, jobs, seed=config.seed)
  new_rows, inputs, pixels = [], [], {}
  for first, answer in zip(firsts, answers):
    if not answer:
      continue
    src = rows[first]
    enc = inf.builder.encode_qa(src["question"], answer, images[src["image"]])
    pixels[src["image"]] = enc.pixel_values
    inputs.append(scoring.ScoreInput(src["image"], enc.prompt_image, enc.prompt_text, enc.answer))
    new_rows.append({**{k: v for k, v in src.items() if k not in ("i2c", "logp_image", "logp_text",
                                                                  "n_tokens", "output")},
                     "id": f"{src['id']}_vigc", "answer": answer, "generator": "vigc_iterative",
                     "output": answer})
  if inputs:
    scorer = scoring.Scorer(inf.model, inf.mesh, scoring.ScoringConfig(
        mode=config.scoring.mode, length_norm=config.scoring.length_norm,
        batch_rows=config.scoring.batch_size), inf.model.cfg.image_token_id, inf.builder.pad_id)
    for row, score in zip(new_rows, scorer.score(inputs, pixels)):
      row.update(score)
  out_rows = list(rows) + new_rows
  role = ["unused"] * len(out_rows)
  iterative = {r["image"]: len(rows) + k for k, r in enumerate(new_rows)}
  for image, members in groups.items():
    if image in iterative:
      role[iterative[image]] = "positive"
      for i in members[:config.train.max_negatives]:
        role[i] = "negative"
  positives = sorted(iterative.values())
  order = _rng(config, "vigc").permutation(len(positives))
  top = {positives[k] for k in order[:_budget(len(rows), config.select.top_fraction)]}
  return _with_roles(out_rows, role, top)


__all__ = ["ROUGE_THRESHOLD", "VIGC_MAX_ROUNDS", "annotate_random", "annotate_self_instruct",
           "annotate_vigc", "first_sentence", "iterative_answers", "lcs_length", "rouge_l",
           "rouge_tokens", "self_instruct_filter", "self_instruct_problem"]
