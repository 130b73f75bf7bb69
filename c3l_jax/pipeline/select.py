"""The `select` stage: which scored samples train the generator (C3L Sec. 3.2-3.3).

`select.method = i2c` (the paper's CRM selection): the top `select.top_fraction` of all samples by
S(I2C) get `top_fraction = true` (they train L_r); per image, the highest-S(I2C) sample is the
`positive` and the next `train.max_negatives` are `negative`s (they train L_c, eq. 3); every other
sample is `unused` (also images with a single sample: no negative to contrast with). Ties go to the
earlier record. Reads `WORKDIR/score` (else `data.records` with an `i2c` field); writes every record
with `role` and `top_fraction` added to `WORKDIR/select/part-00000.jsonl`. The paper's Table-5
alternatives, `select.method = self_instruct | vigc | random`, live in `c3l_jax.pipeline.baselines`.
Counts (metrics.json): `read` input records (lines) + `generated` = `written` + `rejected`, with
`rejected` the rows of rejected.jsonl (bad input lines, records without a finite `i2c`), `generated` the
rows the method adds (vigc's iterative answers; 0 for the others) and `written` the annotated rows
(= `positive` + `negative` + `unused`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import numpy as np

from c3l_jax import runtime
from c3l_jax.data.records import BadInput, reject
from c3l_jax.losses import select_groups
from c3l_jax.pipeline import baselines, common, shards


def select_top(rows: Sequence[dict], fraction: float) -> list[int]:
  """Indices of the top `fraction` of rows by S(I2C), best first (ties: input order)."""
  ranked = sorted(range(len(rows)), key=lambda i: (-rows[i]["i2c"], i))
  return ranked[:max(1, math.ceil(fraction * len(rows)))] if rows else []


def annotate_i2c(rows: Sequence[dict], top_fraction: float, max_negatives: int) -> list[dict]:
  """Rows with `role` and `top_fraction` from S(I2C) (the paper's selection)."""
  top = set(select_top(rows, top_fraction))
  role = ["unused"] * len(rows)
  for positive, members in select_groups([r["i2c"] for r in rows], [r["image"] for r in rows],
                                         max_negatives):
    for m in members:
      role[m] = "positive" if m == positive else "negative"
  return [{**r, "role": role[i], "top_fraction": i in top} for i, r in enumerate(rows)]


# select.method -> annotate(rows, config) -> rows with `role` and `top_fraction`.
METHODS: dict[str, Callable[[Sequence[dict], Any], list[dict]]] = {
    "i2c": lambda rows, config: annotate_i2c(rows, config.select.top_fraction,
                                             config.train.max_negatives),
    # Table 5's alternatives (c3l_jax/pipeline/baselines.py); vigc loads the model and generates.
    "self_instruct": baselines.annotate_self_instruct,
    "vigc": baselines.annotate_vigc,
    "random": baselines.annotate_random,
}


def _check_scores(rows: list[dict], strict: bool) -> tuple[list[dict], list[dict]]:
  good, rejected = [], []
  for r in rows:
    value = r.get("i2c")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
      good.append(r)
      continue
    reason = f"no finite 'i2c' score (got {value!r}): run the score stage on these records"
    if strict:
      raise BadInput(f"record {r.get('id')!r}: {reason}")
    rejected.append(reject(r, reason, id=r.get("id")))
  return good, rejected


def run(config: Any, workdir: str) -> dict:
  stage_dir = os.path.join(workdir, "select")
  records, upfront, _ = common.stage_input(config, workdir, ("score",))
  records, bad = _check_scores(records, config.strict)
  rt = runtime.get()
  if rt.is_lead and not shards.is_done(stage_dir, 0):
    with common.Progress("select", len(records) + len(bad), "rec") as progress:
      rows = METHODS[config.select.method](records, config)
      shards.write_shard(stage_dir, 0, rows, bad)
      progress.shard_done(0, len(records) + len(bad), selected=len(rows), rejected=len(bad))
  rt.barrier("select:shards")
  rows = shards.read_part(shards.part_path(stage_dir, 0))
  n_rejected = len(upfront) + shards.read_shard_counts(stage_dir, 0)[1]
  if rt.is_lead:
    shards.gather_rejected(stage_dir, upfront)
  roles = [r["role"] for r in rows]
  top = [r for r in rows if r["top_fraction"]]
  scores = [r["i2c"] for r in rows if "i2c" in r]
  return {"read": len(records) + len(bad) + len(upfront), "generated": len(rows) - len(records),
          "written": len(rows), "rejected": n_rejected, "top_fraction": len(top),
          "positive": roles.count("positive"), "negative": roles.count("negative"),
          "unused": roles.count("unused"),
          "mean_i2c": float(np.mean(scores)) if scores else None,
          "mean_i2c_top": float(np.mean([r["i2c"] for r in top if "i2c" in r])) if top else None}


__all__ = ["METHODS", "annotate_i2c", "run", "select_top"]
