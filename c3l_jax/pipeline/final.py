"""The `final` stage: the enhanced generator writes the final dataset (C3L Sec. 3.4).

Loads `WORKDIR/train/generator` (the C3L-trained model; `config.model.checkpoint` when the train stage
has not run) and generates `generation.num_final` samples in `generation.final_mode` (default
`two_step`, the paper's final generation (Sec. 4): a caption with the image, then QA from the caption;
`direct`: image + VIGC instruction -> "Question: ... Answer: ..."), cycling over the source's images (at most
`data.max_images`) with instruction types drawn from `generation.instruction_mix`. The outputs go
through the same basic filter as the initial data (`c3l_jax.pipeline.filter`); what it rejects, and
images that cannot be loaded, are in `WORKDIR/final/rejected.jsonl`. Shards of
`generation.shard_size` samples; per-shard seeds make a resumed run write the same bytes. With
`generation.score_final` (default) the kept samples get S(I2C) under the base model
(`config.model.checkpoint`), comparable with the initial data's.

Counts (metrics.json) as `initial`'s (`c3l_jax.pipeline.initial`): read = images + rejected, where
`read` counts the images the `num_final` samples cycle over (min(num_final, images of the source)) plus
the lines rejected on reading, each image once however often it is used; samples = written +
samples_rejected, where `samples` are those of the `num_final` whose image loaded. Then written = `kept`
(`WORKDIR/final/filtered`) + `filtered_out` (what the filter removes and what cannot be scored,
`WORKDIR/final/filtered/rejected.jsonl`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from etils import epath

from c3l_jax import runtime
from c3l_jax.data import instructions as ins
from c3l_jax.data.records import BadInput
from c3l_jax.data.sources import open_source
from c3l_jax.pipeline import common, initial, shards
from c3l_jax.pipeline import score as score_stage
from c3l_jax.pipeline.filter import filter_rows


def generator_checkpoint(config: Any, workdir: str) -> str:
  """WORKDIR/train/generator when the train stage runs in this job or ran in this workdir (then it must
  have finished, `common.input_stage`), else `config.model.checkpoint`."""
  trained = os.path.join(workdir, "train", "generator")
  from c3l_jax.pipeline import parse_stages
  if "train" in parse_stages(config.stages) or epath.Path(workdir, "train").exists():
    if common.input_stage(config, workdir, ("train",)) == "train" and epath.Path(trained).exists():
      return trained
  return config.model.checkpoint


def run(config: Any, workdir: str) -> dict:
  """Shard `s` is samples `s * shard_size ...`; sample k uses the image at position `k % images` of
  the source's listing. This process lists (reading no image) the images of its own shards only."""
  source = open_source(config)
  n = source.count(config.data.max_images)
  if not n:
    raise BadInput("the final stage found no images (check config.data.*)")
  mix = ins.parse_mix(config.generation.instruction_mix)
  size = config.generation.shard_size
  total = config.generation.num_final
  num_shards = -(-total // size)
  rt = runtime.get()
  mine = rt.my_shards(range(num_shards))
  positions = sorted({k % n for index in mine
                      for k in range(index * size, min((index + 1) * size, total))})
  listed, upfront = source.items(config.data.max_images, positions, ground_truth=False)
  item_at = dict(zip(positions, listed))
  chunks = {}
  for index in mine:
    rng = np.random.default_rng([config.seed, common.SALTS["final"], index])
    jobs = []
    for k in range(index * size, min((index + 1) * size, total)):
      # Sample k < n is its image's first: its shard counts the image.
      jobs += [dataclasses.replace(job, counts_image=k < n) for job in initial.draw_jobs(
          [item_at[k % n]], 1, mix, rng, id_of=lambda item, _, k=k: f"final_{k:07d}")]
    chunks[index] = jobs
  checkpoint = generator_checkpoint(config, workdir)
  metrics = initial.run_generation(config, workdir, "final", chunks, config.generation.final_mode,
                                   checkpoint, upfront, records=min(total, n) + len(upfront),
                                   num_shards=num_shards)
  # The basic filter, then S(I2C) under the base model (comparable with the initial data's), per shard.
  stage_dir = os.path.join(workdir, "final")
  filtered_dir = os.path.join(stage_dir, "filtered")
  scorer = None
  todo = [i for i in rt.my_shards(range(num_shards)) if not shards.is_done(filtered_dir, i)]
  if todo:
    inputs = {i: shards.read_part(shards.part_path(stage_dir, i)) for i in todo}
    with common.Progress("final:filter", sum(map(len, inputs.values())), "sample") as progress:
      for index in todo:
        rows, rejected = filter_rows(inputs[index], config.filter, config.strict)
        if config.generation.score_final and rows:
          if scorer is None:
            scorer = score_stage.make_scorer(config)
          rows, unscorable = score_stage.score_chunk(config, rows, *scorer)
          rejected += unscorable
        shards.write_shard(filtered_dir, index, rows, rejected)
        progress.shard_done(index, len(inputs[index]), kept=len(rows), rejected=len(rejected))
  rt.barrier("final:filtered")
  counts = shards.sum_counts(filtered_dir, range(num_shards), ("written", "rejected"))
  if rt.is_lead:
    shards.gather_rejected(filtered_dir, ())
  metrics.update(generator=checkpoint, kept=counts["written"], filtered_out=counts["rejected"])
  return metrics


__all__ = ["generator_checkpoint", "run"]
