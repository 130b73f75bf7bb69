"""The `eval` stage: a model on the paper's benchmarks (C3L Table 1), written to metrics.json and a table.

The model is `eval.checkpoint`, else the model the train stage exported to `WORKDIR/train/generator`
(C3L generator or a VLIT fine-tuned model), else `model.checkpoint`. `eval.benchmarks` (comma list):

  pope         POPE random / popular / adversarial (`c3l_jax.eval.pope`): the official question files
               (`eval.pope_questions_dir`), or built from POPE-format object annotations
               (`eval.pope_annotations`), or from the data source's `val` split (COCO val2014 instances,
               or a registered source's objects); images from `eval.pope_images` or the data source.
  seed         SEED-Bench image tasks (`eval.seed_bench_json`, `eval.seed_bench_images`).
  mmbench      MMBench dev with CircularEval (`eval.mmbench_tsv`).
  llava_bench  LLaVA-Bench (In-the-Wild) answers file (`eval.llava_bench_dir`); the GPT-4 judge is not run.
  ...          a benchmark a testbed registered (`c3l_jax.registry.Benchmark`), e.g. `scenes_vqa`
               (`c3l_jax.scenes`: grounded VQA on held-out scenes, judged by the world's checker).

Questions are asked in the model family's words (`c3l_jax.data.prompts.EVAL_PROMPTS`: LLaVA-1.5's
evaluation prompts for LLaVA-1.5 and MiniGPT-4, VLMEvalKit's Qwen2-VL prompts for Qwen2.5-VL), inside
the checkpoint's chat template. Decoding is greedy (LLaVA-1.5's evaluation), whatever
`generation.temperature` says; POPE and generated multiple-choice letters get `eval.max_new_tokens`,
LLaVA-Bench `eval.long_max_new_tokens`. Multiple-choice answers are chosen by option log-likelihood or
by a generated letter (`eval.mc_mode`). `eval.max_items` caps the questions per benchmark (per POPE
split).

Outputs under WORKDIR/eval/: per benchmark a folder of shards (`part-NNNNN.jsonl`: every question with
the model's answer; images that cannot be loaded go to `rejected.jsonl`; with `mc_mode=generate` the
replies of every option rotation are in `<benchmark>_rotations/` and `<benchmark>/` holds one row per
question with its replies, predictions and targets), the POPE questions in the
official format (`pope/<source>_pope_<split>.json`), `llava_bench_answers.jsonl`, a registered
benchmark's own files (the scenes testbed's `scenes_vqa_answers.jsonl`), and `table.txt` (the
printed table). Work is split in chunks over processes; finished chunks are skipped on a rerun.

Bad input is quarantined with its reason, never dropped: entries of a benchmark file that cannot be
asked (malformed lines, missing fields, an answer outside the options, an undecodable MMBench image, a
POPE label that is not yes/no) and questions whose image cannot be loaded go to the benchmark's
`rejected.jsonl` (bad POPE annotation lines to `pope/rejected.jsonl`); `strict=True` stops at the first.
Counts per benchmark (metrics.json): `read` = `n` (answered) + `rejected` + `unasked` (past
`eval.max_items`); POPE's are over its three splits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

import numpy as np
import tqdm
from absl import logging
from etils import epath

from c3l_jax import runtime, scoring, sharding
from c3l_jax.data.batching import round_up
from c3l_jax.data.images import ImageError, apply_image_aspect, image_path, load_image, load_image_bytes
from c3l_jax.data.prompts import eval_prompts
from c3l_jax.data.records import BadInput, reject, write_jsonl, write_text_atomic
from c3l_jax import registry
from c3l_jax.eval import llava_bench, multiple_choice as mc, pope, table
from c3l_jax.models.configs import MODEL_CONFIG_FILE
from c3l_jax.pipeline import common, shards


def parse_benchmarks(spec: str) -> tuple[str, ...]:
  """`"seed, pope"` -> `("pope", "seed")` (known names, deduplicated, in `registry.benchmark_names()`
  order: the built-in ones, then the registered ones)."""
  known = registry.benchmark_names()
  names = [s.strip() for s in str(spec).split(",") if s.strip()]
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"config.eval.benchmarks: unknown benchmark {unknown[0]!r} "
                     f"(valid: {', '.join(known)})")
  if not names:
    raise ValueError(f"config.eval.benchmarks is empty (valid: {', '.join(known)})")
  return tuple(b for b in known if b in names)


def resolve_checkpoint(config: Any, workdir: str) -> str:
  """`eval.checkpoint`, else `WORKDIR/train/generator` when the train stage exported one, else
  `model.checkpoint`."""
  if config.eval.checkpoint:
    return config.eval.checkpoint
  trained = os.path.join(workdir, "train", "generator")
  if (epath.Path(trained) / MODEL_CONFIG_FILE).exists():
    return trained
  return config.model.checkpoint


class Evaluator:
  """The loaded model, an image loader and the chunked, resumable, process-sharded question runner."""

  def __init__(self, config: Any, workdir: str, checkpoint: str):
    self.config = config
    self.dir = os.path.join(workdir, "eval")
    self.inf = common.Inference(config, checkpoint, split="val")
    mult = int(np.prod([self.inf.mesh.shape[a] for a in sharding.BATCH_AXES]))
    self.inf.batch_rows = round_up(config.data.eval_batch_size, mult)
    base = self.inf.sampling_config
    self.inf.sampling_config = lambda n: dataclasses.replace(base(n), temperature=0.0, top_k=0,
                                                             top_p=1.0)
    self.chunk = self.inf.batch_rows * 8
    self._scorer: scoring.Scorer | None = None
    self.model_id = os.path.basename(os.path.normpath(checkpoint))
    try:
      self.prompts = eval_prompts(getattr(self.inf.model.cfg, "family", "llava15"))
    except ValueError as e:
      raise BadInput(str(e)) from None

  # -- images -----------------------------------------------------------------------------------
  def load(self, image: str, folder: str | None = None, data: bytes | None = None) -> Any:
    """A picture: from raw bytes, else the file `folder/image` (`folder=""`: `image` is a path), else
    (`folder=None`) the data source's image keyed `image`."""
    max_pixels = int(self.config.data.max_pixels)
    if data is not None:
      img = load_image_bytes(data, max_pixels, name=image)
    elif folder is not None:
      path = image_path(folder, image, self.config.data.allow_outside_root) if folder else image
      img = load_image(path, max_pixels)
    else:
      return self.inf.source.load(image)  # the source applies data.image_aspect itself
    return apply_image_aspect(img, self.config.data.image_aspect, self.inf.builder.processor)

  # -- the runner ---------------------------------------------------------------------------------
  def run_chunks(self, name: str, n: int, work: Callable[[int, range], tuple[list[dict], list[dict]]],
                 upfront: Sequence[dict] = ()) -> tuple[list[dict], int]:
    """Run `work(chunk_index, item_range) -> (rows, rejected)` over chunks of `self.chunk` items (this
    process's share, unfinished ones only); returns every process's rows in order and the number of
    rejections: `upfront` (the benchmark file's bad entries) + every chunk's, all in `rejected.jsonl`."""
    out = os.path.join(self.dir, name)
    count = max(1, math.ceil(n / self.chunk))
    todo = [i for i in runtime.get().my_shards(range(count)) if not shards.is_done(out, i)]
    bar = tqdm.tqdm(total=sum(len(range(i * self.chunk, min(n, (i + 1) * self.chunk))) for i in todo),
                    desc=f"eval {name}", unit="q", disable=not todo)
    for i in todo:
      span = range(i * self.chunk, min(n, (i + 1) * self.chunk))
      rows, rejected = work(i, span)
      shards.write_shard(out, i, rows, rejected)
      bar.update(len(span))
    bar.close()
    runtime.get().barrier(f"eval:{name}")
    n_rejected = shards.gather_rejected(out, upfront) if runtime.get().is_lead else 0
    return shards.read_parts(out), n_rejected

  def _bad_image(self, rejected: list[dict], what: dict, e: ImageError) -> None:
    if self.config.strict:
      raise BadInput(f"eval: {e}")
    where = {"id": what["id"]} if isinstance(what, dict) and "id" in what else {}
    rejected.append(reject(what, str(e), **where))

  def generate(self, name: str, questions: Sequence[dict], max_new: int,
               prompt: Callable[[dict], str], image: Callable[[dict], Any],
               upfront: Sequence[dict] = ()) -> tuple[list[dict], int]:
    """Greedy answers to `questions` (dicts): each row comes back with `answer` (the generated text)."""
    def work(index: int, span: range) -> tuple[list[dict], list[dict]]:
      ids, pixels, keep, rejected, cache = [], [], [], [], {}
      for j in span:
        q = questions[j]
        try:
          key = q.get("image")
          if key not in cache:
            cache[key] = image(q)
          p, px = self.inf.builder.encode_prompt(prompt(q), cache[key])
        except ImageError as e:
          self._bad_image(rejected, q, e)
          continue
        ids.append(p)
        pixels.append(px)
        keep.append(j)
      if not ids:
        return [], rejected
      keys = common.row_keys(self.config.seed, "eval", index, list(range(len(ids))))
      texts, _ = self.inf.generate(ids, pixels, keys, max_new)
      return [{**questions[j], "answer": t.strip()} for j, t in zip(keep, texts)], rejected
    return self.run_chunks(name, len(questions), work, upfront)

  def scorer(self) -> scoring.Scorer:
    if self._scorer is None:
      cfg = scoring.ScoringConfig(batch_rows=self.config.data.eval_batch_size,
                                  prefix_sharing=self.config.scoring.prefix_sharing)
      self._scorer = scoring.Scorer(self.inf.model, self.inf.mesh, cfg,
                                    self.inf.model.cfg.image_token_id, self.inf.builder.pad_id)
    return self._scorer

  def option_loglik(self, name: str, items: Sequence[mc.MCItem], image: Callable[[mc.MCItem], Any],
                    upfront: Sequence[dict] = ()) -> tuple[list[dict], int]:
    """Mean per-token log-likelihood of every option's text as the answer to the bare question."""
    builder = self.inf.builder

    def work(index: int, span: range) -> tuple[list[dict], list[dict]]:
      del index
      inputs, owners, pixels, rejected, rows = [], [], {}, [], []
      for j in span:
        item = items[j]
        try:
          img = image(item)
        except ImageError as e:
          self._bad_image(rejected, {"id": item.id, "image": item.image}, e)
          continue
        prompt_image, px = builder.encode_prompt(mc.question_text(item), img)
        prompt_text, _ = builder.encode_prompt(mc.question_text(item), None)
        pixels[item.id] = px
        for o, option in enumerate(item.options):
          answer = builder.encode_answer(option)
          if answer:
            inputs.append(scoring.ScoreInput(item.id, prompt_image, prompt_text, answer))
            owners.append((j, o))
        rows.append(j)
      scores = {j: [-math.inf] * len(items[j].options) for j in rows}
      if inputs:
        for (j, o), res in zip(owners, self.scorer().score(inputs, pixels)):
          scores[j][o] = res["logp_image"] / res["n_tokens"]
      return [_mc_row(items[j], scores=scores[j]) for j in rows], rejected
    return self.run_chunks(name, len(items), work, upfront)

  def option_generate(self, name: str, items: Sequence[mc.MCItem], circular: bool,
                      image: Callable[[mc.MCItem], Any], upfront: Sequence[dict] = ()
                      ) -> tuple[list[dict], int]:
    """A generated letter per rotation (every rotation with `circular`, else the original order).

    The replies go to `eval/<name>_rotations/` (one row per rotation, resumable like every benchmark);
    the per-question rows (`outputs`, `predictions`, `targets`) to `eval/<name>/part-00000.jsonl`, and a
    question whose image failed to `eval/<name>/rejected.jsonl` once, with the reason (never half-scored).
    """
    questions = []
    for j, item in enumerate(items):
      for r in range(len(item.options) if circular else 1):
        options, _ = mc.rotated(item, r)
        questions.append({"item": j, "rotation": r, "image": item.image,
                          "prompt": mc.choice_prompt(item, options, self.prompts)})
    rows, _ = self.generate(f"{name}_rotations", questions, self.config.eval.max_new_tokens,
                            lambda q: q["prompt"], lambda q: image(items[q["item"]]))
    by_item: dict[int, dict[int, str]] = {}
    for r in rows:
      by_item.setdefault(r["item"], {})[r["rotation"]] = r["answer"]
    out, missing = [], []
    for j, item in enumerate(items):
      rotations = range(len(item.options) if circular else 1)
      answers = by_item.get(j, {})
      if set(answers) == set(rotations):
        out.append(_mc_row(item, outputs=[answers[r] for r in rotations]))
      else:
        missing.append(j)
    if runtime.get().is_lead:
      reasons: dict[int, str] = {}
      for bad in shards.read_part(os.path.join(self.dir, f"{name}_rotations", "rejected.jsonl")):
        reasons.setdefault(bad["raw"]["item"], bad["reason"])
      rejected = [reject({"id": items[j].id, "image": items[j].image},
                         reasons.get(j, "a rotation has no reply"), id=items[j].id) for j in missing]
      out_dir = os.path.join(self.dir, name)
      shards.write_shard(out_dir, 0, out, rejected)
      shards.gather_rejected(out_dir, upfront)
    runtime.get().barrier(f"eval:{name}:items")
    return out, len(upfront) + len(missing)


def _mc_row(item: mc.MCItem, scores: Sequence[float] | None = None,
            outputs: Sequence[str] | None = None) -> dict:
  """A question's record: per-rotation predictions (indices into the rotated options) and targets."""
  row: dict[str, Any] = {"id": item.id, "task": item.task, "answer": mc.LETTERS[item.answer]}
  if scores is not None:  # order-free: the best option, seen through each rotation
    best = mc.argmax_first(scores)
    n = len(item.options)
    row["scores"] = [s if math.isfinite(s) else None for s in scores]
    row["predictions"] = [(best - r) % n for r in range(n)]
  else:
    row["outputs"] = list(outputs or [])
    row["predictions"] = [mc.parse_choice(text, mc.rotated(item, r)[0])
                          for r, text in enumerate(row["outputs"])]
  row["targets"] = [mc.rotated(item, r)[1] for r in range(len(row["predictions"]))]
  return row


def _mc_metrics(rows: Sequence[dict], circular: bool, mode: str, n_rejected: int) -> dict:
  results = []
  for r in rows:
    preds, targets = r["predictions"], r["targets"]
    ok = mc.circular_correct(preds, targets) if circular else preds[0] == targets[0]
    results.append({"task": r["task"], "correct": ok})
  return {**mc.accuracy(results), "mode": mode, "circular": circular, "rejected": n_rejected}


def _cap(items: list, limit: int) -> list:
  return items[:limit] if limit else items


def _pope(ev: Evaluator, cfg: Any) -> dict:
  strict = ev.config.strict
  file_rejected: dict[str, list[dict]] = {split: [] for split in pope.SPLITS}
  out: dict[str, Any] = {}
  if cfg.pope_questions_dir:
    splits, file_rejected = pope.read_question_files(cfg.pope_questions_dir, strict)
    origin, k = "questions", None
  else:
    epath.Path(ev.dir, "pope").mkdir(parents=True, exist_ok=True)
    if cfg.pope_annotations:
      annotations, bad = pope.read_annotations(cfg.pope_annotations, strict)
      origin = "annotations"
      out["annotations_rejected"] = len(bad)
      if runtime.get().is_lead:
        write_jsonl(os.path.join(ev.dir, "pope", "rejected.jsonl"), bad)
    else:
      items, _ = ev.inf.source.items(0, ground_truth=("objects",))  # COCO: from the stored index
      annotations = [{"image": it.image, "image_id": it.image_id, "objects": list(it.objects)}
                     for it in items if it.objects]
      origin = ev.inf.source.kind
      if not annotations:
        raise BadInput(f"pope: the {origin} val split has no object annotations; set "
                       "eval.pope_questions_dir (official question files) or eval.pope_annotations")
    k = pope.effective_k(cfg.pope_objects, {o for a in annotations for o in a["objects"]})
    splits = pope.build_splits(annotations, cfg.pope_num_images, k, ev.config.seed)
    if runtime.get().is_lead:
      for split, questions in splits.items():
        write_jsonl(os.path.join(ev.dir, "pope", f"{origin}_pope_{split}.json"),
                    [{key: q[key] for key in ("question_id", "image", "image_id", "text", "label")
                      if key in q} for q in questions])
  per_split, read, rejected, unasked = {}, 0, 0, 0
  for split in pope.SPLITS:
    questions = _cap(splits[split], ev.config.eval.max_items)
    rows, n_bad = ev.generate(f"pope_{split}", questions, cfg.max_new_tokens,
                              lambda q: ev.prompts.ask_yes_no(q["text"]),
                              lambda q: ev.load(q["image"], cfg.pope_images or None),
                              upfront=file_rejected[split])
    read += len(splits[split]) + len(file_rejected[split])
    rejected += n_bad
    unasked += len(splits[split]) - len(questions)
    per_split[split] = pope.metrics([pope.parse_yes_no(r["answer"]) for r in rows],
                                    [r["label"] for r in rows])
  out.update(pope.summarize(per_split))
  # read = n + rejected + unasked (over the three splits; unasked: past eval.max_items)
  out.update(source=origin, read=read, n=sum(m["n"] for m in per_split.values()), rejected=rejected,
             unasked=unasked)
  if k is not None:
    out["objects_per_image"] = k
  return out


def _multiple_choice(ev: Evaluator, cfg: Any, name: str) -> dict:
  if name == "seed":
    if not cfg.seed_bench_json:
      raise BadInput("benchmark seed needs eval.seed_bench_json (SEED-Bench.json) and "
                     "eval.seed_bench_images (its image folder)")
    items, bad = mc.load_seed_bench(cfg.seed_bench_json, cfg.seed_bench_images, ev.config.strict)
    circular = False
  else:
    if not cfg.mmbench_tsv:
      raise BadInput("benchmark mmbench needs eval.mmbench_tsv (the MMBench dev TSV)")
    items, bad = mc.load_mmbench(cfg.mmbench_tsv, ev.config.strict)
    circular = True
  asked = _cap(items, cfg.max_items)
  image = lambda it: ev.load(it.image, "", it.image_bytes)  # noqa: E731
  if cfg.mc_mode == "loglik":
    rows, n_bad = ev.option_loglik(name, asked, image, bad)
  else:
    rows, n_bad = ev.option_generate(name, asked, circular, image, bad)
  return {**_mc_metrics(rows, circular, cfg.mc_mode, n_bad), "read": len(items) + len(bad),
          "unasked": len(items) - len(asked)}


def _llava_bench(ev: Evaluator, cfg: Any) -> dict:
  if not cfg.llava_bench_dir:
    raise BadInput("benchmark llava_bench needs eval.llava_bench_dir (the llava-bench-in-the-wild "
                   "folder: questions.jsonl, images/)")
  questions, bad = llava_bench.read_questions(cfg.llava_bench_dir, ev.config.strict)
  asked = _cap(questions, cfg.max_items)
  rows, n_bad = ev.generate("llava_bench", asked, cfg.long_max_new_tokens,
                            lambda q: ev.prompts.ask_open(q["text"]),
                            lambda q: ev.load(q["image_path"], ""), upfront=bad)
  path = os.path.join(ev.dir, "llava_bench_answers.jsonl")
  if runtime.get().is_lead:
    write_jsonl(path, [llava_bench.answer_record(r, r["answer"], ev.model_id) for r in rows])
  return {"n": len(rows), "answers": path, "read": len(questions) + len(bad), "rejected": n_bad,
          "unasked": len(questions) - len(asked)}


def _dataset_stats(workdir: str) -> dict | None:
  path = epath.Path(workdir) / "export" / "stats.json"
  return json.loads(path.read_text()) if path.exists() else None


def run(config: Any, workdir: str) -> dict:
  cfg = config.eval
  try:
    benchmarks = parse_benchmarks(cfg.benchmarks)
  except ValueError as e:
    raise BadInput(str(e)) from None
  checkpoint = resolve_checkpoint(config, workdir)
  ev = Evaluator(config, workdir, checkpoint)
  metrics: dict[str, Any] = {"checkpoint": checkpoint}
  for name in benchmarks:
    logging.info("eval: %s", name)
    if name == "pope":
      metrics["pope"] = _pope(ev, cfg)
    elif name in ("seed", "mmbench"):
      metrics[name] = _multiple_choice(ev, cfg, name)
    elif name == "llava_bench":
      metrics["llava_bench"] = _llava_bench(ev, cfg)
    else:
      bench = registry.BENCHMARKS[name]
      if bench.sources and ev.inf.source.kind not in bench.sources:
        raise BadInput(f"eval.benchmarks={name} needs data.source={' or '.join(bench.sources)}")
      metrics[name] = bench.run(ev, cfg)
  stats = _dataset_stats(workdir)
  if stats is not None:
    metrics["dataset"] = {k: stats[k] for k in ("instances", "avg_question_words", "avg_answer_words")
                          if k in stats}
  text = table.format_table(ev.model_id, metrics, stats)
  if runtime.get().is_lead:
    write_text_atomic(epath.Path(ev.dir, "table.txt"), text)
    print(text, flush=True)
  metrics["table"] = table.table_row(metrics)
  return metrics


__all__ = ["Evaluator", "parse_benchmarks", "resolve_checkpoint", "run"]
