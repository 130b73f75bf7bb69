"""The `initial` stage: the VLM generates the initial question-answer pairs (C3L Sec. 3.1).

`generation.mode`:
  two_step  step 1: the VLM captions the image (one of `CAPTION_INSTRUCTIONS`); step 2: the language
            model alone, given only the caption, writes "Question: ... Answer: ..." for an instruction
            of the sample's type (`QA_FROM_CAPTION`, several paraphrases per type).
  direct    the VLM answers the VIGC instruction of the sample's type with the image.

`generation.per_image` samples per image, types drawn with the proportions of
`generation.instruction_mix`. Images are processed in shards of `generation.shard_size`; each shard's
random choices and sampling keys depend only on (seed, shard, row), so a resumed run writes the same
bytes. Output records: `id`, `image`, `image_id`, `instruction_type`, `instruction`, `mode`, `caption`
(two_step), `output` (the raw generated text) and the parsed `question` / `answer` ("" when the output
does not parse: the `filter` stage quarantines those). Images that cannot be loaded and prompts over
the model's context go to `WORKDIR/initial/rejected.jsonl`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import numpy as np
import tqdm
from absl import logging

from c3l_jax.data import instructions as ins
from c3l_jax.data.images import ImageError
from c3l_jax.data.prompts import VIGC_INSTRUCTIONS
from c3l_jax.data.records import BadInput, reject
from c3l_jax.data.sources import ImageItem, open_source
from c3l_jax.pipeline import common, shards


@dataclasses.dataclass(frozen=True)
class Job:
  """One sample to generate: an image, an instruction type and the paraphrases drawn for it."""

  id: str
  item: ImageItem
  instruction_type: str
  qa_choice: int  # index into QA_FROM_CAPTION[type] (two_step)
  caption_choice: int  # index into CAPTION_INSTRUCTIONS (two_step)


def draw_jobs(items: Sequence[ImageItem], per_item: int, mix: dict[str, float], rng: np.random.Generator,
              id_of=lambda item, k: f"{item.image_id}_{k}") -> list[Job]:
  """`per_item` jobs per image; all random draws happen here, before any image is loaded."""
  jobs = []
  for item in items:
    caption_choice = int(rng.integers(len(ins.CAPTION_INSTRUCTIONS)))
    for k, kind in enumerate(ins.draw_types(mix, per_item, rng)):
      jobs.append(Job(id_of(item, k), item, kind, int(rng.integers(len(ins.QA_FROM_CAPTION[kind]))),
                      caption_choice))
  return jobs


def _fail(config: Any, what: str, reason: str) -> None:
  if config.strict:
    raise BadInput(f"{what}: {reason}")


def generate_jobs(inf: common.Inference, jobs: Sequence[Job], mode: str, stage: str, shard: int
                  ) -> tuple[list[dict], list[dict], int]:
  """Run `jobs` (one shard): `(records, rejected inputs, generated tokens)`."""
  config, builder = inf.config, inf.builder
  max_new = config.generation.max_new_tokens
  rejected: list[dict] = []
  bad_images: set[str] = set()
  pixels: dict[str, np.ndarray] = {}

  def image_prompt(job: Job, text: str) -> list[int] | None:
    try:
      image = inf.source.load(job.item.image)
    except ImageError as e:
      if job.item.image not in bad_images:
        bad_images.add(job.item.image)
        _fail(config, f"image {job.item.image!r}", str(e))
        rejected.append(reject(dataclasses.asdict(job.item), str(e), image=job.item.image))
      return None
    ids, px = builder.encode_prompt(text, image)
    pixels[job.item.image] = px
    return ids

  def fits(job: Job, ids: list[int], new_tokens: int) -> bool:
    if len(ids) + new_tokens <= inf.max_len:
      return True
    reason = (f"sequence of {len(ids)} prompt + {new_tokens} new tokens is over the model's context "
              f"of {inf.max_len}")
    _fail(config, f"sample {job.id!r}", reason)
    rejected.append(reject({"id": job.id, "image": job.item.image}, reason, id=job.id))
    return False

  n_tokens = 0
  captions: dict[str, str] = {}
  if mode == "two_step":  # step 1: one caption per image, keyed by the image's first job
    first = {}
    for job in jobs:
      first.setdefault(job.item.image, job)
    todo, prompts = [], []
    for i, job in enumerate(jobs):
      if first[job.item.image] is not job:
        continue
      ids = image_prompt(job, ins.CAPTION_INSTRUCTIONS[job.caption_choice])
      if ids is not None and fits(job, ids, config.generation.caption_max_new_tokens):
        todo.append(i)
        prompts.append(ids)
    if prompts:
      texts, n = inf.generate(prompts, [pixels[jobs[i].item.image] for i in todo],
                              common.row_keys(config.seed, stage, shard, [2 * i for i in todo]),
                              config.generation.caption_max_new_tokens)
      n_tokens += n
      captions = {jobs[i].item.image: text for i, text in zip(todo, texts)}
    todo, prompts, use_pixels = [], [], None
    for i, job in enumerate(jobs):
      if job.item.image not in captions:
        continue
      instruction = ins.QA_FROM_CAPTION[job.instruction_type][job.qa_choice]
      ids, _ = builder.encode_prompt(ins.qa_from_caption_prompt(captions[job.item.image], instruction),
                                     None)
      if fits(job, ids, max_new):
        todo.append(i)
        prompts.append(ids)
  else:
    todo, prompts = [], []
    for i, job in enumerate(jobs):
      ids = image_prompt(job, VIGC_INSTRUCTIONS[job.instruction_type])
      if ids is not None and fits(job, ids, max_new):
        todo.append(i)
        prompts.append(ids)
    use_pixels = [pixels[jobs[i].item.image] for i in todo]

  rows = []
  if prompts:
    texts, n = inf.generate(prompts, use_pixels,
                            common.row_keys(config.seed, stage, shard, [2 * i + 1 for i in todo]),
                            max_new)
    n_tokens += n
    for i, text in zip(todo, texts):
      job = jobs[i]
      parsed = ins.parse_qa(text) or ("", "")
      instruction = (ins.QA_FROM_CAPTION[job.instruction_type][job.qa_choice] if mode == "two_step"
                     else VIGC_INSTRUCTIONS[job.instruction_type])
      row = {"id": job.id, "image": job.item.image, "image_id": job.item.image_id,
             "instruction_type": job.instruction_type, "instruction": instruction, "mode": mode,
             "generator": stage}
      if mode == "two_step":
        row["caption"] = captions[job.item.image]
      row.update(output=text, question=parsed[0], answer=parsed[1])
      rows.append(row)
  return rows, rejected, n_tokens


def run_generation(config: Any, workdir: str, stage: str, chunks: list[list[Job]], mode: str,
                   checkpoint: str | None, upfront: Sequence[dict], read: int) -> dict:
  """Generate every unfinished shard of `chunks` (this process's share) and count the stage."""
  stage_dir = os.path.join(workdir, stage)
  todo = [i for i in common.my_shards(range(len(chunks))) if not shards.is_done(stage_dir, i)]
  if todo:
    inf = common.Inference(config, checkpoint)
    bar = tqdm.tqdm(total=sum(len(chunks[i]) for i in todo), desc=stage, unit="sample")
    tokens, start = 0, time.perf_counter()
    for index in todo:
      rows, rejected, n = generate_jobs(inf, chunks[index], mode, stage, index)
      shards.write_shard(stage_dir, index, rows, rejected)
      tokens += n
      bar.update(len(chunks[index]))
      bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
      logging.info("%s: shard %d done (%d samples, %d rejected, %d tokens)", stage, index, len(rows),
                   len(rejected), n)
    bar.close()
  common.sync(f"{stage}:shards")
  written = sum(shards.read_shard_counts(stage_dir, i)[0] for i in range(len(chunks)))
  os.makedirs(stage_dir, exist_ok=True)
  n_rejected = shards.gather_rejected(stage_dir, upfront) if common.is_lead() else 0
  rows = shards.read_parts(stage_dir)
  return {"read": read, "rejected": n_rejected, "written": written,
          "unparsable": sum(1 for r in rows if not r["question"])}


def run(config: Any, workdir: str) -> dict:
  source = open_source(config)
  items, upfront = source.items(config.data.max_images)
  if not items:
    raise BadInput("the initial stage found no images (check config.data.*)")
  size = config.generation.shard_size
  mix = ins.parse_mix(config.generation.instruction_mix)
  chunks = []
  for index, start in enumerate(range(0, len(items), size)):
    rng = np.random.default_rng([config.seed, common.SALTS["initial"], index])
    chunks.append(draw_jobs(items[start:start + size], config.generation.per_image, mix, rng))
  metrics = run_generation(config, workdir, "initial", chunks, config.generation.mode, None, upfront,
                           read=len(items) + len(upfront))
  metrics["images"] = len(items)
  return metrics


__all__ = ["Job", "draw_jobs", "generate_jobs", "run", "run_generation"]
