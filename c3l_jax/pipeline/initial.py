"""The `initial` stage: the VLM generates the initial question-answer pairs (C3L Sec. 3.1).

`generation.mode`:
  two_step  step 1: the VLM captions the image (one of `CAPTION_INSTRUCTIONS`); step 2: the language
            model alone, given only the caption, writes "Question: ... Answer: ..." for an instruction
            of the sample's type (`QA_FROM_CAPTION`, several paraphrases per type).
  direct    the VLM answers the VIGC instruction of the sample's type with the image.

`generation.per_image` samples per image, types drawn with the proportions of
`generation.instruction_mix`; with `generation.qa_per_prompt` = N > 1 each sample's prompt asks for N
QA pairs and every pair parsed from its answer is a record (`{sample id}_{k}`). Images are processed in shards of `generation.shard_size`; each shard's
random choices and sampling keys depend only on (seed, shard, row), so a resumed run writes the same
bytes, sampled (`generation.initial_temperature` / `initial_top_p`) or greedy. Output records: `id`, `image`, `image_id`, `instruction_type`, `instruction`, `mode`, `caption`
and `caption_instruction` (two_step), `prompt` (the text of the prompt that wrote the QA: the
QA-from-caption prompt, text-only, in two_step; the VIGC instruction, with the image, in direct),
`output` (the raw generated text) and the parsed `question` / `answer` ("" when the output
does not parse: the `filter` stage quarantines those). Bad input lines, images that cannot be loaded
and samples whose sequence is over the model's context go to `WORKDIR/initial/rejected.jsonl`.

Counts (metrics.json; the same for `final`), at two levels that each add up:
  inputs   read = images + rejected: `read` input records (one per distinct image, at most
           `data.max_images`, plus the lines rejected on reading), `images` whose image loaded,
           `rejected` (bad lines and images that could not be loaded).
  samples  samples + extra_pairs = written + samples_rejected: `samples` to generate for the loaded
           images (here images x `generation.per_image`), `samples_rejected` (over the model's
           context), `written` (`unparsable` of them without a parsable "Question: ... Answer: ..."),
           `extra_pairs` (only with qa_per_prompt > 1) the records beyond one per sample.
rejected.jsonl holds rejected + samples_rejected rows; `tokens` counts the generated tokens.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from c3l_jax import runtime
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
  # Whether this job's shard counts (and, if it cannot be loaded, quarantines) the image: false for the
  # jobs of `final` that cycle back to an image an earlier job already used.
  counts_image: bool = True


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


# The counts of one shard (kept in its marker) and of the stage (their sums): `images` (loaded) +
# `images_rejected` (not loadable) are the distinct images the shard accounts for (`Job.counts_image`);
# `samples` (jobs whose image loaded) = `written` + `samples_rejected` (sequence over the context).
# `extra_pairs`: rows beyond one per sample, from answers holding several QA pairs
# (`generation.qa_per_prompt` > 1): written = samples + extra_pairs - samples_rejected.
SHARD_COUNTS = ("images", "images_rejected", "samples", "samples_rejected", "tokens", "extra_pairs")


def generate_jobs(inf: common.Inference, jobs: Sequence[Job], mode: str, stage: str, shard: int,
                  qa_per_prompt: int = 1) -> tuple[list[dict], list[dict], dict[str, int]]:
  """Run `jobs` (one shard): `(records, rejections, counts)` with `counts` keyed by `SHARD_COUNTS`.

  Rejections: each image that cannot be loaded, once (if the shard counts it), and each sample whose
  prompt + new tokens are over the model's context (in two_step, every sample of an image whose
  caption prompt is). `qa_per_prompt` > 1: each prompt asks for that many QA pairs
  (`instructions.ask_for_pairs`) and every pair parsed from the answer is a row, `{job id}_{k}`
  (k = 0, 1, ...); one row with an empty question when none parses (the filter quarantines it).
  """
  config, builder = inf.config, inf.builder
  max_new = config.generation.max_new_tokens
  rejected: list[dict] = []
  counted = {job.item.image for job in jobs if job.counts_image}
  good: set[str] = set()
  bad: set[str] = set()
  pixels: dict[str, np.ndarray] = {}
  counts = dict.fromkeys(SHARD_COUNTS, 0)

  def image_prompt(job: Job, text: str) -> list[int] | None:
    try:
      image = inf.source.load(job.item.image)
    except ImageError as e:
      if job.item.image not in bad:
        bad.add(job.item.image)
        if job.item.image in counted:
          _fail(config, f"image {job.item.image!r}", str(e))
          rejected.append(reject(dataclasses.asdict(job.item), str(e), id=job.item.image_id,
                                 image=job.item.image))
      return None
    good.add(job.item.image)
    ids, px = builder.encode_prompt(text, image)
    pixels[job.item.image] = px
    return ids

  def fits(ids: list[int], new_tokens: int, rejects: Sequence[Job], what: str = "") -> bool:
    if len(ids) + new_tokens <= inf.max_len:
      return True
    reason = (f"{what}sequence of {len(ids)} prompt + {new_tokens} new tokens is over the model's "
              f"context of {inf.max_len}")
    for job in rejects:
      _fail(config, f"sample {job.id!r}", reason)
      rejected.append(reject({"id": job.id, "image": job.item.image}, reason, id=job.id))
    counts["samples_rejected"] += len(rejects)
    return False

  captions: dict[str, str] = {}
  prompt_texts: dict[int, str] = {}  # job index -> the text of the prompt that writes its QA
  if mode == "two_step":  # step 1: one caption per image, keyed by the image's first job
    of_image: dict[str, list[Job]] = {}
    for job in jobs:
      of_image.setdefault(job.item.image, []).append(job)
    todo, prompts = [], []
    for i, job in enumerate(jobs):
      if of_image[job.item.image][0] is not job:
        continue
      ids = image_prompt(job, ins.CAPTION_INSTRUCTIONS[job.caption_choice])
      if ids is not None and fits(ids, config.generation.caption_max_new_tokens,
                                  of_image[job.item.image], "caption prompt: "):
        todo.append(i)
        prompts.append(ids)
    if prompts:
      texts, n = inf.generate(prompts, [pixels[jobs[i].item.image] for i in todo],
                              common.row_keys(config.seed, stage, shard, [2 * i for i in todo]),
                              config.generation.caption_max_new_tokens)
      counts["tokens"] += n
      captions = {jobs[i].item.image: text for i, text in zip(todo, texts)}
    todo, prompts, use_pixels = [], [], None
    for i, job in enumerate(jobs):
      if job.item.image not in captions:
        continue
      instruction = ins.ask_for_pairs(ins.QA_FROM_CAPTION[job.instruction_type][job.qa_choice],
                                      qa_per_prompt)
      prompt_texts[i] = ins.qa_from_caption_prompt(captions[job.item.image], instruction)
      ids, _ = builder.encode_prompt(prompt_texts[i], None)
      if fits(ids, max_new, [job]):
        todo.append(i)
        prompts.append(ids)
  else:
    todo, prompts = [], []
    for i, job in enumerate(jobs):
      prompt_texts[i] = ins.ask_for_pairs(VIGC_INSTRUCTIONS[job.instruction_type], qa_per_prompt)
      ids = image_prompt(job, prompt_texts[i])
      if ids is not None and fits(ids, max_new, [job]):
        todo.append(i)
        prompts.append(ids)
    use_pixels = [pixels[jobs[i].item.image] for i in todo]

  rows = []
  if prompts:
    texts, n = inf.generate(prompts, use_pixels,
                            common.row_keys(config.seed, stage, shard, [2 * i + 1 for i in todo]),
                            max_new, expected=[ins.EXPECTED_LENGTH[jobs[i].instruction_type]
                                               * qa_per_prompt for i in todo])
    counts["tokens"] += n
    for i, text in zip(todo, texts):
      job = jobs[i]
      instruction = (ins.QA_FROM_CAPTION[job.instruction_type][job.qa_choice] if mode == "two_step"
                     else VIGC_INSTRUCTIONS[job.instruction_type])
      row = {"id": job.id, "image": job.item.image, "image_id": job.item.image_id,
             "instruction_type": job.instruction_type, "instruction": instruction, "mode": mode,
             "generator": stage}
      # What produced the sample, as the train stage's `train.inputs=as_generated` reads it back:
      # `prompt`, the user turn of the step that wrote the QA (with the image iff mode is direct),
      # and in two_step the caption step's instruction (with the image) and its caption.
      if mode == "two_step":
        row["caption"] = captions[job.item.image]
        row["caption_instruction"] = ins.CAPTION_INSTRUCTIONS[job.caption_choice]
      row["prompt"] = prompt_texts[i]
      if qa_per_prompt == 1:
        pairs = [ins.parse_qa(text) or ("", "")]
      else:
        pairs = ins.parse_qa_pairs(text) or [("", "")]
        counts["extra_pairs"] += len(pairs) - 1
      for k, (question, answer) in enumerate(pairs):
        rows.append({**row, **({"id": f"{job.id}_{k}"} if qa_per_prompt > 1 else {}),
                     "output": text, "question": question, "answer": answer})
  counts.update(images=len(good & counted), images_rejected=len(bad & counted),
                samples=sum(job.item.image in good for job in jobs))
  return rows, rejected, counts


def run_generation(config: Any, workdir: str, stage: str, chunks: Sequence[Sequence[Job]] | Mapping[
                   int, Sequence[Job]], mode: str, checkpoint: str | None, upfront: Sequence[dict],
                   records: int, repeated: int = 0, num_shards: int | None = None,
                   qa_per_prompt: int = 1, sampling: dict[str, float] | None = None) -> dict:
  """Generate every unfinished shard of `chunks` (this process's share) and count the stage.

  `chunks`: the jobs of every shard (a list), or of this process's shards only (`shard index -> jobs`,
  with `num_shards` the stage's count). `records`: the input records the jobs draw on (their distinct
  images, each counted by one job) plus `upfront`, the input lines rejected before generation, plus
  `repeated`, the lines that name an image an earlier line lists (generated for once).
  `qa_per_prompt`: see `generate_jobs`; `sampling`: overrides of the generation's sampling settings
  (`common.Inference`).
  """
  stage_dir = os.path.join(workdir, stage)
  rt = runtime.get()
  num_shards = len(chunks) if num_shards is None else num_shards
  todo = [i for i in rt.my_shards(range(num_shards)) if not shards.is_done(stage_dir, i)]
  if todo:
    inf = common.Inference(config, checkpoint, sampling=sampling)
    with common.Progress(stage, sum(len(chunks[i]) for i in todo), "sample") as progress:
      for index in todo:
        rows, rejected, counts = generate_jobs(inf, chunks[index], mode, stage, index,
                                               qa_per_prompt=qa_per_prompt)
        shards.write_shard(stage_dir, index, rows, rejected, counts)
        progress.shard_done(index, len(chunks[index]), tokens=counts["tokens"], written=len(rows),
                            rejected=len(rejected))
  rt.barrier(f"{stage}:shards")
  counts = shards.sum_counts(stage_dir, range(num_shards), ("written",) + SHARD_COUNTS[:-1] + (
      SHARD_COUNTS[-1:] if qa_per_prompt > 1 else ()))  # (markers written before it lack extra_pairs)
  if rt.is_lead:
    shards.gather_rejected(stage_dir, upfront)
  rows = shards.read_parts(stage_dir)
  return {"read": records, "images": counts["images"], "repeated": repeated,
          "rejected": len(upfront) + counts["images_rejected"],
          "samples": counts["samples"], "samples_rejected": counts["samples_rejected"],
          "written": counts["written"], "tokens": counts["tokens"],
          **({"extra_pairs": counts["extra_pairs"]} if qa_per_prompt > 1 else {}),
          "unparsable": sum(1 for r in rows if not r["question"])}


def initial_sampling(config: Any) -> dict[str, float]:
  """The initial stage's sampling: `generation.initial_temperature` / `initial_top_p` where set (>= 0
  / > 0), else `generation.temperature` / `top_p` (the settings of every generating stage). Keys are
  drawn per (seed, stage, shard, row), so a sampled run resumes to the same bytes."""
  gen = config.generation
  return {"temperature": gen.initial_temperature if gen.initial_temperature >= 0 else gen.temperature,
          "top_p": gen.initial_top_p if gen.initial_top_p > 0 else gen.top_p}


def run(config: Any, workdir: str) -> dict:
  """Shard `s` is the images at positions `s * shard_size ...` of the source's listing; this process
  lists (reading no image) and draws the jobs of its own shards only (`runtime.my_shards`)."""
  source = open_source(config)
  n = source.count(config.data.max_images)
  if not n:
    raise BadInput("the initial stage found no images (check config.data.*)")
  size = config.generation.shard_size
  num_shards = -(-n // size)
  mine = runtime.get().my_shards(range(num_shards))
  positions = [p for index in mine for p in range(index * size, min((index + 1) * size, n))]
  items, upfront = source.items(config.data.max_images, positions, ground_truth=False)
  mix = ins.parse_mix(config.generation.instruction_mix)
  chunks, start = {}, 0
  for index in mine:
    rng = np.random.default_rng([config.seed, common.SALTS["initial"], index])
    stop = start + min(size, n - index * size)
    chunks[index] = draw_jobs(items[start:stop], config.generation.per_image, mix, rng)
    start = stop
  return run_generation(config, workdir, "initial", chunks, config.generation.mode, None, upfront,
                        records=n + len(upfront) + source.repeated, repeated=source.repeated,
                        num_shards=num_shards, qa_per_prompt=config.generation.qa_per_prompt,
                        sampling=initial_sampling(config))


__all__ = ["Job", "draw_jobs", "generate_jobs", "initial_sampling", "run", "run_generation"]
