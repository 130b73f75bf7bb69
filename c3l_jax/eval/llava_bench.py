"""LLaVA-Bench (In-the-Wild) (Liu et al., "Visual Instruction Tuning", 2023): the answers file.

Input: the official folder (`liuhaotian/llava-bench-in-the-wild` on the HF hub) with `questions.jsonl`
(`question_id`, `image`, `text`, `category`), `images/`, `context.jsonl` and `answers_gpt4.jsonl`. Each
question is answered greedily with the image and the question as it is (LLaVA-1.5's `model_vqa.py`,
temperature 0), and written as LLaVA's answer file: one JSON object per line
`{"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}`. `answer_id` is a hash of the
rest (LLaVA draws a random shortuuid) so a rerun writes the same bytes.

The score needs the GPT-4 judge, which is not run here (see README, "Evaluation"): LLaVA's
`llava/eval/eval_gpt_review_bench.py` compares the file with `answers_gpt4.jsonl` and
`llava/eval/summarize_gpt_review.py` prints the relative score.
"""

from __future__ import annotations

import hashlib
import json
import os

from c3l_jax.data.records import BadInput, missing_field, read_jsonl


def _check_question(rec: dict) -> str | None:
  if "question_id" not in rec:
    return "missing field 'question_id'"
  return missing_field(rec, ("image", "text"), str)


def read_questions(bench_dir: str, strict: bool = False) -> tuple[list[dict], list[dict]]:
  """`questions.jsonl` of the LLaVA-Bench folder, in order, each with `image_path` added, and the
  rejected lines (malformed, no `question_id` / `image` / `text`; `strict` raises on the first)."""
  path = os.path.join(bench_dir, "questions.jsonl")
  if not os.path.exists(path):
    raise BadInput(f"{path!r} not found: eval.llava_bench_dir must be the llava-bench-in-the-wild "
                            "folder (questions.jsonl, images/)")
  rows, rejected = read_jsonl(path, _check_question, strict)
  return [{**r, "image_path": os.path.join(bench_dir, "images", r["image"])} for r in rows], rejected


def answer_record(question: dict, text: str, model_id: str) -> dict:
  """One line of LLaVA's answer file (`model_vqa.py`)."""
  digest = hashlib.sha256(json.dumps([model_id, question["question_id"], text]).encode()).hexdigest()
  return {"question_id": question["question_id"], "prompt": question["text"], "text": text,
          "answer_id": digest[:22], "model_id": model_id, "metadata": {}}


__all__ = ["answer_record", "read_questions"]
