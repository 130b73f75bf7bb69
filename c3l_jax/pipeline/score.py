"""The `score` stage: S(I2C) (eq. 1, `c3l_jax.scoring`) for every record of WORKDIR/filter (else of
`config.data.records`).

Writes `WORKDIR/score/part-*.jsonl` (the input records plus `i2c`, `logp_image`, `logp_text`,
`n_tokens`) in shards of `config.scoring.shard_size` records; bad inputs (bad JSON lines, missing or
empty fields, duplicate ids, missing / corrupt / oversized images, sequences longer than the model's
context) go to `WORKDIR/score/rejected.jsonl` with a reason, or stop the run under `config.strict`.
Counts (metrics.json): `read` input records (lines) = `written` (scored) + `rejected` (the rows of
rejected.jsonl).
"""

from __future__ import annotations

import os
from typing import Any

import jax
from absl import logging

from c3l_jax import runtime, scoring, sharding
from c3l_jax.data.images import ImageError
from c3l_jax.data.records import BadInput, reject
from c3l_jax.pipeline import common, shards


def load_model_from_config(config: Any, mesh: jax.sharding.Mesh):
  return sharding.load_model(config.model.checkpoint, mesh, **common.model_runtime(config))


def run(config: Any, workdir: str) -> dict:
  stage_dir = os.path.join(workdir, "score")
  records, upfront, where = common.stage_input(config, workdir, ("filter",))
  logging.info("score: %d records from %s", len(records), where)
  size = config.scoring.shard_size
  chunks = [records[i:i + size] for i in range(0, len(records), size)]
  rt = runtime.get()
  todo = [i for i in rt.my_shards(range(len(chunks))) if not shards.is_done(stage_dir, i)]

  if todo:
    inf, scorer = make_scorer(config)
    with common.Progress("score", sum(len(chunks[i]) for i in todo), "rec") as progress:
      for index in todo:
        rows, rejected = score_chunk(config, chunks[index], inf, scorer)
        shards.write_shard(stage_dir, index, rows, rejected)
        progress.shard_done(index, len(chunks[index]), tokens=sum(r["n_tokens"] for r in rows),
                            scored=len(rows), rejected=len(rejected))
  rt.barrier("score:shards")
  counts = shards.sum_counts(stage_dir, range(len(chunks)), ("written", "rejected"))
  if rt.is_lead:
    shards.gather_rejected(stage_dir, upfront)
  return {"read": len(records) + len(upfront), "written": counts["written"],
          "rejected": len(upfront) + counts["rejected"]}


def make_scorer(config: Any) -> tuple[common.Inference, scoring.Scorer]:
  """The base model (`config.model.checkpoint`) on this process's devices, and its scorer."""
  inf = common.Inference(config)
  return inf, scoring.Scorer(
      inf.model, inf.mesh,
      scoring.ScoringConfig(mode=config.scoring.mode, length_norm=config.scoring.length_norm,
                            prefix_sharing=config.scoring.prefix_sharing,
                            batch_rows=config.scoring.batch_size),
      inf.model.cfg.image_token_id, inf.builder.pad_id)


def score_chunk(config: Any, chunk: list[dict], inf: common.Inference, scorer: scoring.Scorer
                ) -> tuple[list[dict], list[dict]]:
  """Encode (quarantining bad images / over-long sequences) and score one shard's records."""
  rejected, keep, items, pixels = [], [], [], {}
  builder, max_len = inf.builder, inf.max_len
  for rec in chunk:
    try:
      image = inf.source.load(rec["image"])
      enc = builder.encode_qa(rec["question"], rec["answer"], image)
      if not enc.answer:
        raise ImageError("answer tokenizes to nothing")
      if len(enc.prompt_image) + len(enc.answer) > max_len:
        raise ImageError(f"sequence of {len(enc.prompt_image) + len(enc.answer)} tokens is over the "
                         f"model's context of {max_len}")
    except ImageError as e:
      if config.strict:
        raise BadInput(f"record {rec['id']!r}: {e}") from None
      rejected.append(reject(rec, str(e), id=rec["id"]))
      continue
    pixels[rec["image"]] = enc.pixel_values
    keep.append(rec)
    items.append(scoring.ScoreInput(rec["image"], enc.prompt_image, enc.prompt_text, enc.answer))
  rows = []
  if items:
    for rec, result in zip(keep, scorer.score(items, pixels)):
      rows.append({**rec, **result})
  return rows, rejected


__all__ = ["make_scorer", "run", "score_chunk"]
