"""The `export` stage: the generated dataset in LLaVA's instruction-tuning format, and its statistics.

Reads the final data (`WORKDIR/final/filtered`; the filtered initial data `WORKDIR/filter` when the final
stage has not run) and writes
  WORKDIR/export/c3l_vlit.json  [{"id", "image", "conversations": [{"from": "human", "value":
                                "<image>\\n{question}"}, {"from": "gpt", "value": "{answer}"}]}, ...]
  WORKDIR/export/stats.json     Table-2 statistics: instances, images, average question / answer length
                                in words (whitespace-separated, as the paper counts), per-type counts.
Both are deterministic functions of the input records (no timestamps), so an interrupted and resumed
run exports the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Sequence

from c3l_jax.data.records import BadInput
from c3l_jax.pipeline import common, shards

IMAGE_PLACEHOLDER = "<image>"


def to_llava(rows: Sequence[dict]) -> list[dict]:
  return [{"id": r["id"], "image": r["image"],
           "conversations": [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{r['question']}"},
                             {"from": "gpt", "value": r["answer"]}]} for r in rows]


def statistics(llava: Sequence[dict]) -> dict:
  """Table-2 statistics of a LLaVA-format dataset (recomputable from the JSON file alone)."""
  questions = [c["value"].replace(IMAGE_PLACEHOLDER, "").strip()
               for d in llava for c in d["conversations"] if c["from"] == "human"]
  answers = [c["value"] for d in llava for c in d["conversations"] if c["from"] == "gpt"]
  mean = lambda xs: round(sum(len(x.split()) for x in xs) / len(xs), 4) if xs else 0.0  # noqa: E731
  return {"instances": len(llava), "images": len({d["image"] for d in llava}),
          "avg_question_words": mean(questions), "avg_answer_words": mean(answers)}


def _dump(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def run(config: Any, workdir: str) -> dict:
  if common.stage_done(workdir, "final"):
    rows, where = shards.read_parts(os.path.join(workdir, "final", "filtered")), "final"
  elif common.stage_done(workdir, "filter"):
    rows, where = shards.read_parts(os.path.join(workdir, "filter")), "filter"
  else:
    raise BadInput("the export stage needs the final (or filter) stage's output in this workdir")
  out_dir = os.path.join(workdir, "export")
  os.makedirs(out_dir, exist_ok=True)
  llava = to_llava(rows)
  stats = statistics(llava)
  stats["instruction_types"] = dict(sorted(collections.Counter(
      r.get("instruction_type", "unknown") for r in rows).items()))
  stats["source"] = where
  if common.is_lead():
    _dump(os.path.join(out_dir, "c3l_vlit.json"), llava)
    _dump(os.path.join(out_dir, "stats.json"), stats)
  common.sync("export:done")
  return {"read": len(rows), "written": len(llava), "rejected": 0, **stats}


__all__ = ["run", "statistics", "to_llava"]
