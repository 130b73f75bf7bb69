"""The `curate` stage: S(I2C) of a LLaVA-format dataset you already have, its top entries exported
verbatim (README, "Curate a dataset you have"; docs/pipeline.md, "Curating a dataset").

`config.data.records` is a LLaVA-format file (`c3l_jax.data.llava_data`: a JSON array or JSONL of
`{"id", "image"?, "conversations"}`), streamed, never loaded whole. Three steps:

1. **score** (every process, its shards): entries are taken in shards of `curate.shard_size` in file
   order; each checked entry with an image gets S(I2C) (eq. 1, `c3l_jax.scoring`) for each gpt turn,
   teacher-forced after the whole conversation before it in the checkpoint's chat template, with and
   without the image (`PromptBuilder.encode_conversation`); the turns of a conversation share one image
   prefix (`scoring.prefix_sharing`, equal to scoring them apart). The entry's S(I2C) is the sum over
   its turns (eq. 1 over all its answer tokens), `i2c_per_token` that sum over its answer tokens.
   Text-only entries get no score (`text_only` rows). Quarantined (`WORKDIR/curate/rejected.jsonl`,
   each row `{"raw", "reason", "id", "index"}`): what `llava_data.check_entry` refuses, duplicate ids
   (the first entry with an id keeps it), missing or unreadable images, and conversations longer than
   the model's context. Shards are atomic and resumable (`pipeline.shards`).
2. **select** (the lead): the top `select.top_fraction` of the scored entries (rounded up, as the
   `select` stage does) or the top `curate.top_count`, ranked by `curate.rank_by` (`sum` | `per_token`),
   over one global ranking or, with `curate.balance_sources`, within each source (an entry's source is
   the first directory of its image path), so one source does not crowd out the rest. Ties go to the
   earlier entry.
3. **export** (the lead): `WORKDIR/export/selected.json`, the selected entries exactly as the input holds
   them, in input order (plus the text-only entries unless `curate.keep_text_only=False`), a file
   LLaVA's training script takes as it is; `export/scores.jsonl` (one line per scored entry: `id`,
   `turns`, `i2c`, `i2c_per_token`, `source`); `export/stats.json` (per source counts and S(I2C)
   statistics); `WORKDIR/report.html` (histogram per source, the best and worst conversations).

Counts (metrics.json): `read` entries = `scored` + `text_only` + `rejected`; `written` = the entries in
selected.json = `selected` + the text-only entries kept; `per_source` the same per source.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import json
import math
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from absl import logging
from etils import epath

from c3l_jax import runtime
from c3l_jax.data import llava_data
from c3l_jax.data.images import ImageError
from c3l_jax.data.records import BadInput, reject, write_fault, write_text_atomic
from c3l_jax.pipeline import shards

COUNT_KEYS = ("written", "rejected", "text_only")
EXAMPLES = 5  # best and worst conversations in the report


# -- step 1: stream, check, shard ---------------------------------------------------------------------

def checked_entries(config: Any) -> Iterator[tuple[llava_data.Raw, str | None, llava_data.Conversation | None]]:
  """Every entry of `data.records` in order with `(raw, reason to quarantine or None, conversation)`;
  the duplicate-id check needs every entry before it, so every process runs it over the whole file."""
  if not config.data.records:
    raise BadInput("config.data.records is not set: the curate stage reads a LLaVA-format dataset "
                   "(a JSON array or JSONL of {'id', 'image', 'conversations'})")
  if not os.path.isfile(config.data.records):
    raise BadInput(f"{config.data.records}: file not found")
  ids = llava_data.IdSet()
  root, outside = config.data.image_root, config.data.allow_outside_root
  for raw in llava_data.iter_entries(config.data.records, config.curate.format):
    if raw.problem:
      yield raw, raw.problem, None
      continue
    eid = llava_data.entry_id(raw.value)
    if eid is not None and not ids.add(eid):
      yield raw, f"duplicate id {eid!r} (the first entry with this id is kept)", None
      continue
    reason, conv = llava_data.check_entry(raw.value, root, outside)
    yield raw, reason, conv


def _reject(raw: llava_data.Raw, reason: str) -> dict:
  where: dict[str, Any] = {"index": raw.index}
  eid = llava_data.entry_id(raw.value)
  if eid is not None:
    where["id"] = eid
  if raw.line:
    where["line"] = raw.line
  return reject(raw.value if raw.value is not None or not raw.text else raw.text, reason, **where)


def _source_of_raw(raw: llava_data.Raw) -> str:
  image = raw.value.get("image") if isinstance(raw.value, dict) else None
  return llava_data.source_of(image) if isinstance(image, str) and image.strip() else ""


def _shards_of(stream: Iterable, size: int) -> Iterator[tuple[int, list]]:
  """`(shard index, its items)` of consecutive `size`-item chunks of `stream`."""
  chunk, index = [], 0
  for item in stream:
    chunk.append(item)
    if len(chunk) == size:
      yield index, chunk
      chunk, index = [], index + 1
  if chunk:
    yield index, chunk


def one_sequence(image_key: Any, enc: Sequence[Any]) -> Any:
  """The turns of a conversation as one teacher-forced sequence, when that is exactly the same thing.

  Turn k is scored as `prompt_k + answer_k` (`PromptBuilder.encode_conversation`). When every
  `prompt_k + answer_k` is a prefix of `prompt_{k+1}` (with and without the image) and the tokens after
  turn 0's prompt are the same in both passes, the last turn's sequence holds every turn's, and by
  causality the log-probs at turn k's answer positions are those of turn k's own sequence: one
  `ScoreInput` with a part per answer gives the same numbers at a fraction of the work (linear in the
  conversation's length rather than quadratic). Returns None where the tokenization differs at a seam
  (the turns are then scored one by one)."""
  from c3l_jax import scoring

  p_v, p_d = list(enc[0].prompt_image), list(enc[0].prompt_text)
  rest = list(enc[-1].prompt_image[len(p_v):]) + list(enc[-1].answer)
  parts = []
  for e in enc:
    start = len(e.prompt_image) - len(p_v)
    if (list(e.prompt_image) != p_v + rest[:start] or list(e.prompt_text) != p_d + rest[:start]
        or rest[start:start + len(e.answer)] != list(e.answer)):
      return None
    parts.append((start, len(e.answer)))
  return scoring.ScoreInput(image_key, p_v, p_d, rest, parts)


def score_shard(config: Any, chunk: list, inf: Any, scorer: Any, whole: bool = True
                ) -> tuple[list[dict], list[dict]]:
  """Score one shard's entries: `(rows, rejected)`; rows are the scored and the text-only entries.
  `whole=False` scores every turn as its own sequence even where `one_sequence` applies (tests)."""
  from c3l_jax import scoring

  rows, rejected, jobs, items, pixels = [], [], [], [], {}
  builder, max_len = inf.builder, inf.max_len
  for raw, reason, conv in chunk:
    if reason is None and conv.image is None:
      rows.append({"index": raw.index, "id": conv.id, "source": "", "text_only": True})
      continue
    if reason is None:
      try:
        image = inf.source.load(conv.image)
        enc = builder.encode_conversation(conv.turns, image)
        empty = next((k for k, e in enumerate(enc) if not e.answer), None)
        if empty is not None:
          raise ImageError(f"the answer of gpt turn {empty} tokenizes to nothing")
        longest = max(len(e.prompt_image) + len(e.answer) for e in enc)
        if longest > max_len:
          raise ImageError(f"conversation of {longest} tokens ({len(conv.turns)} gpt turns, image "
                           f"included) is over the model's context of {max_len}")
      except ImageError as e:
        reason = str(e)
    if reason is not None:
      if config.strict:
        eid = llava_data.entry_id(raw.value)
        named = f" (id {eid!r})" if eid is not None else ""
        raise BadInput(f"{config.data.records}: entry {raw.index}{named}: {reason}")
      rejected.append(_reject(raw, reason))
      continue
    pixels[conv.image] = enc[0].pixel_values
    item = one_sequence(conv.image, enc) if whole and len(enc) > 1 else None
    if item is not None:
      jobs.append((raw, conv, len(items), 0))
      items.append(item)
    else:
      jobs.append((raw, conv, len(items), len(enc)))
      items += [scoring.ScoreInput(conv.image, e.prompt_image, e.prompt_text, e.answer) for e in enc]
  results = scorer.score(items, pixels) if items else []
  for raw, conv, start, n in jobs:
    if n == 0:  # one sequence: lists per turn
      one = results[start]
      turns = [{k: one[k][t] for k in one} for t in range(len(conv.turns))]
    else:
      turns = results[start:start + n]
    total = sum(t["i2c"] for t in turns)
    tokens = sum(t["n_tokens"] for t in turns)
    rows.append({"index": raw.index, "id": conv.id, "source": conv.source,
                 "turns": [t["i2c"] for t in turns], "i2c": total, "i2c_per_token": total / tokens,
                 "n_tokens": tokens, "turn_tokens": [t["n_tokens"] for t in turns],
                 "logp_image": [t["logp_image"] for t in turns],
                 "logp_text": [t["logp_text"] for t in turns]})
  rows.sort(key=lambda r: r["index"])
  return rows, rejected


def make_scorer(config: Any):
  """The model on this process's devices (`common.Inference`) and its `make_scorer_for`."""
  from c3l_jax.pipeline import common

  inf = common.Inference(config)
  return inf, make_scorer_for(config, inf)


def make_scorer_for(config: Any, inf: Any):
  """A scorer on `inf`'s model that reports eq. 1 per turn, summed over its tokens (never normalised:
  the per-token value is computed from the sums)."""
  from c3l_jax import scoring

  return scoring.Scorer(
      inf.model, inf.mesh,
      scoring.ScoringConfig(mode=config.scoring.mode, length_norm=False,
                            prefix_sharing=config.scoring.prefix_sharing,
                            batch_rows=config.scoring.batch_size),
      inf.model.cfg.image_token_id, inf.builder.pad_id)


def score_all(config: Any, stage_dir: str) -> tuple[int, dict[str, collections.Counter]]:
  """Step 1 (every process): score this process's unfinished shards; returns the number of shards and
  the per-source entry counts of the whole file (every process streams all of it)."""
  from c3l_jax.pipeline import common

  rt = runtime.get()
  size = config.curate.shard_size
  per_source: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  inf = scorer = None
  n_shards = 0
  progress = common.Progress("curate", 0, "entry")
  progress.bar.total = None
  with progress:
    for index, chunk in _shards_of(checked_entries(config), size):
      n_shards = index + 1
      for raw, reason, conv in chunk:
        source = conv.source if conv is not None else _source_of_raw(raw)
        per_source[source]["entries"] += 1
      if not rt.my_shards([index]) or shards.is_done(stage_dir, index):
        continue
      if inf is None:
        inf, scorer = make_scorer(config)
      rows, rejected = score_shard(config, chunk, inf, scorer)
      shards.write_shard(stage_dir, index, rows, rejected,
                         {"text_only": sum(bool(r.get("text_only")) for r in rows)})
      progress.shard_done(index, len(chunk), tokens=sum(r.get("n_tokens", 0) for r in rows),
                          scored=sum(not r.get("text_only") for r in rows), rejected=len(rejected))
  return n_shards, per_source


# -- step 2: select -----------------------------------------------------------------------------------

def quota(n: int, fraction: float, count: int) -> int:
  """How many of `n` entries to take: `count` when set (at most n), else ceil(fraction * n) (at least
  one when there is any), the `select` stage's rounding."""
  if n == 0:
    return 0
  return min(count, n) if count else max(1, math.ceil(fraction * n))


def select(scores: np.ndarray, sources: Sequence[str], fraction: float, count: int = 0,
           balance: bool = False) -> np.ndarray:
  """Positions (ascending) of the entries to keep among `scores [N]` (higher is better, ties to the
  earlier entry).

  Global (default): the top `quota(N, fraction, count)`. Balanced: each source keeps its own top
  `ceil(fraction * its entries)`; with a `count`, the count is split over the sources in proportion to
  their sizes (largest remainders first, then the larger source), so every source is represented as it
  is in the data rather than by how high its scores run.
  """
  scores = np.asarray(scores, np.float64)
  n = len(scores)
  order = np.lexsort((np.arange(n), -scores))  # best first, ties: the earlier entry
  if not balance:
    return np.sort(order[:quota(n, fraction, count)])
  groups: dict[str, list[int]] = collections.defaultdict(list)
  for i in order:  # each source's positions, best first
    groups[sources[i]].append(int(i))
  if count:
    total = min(count, n)
    exact = {s: total * len(g) / n for s, g in groups.items()}
    take = {s: math.floor(v) for s, v in exact.items()}
    for s in sorted(groups, key=lambda s: (-(exact[s] - take[s]), -len(groups[s]), s))[:total - sum(take.values())]:
      take[s] += 1
  else:
    take = {s: quota(len(g), fraction, 0) for s, g in groups.items()}
  return np.sort(np.asarray([i for s, g in groups.items() for i in g[:take[s]]], np.int64))


SCORE_FIELDS = ("id", "turns", "i2c", "i2c_per_token", "source")  # a line of export/scores.jsonl


@dataclasses.dataclass
class Scores:
  """The scored entries in input order, 8 bytes a number (not a dict per entry): `index` their
  positions in the input, `value` the ranking key, `source` a code into `sources`; `text_only` the
  text-only entries' positions."""

  index: np.ndarray
  value: np.ndarray
  source: np.ndarray
  sources: list[str]
  text_only: np.ndarray


def read_scores(stage_dir: str, key: str, scores_path: epath.Path | None = None) -> Scores:
  """One pass over the stage's shards: the `Scores` (ranked by `key`), writing `scores.jsonl` (one line
  per scored entry, `SCORE_FIELDS`) on the way when `scores_path` is given."""
  index, value, source, text_only = array.array("q"), array.array("d"), array.array("q"), array.array("q")
  codes: dict[str, int] = {}
  out = None
  if scores_path is not None:
    tmp = scores_path.with_name(scores_path.name + ".tmp")
    write_fault(tmp)
    out = tmp.open("w", encoding="utf-8")
  try:
    for path in shards.part_files(stage_dir):
      for row in shards.read_part(path):
        if row.get("text_only"):
          text_only.append(row["index"])
          continue
        index.append(row["index"])
        value.append(row[key])
        source.append(codes.setdefault(row["source"], len(codes)))
        if out is not None:
          out.write(json.dumps({k: row[k] for k in SCORE_FIELDS}, ensure_ascii=False) + "\n")
  finally:
    if out is not None:
      out.close()
  if scores_path is not None:
    tmp.replace(scores_path)
  as_np = lambda a, t: np.frombuffer(a, t) if len(a) else np.zeros(0, t)
  return Scores(as_np(index, np.int64), as_np(value, np.float64), as_np(source, np.int64), list(codes),
                as_np(text_only, np.int64))


def score_rows(stage_dir: str, wanted: set[int]) -> dict[int, dict]:
  """The shard rows of the entries at input positions `wanted` (a few: the report's examples)."""
  return {row["index"]: row for path in shards.part_files(stage_dir) for row in shards.read_part(path)
          if row["index"] in wanted}


# -- step 3: export -----------------------------------------------------------------------------------

def write_selected(config: Any, path: epath.Path, keep: np.ndarray, want: set[int]) -> dict[int, Any]:
  """Stream `data.records` again and write the entries at the input positions `keep` (ascending) as
  one JSON array, each exactly as the input holds it (atomically: a tmp file, then a rename); returns
  the entries at positions `want` (the report's examples)."""
  tmp = path.with_name(path.name + ".tmp")
  found: dict[int, Any] = {}
  keep = np.asarray(keep, np.int64)
  at = 0  # the next position of `keep` to write
  write_fault(tmp)
  with tmp.open("w", encoding="utf-8") as f:
    f.write("[")
    first = True
    for raw in llava_data.iter_entries(config.data.records, config.curate.format):
      if raw.index in want:
        found[raw.index] = raw.value
      if at >= len(keep) or raw.index != keep[at]:
        continue
      at += 1
      f.write(("\n" if first else ",\n") + json.dumps(raw.value, ensure_ascii=False))
      first = False
    f.write("\n]\n")
  tmp.replace(path)
  return found


def _stats(values: np.ndarray) -> dict[str, float]:
  if not len(values):
    return {}
  return {"mean": float(values.mean()), "median": float(np.median(values)), "min": float(values.min()),
          "max": float(values.max())}


def run(config: Any, workdir: str) -> dict:
  stage_dir = os.path.join(workdir, "curate")
  rt = runtime.get()
  n_shards, per_source = score_all(config, stage_dir)
  rt.barrier("curate:shards")
  counts = shards.sum_counts(stage_dir, range(n_shards), COUNT_KEYS)
  read = sum(c["entries"] for c in per_source.values())
  # A shard's `written` rows are its scored and its text-only entries.
  metrics: dict[str, Any] = {"read": read, "scored": counts["written"] - counts["text_only"],
                             "text_only": counts["text_only"],
                             "rejected": counts["rejected"]}
  if rt.is_lead:
    shards.gather_rejected(stage_dir, [])
    metrics.update(export(config, workdir, stage_dir, per_source))
  rt.barrier("curate:exported")
  return metrics  # the lead's (DONE.json, metrics.json) include the export's counts


def export(config: Any, workdir: str, stage_dir: str, per_source: dict[str, collections.Counter]) -> dict:
  """Steps 2 and 3 (the lead): select, then write export/ and report.html; returns the metrics. Holds
  8 bytes per scored entry, never the entries (they are streamed from the input again)."""
  key = "i2c" if config.curate.rank_by == "sum" else "i2c_per_token"
  out = epath.Path(workdir) / "export"
  out.mkdir(parents=True, exist_ok=True)
  scores = read_scores(stage_dir, key, out / "scores.jsonl")
  names = np.asarray(scores.sources + [""], object)[scores.source] if len(scores.source) else []
  chosen = select(scores.value, names, config.select.top_fraction, config.curate.top_count,
                  config.curate.balance_sources)
  selected = scores.index[chosen]
  keep = np.union1d(selected, scores.text_only) if config.curate.keep_text_only else selected
  order = np.lexsort((np.arange(len(scores.value)), -scores.value))
  best, worst = order[:EXAMPLES].tolist(), order[::-1][:EXAMPLES].tolist()
  wanted = {int(scores.index[i]) for i in best + worst}
  examples = write_selected(config, out / "selected.json", keep, wanted)
  rows = score_rows(stage_dir, wanted)
  for code, name in enumerate(scores.sources):
    mine = scores.source == code
    per_source[name]["scored"] += int(mine.sum())
    per_source[name]["selected"] += int(mine[chosen].sum())
  with (epath.Path(stage_dir) / "rejected.jsonl").open() as f:
    for line in f:
      raw = json.loads(line)["raw"]
      per_source[_source_of_raw(llava_data.Raw(0, raw if isinstance(raw, dict) else None))]["rejected"] += 1
  if len(scores.text_only):
    per_source[""]["text_only"] = len(scores.text_only)
  values = {name: scores.value[scores.source == code] for code, name in enumerate(scores.sources)}
  stats = {"rank_by": config.curate.rank_by, "balance_sources": config.curate.balance_sources,
           "top_fraction": config.select.top_fraction, "top_count": config.curate.top_count,
           "sources": {s or "(no image)": {**{k: int(c[k]) for k in ("entries", "scored", "text_only",
                                                                      "rejected", "selected")},
                                           **{f"{key}_{k}": v for k, v in
                                              _stats(values.get(s, np.zeros(0))).items()}}
                       for s, c in sorted(per_source.items())}}
  write_text_atomic(out / "stats.json", json.dumps(stats, indent=1, ensure_ascii=False) + "\n")
  from c3l_jax.data.sources import open_source
  from c3l_jax.eval.report import build_curation_report
  pairs = lambda idx: [(rows[int(scores.index[i])], examples.get(int(scores.index[i]))) for i in idx]
  write_text_atomic(epath.Path(workdir) / "report.html", build_curation_report(
      stats, {n: v.tolist() for n, v in values.items()}, key, pairs(best), pairs(worst),
      open_source(config).load))
  logging.info("curate: selected %d of %d scored entries, %d text-only kept", len(selected),
               len(scores.value), len(keep) - len(selected))
  return {"written": int(len(keep)), "selected": int(len(selected)),
          "text_only_kept": int(len(keep) - len(selected)), "per_source": stats["sources"]}


# -- --dry_run: what a run would do -------------------------------------------------------------------

def _template_overhead(builder: Any, image_tokens: int) -> tuple[int, int, int, int]:
  """Tokens the chat template adds to turn 0's prompt and to each later turn, with the image (besides
  its tokens) and without: measured on a probe conversation."""
  n = lambda text: len(builder.encode_answer(text))
  turns = [("What is in the picture?", "A red square."), ("And its colour?", "Red.")]
  render = lambda k, with_image: builder.processor.apply_chat_template(
      builder.turn_conversation(turns, k, with_image), add_generation_prompt=True, tokenize=False)
  v0, v1 = (len(builder._image_prompt_ids(render(k, True), None)) for k in (0, 1))
  t0, t1 = (len(builder.encode_rendered(render(k, False), None)[0]) for k in (0, 1))
  inner = n(turns[0][1]) + n(turns[1][0])
  return v0 - image_tokens - n(turns[0][0]), v1 - v0 - inner, t0 - n(turns[0][0]), t1 - t0 - inner


def dry_run_lines(config: Any) -> list[str]:
  """`--dry_run`: the entries, the tokens the scorer would run through the model and the projected time
  on this host's devices. Tokens are counted from each message's own tokenization plus the chat
  template's overhead per turn (measured once), so they are exact up to merges at the template's seams;
  the time is the FLOPs (2 x parameters per token for the decoder and the vision tower, the LM head on
  answer tokens only; attention left out) at the rate of a matmul measured on one device in
  `model.dtype`, times the devices: a lower bound, real runs reach a fraction of a matmul's rate."""
  import time

  import jax
  import jax.numpy as jnp

  from c3l_jax import checkpoint, memory
  from c3l_jax.data.prompts import PromptBuilder, load_processor

  cfg = checkpoint.load_model_config(config.model.checkpoint)
  image = cfg.image_seq_length
  builder = PromptBuilder(load_processor(config.model.checkpoint), cfg.image_token_id, image)
  v0, v1, t0, t1 = _template_overhead(builder, image)
  counts = collections.Counter()
  for _, reason, conv in checked_entries(config):
    counts["entries"] += 1
    if reason is not None:
      counts["rejected"] += 1
      continue
    if conv.image is None:
      counts["text_only"] += 1
      continue
    counts["scored"] += 1
    lengths = [(len(builder.encode_answer(q)), len(builder.encode_answer(a))) for q, a in conv.turns]
    with_image, without = v0, t0  # prompt tokens besides the image's
    for k, (q, a) in enumerate(lengths):
      with_image, without = with_image + q + (v1 if k else 0), without + q + (t1 if k else 0)
      counts["turns"] += 1
      counts["answer_tokens"] += a
      counts["image_pass"] += with_image + a  # each turn's suffix after the shared image prefix
      counts["text_pass"] += without + a
      with_image, without = with_image + a, without + a
    counts["image_pass"] += image  # the image prefix, once per conversation
  sizes = collections.Counter()
  for path, shape, _ in memory.param_leaves(cfg):
    part = path.split("/")[1]
    if "embed_tokens" in path or "lm_head" in path:
      continue
    sizes["vision" if part in ("vision_tower", "multi_modal_projector") else "decoder"] += math.prod(shape)
  decoder_tokens = counts["image_pass"] + counts["text_pass"]
  flops = (2 * sizes["decoder"] * decoder_tokens + 2 * sizes["vision"] * image * counts["scored"]
           + 2 * 2 * cfg.text.hidden_size * cfg.text.vocab_size * counts["answer_tokens"])
  x = jnp.ones((2048, 2048), config.model.dtype)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(3):
    f(x).block_until_ready()
  rate = 3 * 2 * 2048 ** 3 / (time.perf_counter() - start)
  devices = jax.local_devices()
  seconds = flops / (rate * len(devices))
  return [f"curate: {counts['entries']} entries in {config.data.records}: {counts['scored']} with an image "
          f"({counts['turns']} gpt turns, {counts['answer_tokens']} answer tokens), "
          f"{counts['text_only']} text-only, {counts['rejected']} to quarantine by their structure",
          f"curate: {decoder_tokens} decoder tokens ({counts['image_pass']} with the image, one prefix per "
          f"conversation; {counts['text_pass']} without), {flops / 1e12:.1f} TFLOP",
          f"curate: projected at least {_duration(seconds)} on {len(devices)} {devices[0].device_kind} "
          f"device(s) (a {config.model.dtype} matmul runs at {rate / 1e12:.2f} TFLOP/s on one; images "
          "are not read in a dry run)"]


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.1f} s"
  if seconds < 7200:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


__all__ = ["checked_entries", "dry_run_lines", "make_scorer", "make_scorer_for", "quota", "run", "score_shard", "select"]
