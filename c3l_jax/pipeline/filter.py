"""The `filter` stage: basic filtering of generated QA (C3L Sec. 3.1, "basic filtering").

Rejects, with the reason, in this order: unparsable output (no "Question: ... Answer: ..."), questions or
answers outside the word-length bounds (`filter.*_words`), a question equal to its answer, an answer
that only repeats the caption (`difflib` similarity of the normalised texts >= `filter.caption_overlap`),
exact duplicates and near duplicates within one image (same normalised question and answer; or
question word-set Jaccard >= `filter.near_duplicate`), the first occurrence being kept. Model-free and
deterministic: reads `WORKDIR/initial` (else `data.records`), writes one output shard per input shard.
Counts (metrics.json): `read` input records (lines) = `written` (kept) + `rejected` (the rows of
rejected.jsonl: bad input lines and everything the filter removes).
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Sequence

from c3l_jax import runtime
from c3l_jax.data import instructions as ins
from c3l_jax.data.records import BadInput, reject
from c3l_jax.pipeline import common, shards


def _jaccard(a: set, b: set) -> float:
  return len(a & b) / len(a | b) if a | b else 1.0


def problem(rec: dict, cfg: Any) -> str | None:
  """Why `rec` fails the per-record checks (None if it passes)."""
  question, answer = str(rec.get("question", "")), str(rec.get("answer", ""))
  if not question.strip() or not answer.strip():
    output = " ".join(str(rec.get("output", "")).split())[:80]
    return f"unparsable output (no 'Question: ... Answer: ...'): {output!r}"
  nq, na = len(ins.words(question)), len(ins.words(answer))
  if not cfg.min_question_words <= nq <= cfg.max_question_words:
    return (f"question has {nq} words (bounds [{cfg.min_question_words}, "
            f"{cfg.max_question_words}])")
  if not cfg.min_answer_words <= na <= cfg.max_answer_words:
    return f"answer has {na} words (bounds [{cfg.min_answer_words}, {cfg.max_answer_words}])"
  if ins.normalise(question) == ins.normalise(answer):
    return "question equals answer"
  caption = ins.normalise(str(rec.get("caption", "")))
  if caption:
    similarity = difflib.SequenceMatcher(None, ins.normalise(answer), caption).ratio()
    if similarity >= cfg.caption_overlap:
      return f"answer only repeats the caption (similarity {similarity:.2f})"
  return None


def filter_rows(rows: Sequence[dict], cfg: Any, strict: bool = False) -> tuple[list[dict], list[dict]]:
  """`(kept, rejected)`: per-record checks, then duplicates / near duplicates within each image."""
  kept, rejected = [], []
  seen: dict[str, list[tuple[str, str, set]]] = {}  # image -> (id, normalised qa, question words)
  for rec in rows:
    reason = problem(rec, cfg)
    if reason is None:
      qa = ins.normalise(rec["question"]) + " || " + ins.normalise(rec["answer"])
      qwords = set(ins.words(rec["question"]))
      for other_id, other_qa, other_words in seen.get(rec["image"], []):
        if qa == other_qa:
          reason = f"duplicate of {other_id!r}"
          break
        similarity = _jaccard(qwords, other_words)
        if similarity >= cfg.near_duplicate:
          reason = f"near duplicate of {other_id!r} (question word overlap {similarity:.2f})"
          break
    if reason is not None:
      if strict:
        raise BadInput(f"record {rec.get('id')!r}: {reason}")
      rejected.append(reject(rec, reason, id=rec.get("id")))
      continue
    seen.setdefault(rec["image"], []).append((rec["id"], qa, qwords))
    kept.append(rec)
  return kept, rejected


def run(config: Any, workdir: str) -> dict:
  stage_dir = os.path.join(workdir, "filter")
  rt = runtime.get()
  if common.input_stage(config, workdir, ("initial",)) == "initial":
    inputs = [shards.read_part(p) for p in shards.part_files(os.path.join(workdir, "initial"))]
    upfront: list[dict] = []
  else:
    records, upfront, _ = common.stage_input(config, workdir, ())
    inputs = [records]
  # Duplicates are looked for within an image; initial shards never split an image, data.records
  # is one shard.
  todo = [i for i in range(len(inputs)) if not shards.is_done(stage_dir, i)]
  if rt.is_lead and todo:
    with common.Progress("filter", sum(len(inputs[i]) for i in todo), "rec") as progress:
      for index in todo:
        kept, rejected = filter_rows(inputs[index], config.filter, config.strict)
        shards.write_shard(stage_dir, index, kept, rejected)
        progress.shard_done(index, len(inputs[index]), kept=len(kept), rejected=len(rejected))
  rt.barrier("filter:shards")
  counts = shards.sum_counts(stage_dir, range(len(inputs)), ("written", "rejected"))
  if rt.is_lead:
    shards.gather_rejected(stage_dir, upfront)
  return {"read": sum(len(r) for r in inputs) + len(upfront), "written": counts["written"],
          "rejected": len(upfront) + counts["rejected"]}


__all__ = ["filter_rows", "problem", "run"]
