"""The `ablation` stage: the paper's Table 4 on the configured world (C3L Sec. 4.3), over seeds.

Four ways to make the final data, each followed by the paper's protocol — fine-tune a fresh copy of the
student (`ablation.student`, default the base model `model.checkpoint`) on that data (VLIT) and evaluate
it:

  filtering        the base generator's data, basic filtering only (no generator training)
  + CLM            generator trained with CE + the contrastive loss, but samples picked at random
                   (`select.method=random`: no content relevance)
  + CRM            generator trained with CE on the top S(I2C) fraction, no contrastive loss
  + CRM + CLM      C3L: CE on the top S(I2C) fraction + the contrastive loss on I2C roles

and, with `ablation.variants`, more rows:

  final_mode       the final data in the other `generation.final_mode` (the paper's final generation
                   is two-step; `direct` is one VIGC prompt per sample), from the base generator
                   (filtering) and from the C3L generator: two rows
  length_norm      C3L with S(I2C) divided by the answer's length (`scoring.length_norm`): the paper's
                   eq. 1 sums over answer tokens, so long answers fill the top fraction
  as_generated, anchor_generated, anchor_neutral, negatives
                   C3L under another reading of the paper (docs/pipeline.md, "Readings of the paper"):
                   `train.inputs=as_generated`, `train.anchor=generated`,
                   `train.anchor_instruction=neutral`, `train.contrastive_denominator=negatives`
  FIELD=VALUE[+FIELD=VALUE...]
                   C3L with those config overrides, e.g. the paper's initial generation:
                   `generation.qa_per_prompt=3+generation.initial_temperature=0.7`

A C3L variant row runs the generator stages from the first one its overrides change (a `train.*`
field: train, final, export; a `generation.*` field: all of them) and links the earlier ones (the
seed's shared stages, the "+CRM+CLM" row's select and train).

The student itself is evaluated too, as the reference row ("student", or "base model" when the
student is the base model).

With `ablation.student_data` (the paper's student, LLaVA-7B, already follows instructions: its own
instruction mix taught it, as LLaVA's fine-tunes keep that mix), every fine-tune mixes the student's own
instruction data in at a fixed share s = `ablation.student_data_share`: a row whose final data hold N
records trains on those N plus the first round(N s / (1 - s)) records of a seeded order of the
student's data (`mix`; the order is a function of the seed alone, so rows' own parts are prefixes of
one another and s is the share of the records file each fine-tune trains on: exactly, up to that
rounding). The reference row ("student + own data") is then the student fine-tuned on its own part
alone, round(`generation.num_final` s / (1 - s)) records, for the same steps, so each row differs from
it only by the generated data. `student_data` is a records file or the name of a source that builds
the data from its ground truth (`scenes`: `c3l_jax.scenes.student`), written per seed to
`WORKDIR/ablation/seed<k>/student_data.jsonl`. With `ablation.student_steps`, the student is first
instruction-tuned on all of that data (once per seed, `WORKDIR/ablation/seed<k>/student/`,
`instruct_student`) and the seed's fine-tunes start from the tuned model: a student that has never
answered a question does not learn to within a short fine-tune. Everything runs for `ablation.seeds`
seeds: seed k adds k to every config field named in `ablation.seed_keys` (the pipeline's `seed`, which
draws the generation and fine-tuning randomness, and e.g. the scenes world's `data.scenes_seed`), and
the table reports each metric's mean and the half-width of its 95 % interval (Student's t over the
seeds; none for one seed).

Layout: `WORKDIR/ablation/seed<k>/` holds seed k's shared stages (`initial`, `filter`, `score`; seed 0
links this workdir's own, run first if missing), with `ablation.student_data` the student's data
(`student_data.jsonl`) and instruction-tuned model (`student/`), and one directory per row (the
reference row's is `base/`; the generator's stages,
then `downstream/` with the VLIT fine-tune and its `eval`). Metrics per row: the data's size and,
where the source has ground truth, its quality (e.g. the scenes world's checker); POPE (random /
popular / adversarial: accuracy, F1, yes-ratio) and the columns of registered benchmarks (e.g. the
scenes world's held-out VQA accuracy, `vqa_acc`) of the fine-tuned model. `WORKDIR/ablation/table.txt`
is the printed table.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from scipy import stats

from c3l_jax import console, registry, runtime
from c3l_jax.data.records import BadInput, read_records, write_jsonl, write_text_atomic
from c3l_jax.eval.pope import SPLITS as POPE_SPLITS
from c3l_jax.pipeline import ABLATION_VARIANTS, common, shards, student_count, variant_overrides

SHARED = ("initial", "filter", "score")


@dataclasses.dataclass(frozen=True)
class Row:
  """One row: its directory under the seed's, the generator stages it runs there, the config overrides,
  and the stages it takes from elsewhere (`links`: stage -> a directory relative to the seed's)."""

  dirname: str
  stages: tuple[str, ...]
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  links: dict[str, str] = dataclasses.field(default_factory=lambda: {s: s for s in SHARED})


ROWS: dict[str, Row] = {
    "filtering": Row("filtering", ("final", "export")),
    "+CLM": Row("clm", ("select", "train", "final", "export"), {"select.method": "random"}),
    "+CRM": Row("crm", ("select", "train", "final", "export"), {"train.contrastive_weight": 0.0}),
    "+CRM+CLM": Row("crm_clm", ("select", "train", "final", "export")),
}
VARIANTS = ABLATION_VARIANTS


def variant_rows(config: Any) -> dict[str, Row]:
  """The `ablation.variants` rows for `config` (named after what they change)."""
  out = {}
  names = [v.strip() for v in config.ablation.variants.split(",") if v.strip()]
  if "final_mode" in names:
    other = "direct" if config.generation.final_mode == "two_step" else "two_step"
    # The base generator's data made the other way (the baseline of the next row) ...
    out[f"filtering {other}"] = Row(f"filtering_{other}", ("final", "export"),
                                    {"generation.final_mode": other})
    # ... and C3L's trained generator (select and train linked from +CRM+CLM), final data made so.
    out[f"+CRM+CLM {other}"] = Row(
        f"crm_clm_{other}", ("final", "export"), {"generation.final_mode": other},
        {**{s: s for s in SHARED}, "select": "crm_clm/select", "train": "crm_clm/train"})
  for name in names:  # the readings of the paper, and FIELD=VALUE rows: C3L with those overrides
    overrides = variant_overrides(config, name)
    if overrides is not None:
      out[f"+CRM+CLM {name}"] = reading_row(name, overrides)
  if "length_norm" in names and not config.scoring.length_norm:
    # Its own score stage (S(I2C) / answer tokens), then C3L as above.
    out["+CRM+CLM len-norm"] = Row(
        "crm_clm_length_norm", ("score", "select", "train", "final", "export"),
        {"scoring.length_norm": True}, {"initial": "initial", "filter": "filter"})
  return out


GENERATOR_STAGES = ("initial", "filter", "score", "select", "train", "final", "export")
# The first stage a config field changes (by the longest matching prefix); others: "initial".
FIRST_STAGE = {"generation.": "initial", "generation.final_mode": "final",
               "generation.num_final": "final", "generation.score_final": "final",
               "filter.": "filter", "scoring.": "score", "select.": "select", "train.": "train"}


def first_stage(path: str) -> str:
  """The first generator stage whose output the config field `path` can change."""
  matches = [p for p in FIRST_STAGE if path == p or (p.endswith(".") and path.startswith(p))]
  return FIRST_STAGE[max(matches, key=len)] if matches else "initial"


def reading_row(name: str, overrides: dict[str, Any]) -> Row:
  """C3L with `overrides`: the generator stages from the first one they change run in the row's own
  directory; the earlier ones are linked (the seed's shared stages, C3L's select and train)."""
  start = min(GENERATOR_STAGES.index(first_stage(path)) for path in overrides)
  earlier = GENERATOR_STAGES[:start]
  links = {s: s for s in SHARED if s in earlier}
  links.update({s: f"crm_clm/{s}" for s in ("select", "train") if s in earlier})
  return Row("crm_clm_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"),
             GENERATOR_STAGES[start:], overrides, links)


def all_rows(config: Any) -> dict[str, Row]:
  return {**ROWS, **variant_rows(config)}


def derive(config: Any, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-path overrides (locked again)."""
  out = ml_collections.ConfigDict(config.to_dict())
  for path, value in overrides.items():
    *sections, key = path.split(".")
    node = out
    for part in sections:
      node = node[part]
    node[key] = value
  out.lock()
  return out


def _link(seed_dir: str, row_dir: str, links: dict[str, str]) -> None:
  os.makedirs(row_dir, exist_ok=True)
  for stage, target in links.items():
    link = os.path.join(row_dir, stage)
    if not os.path.lexists(link):
      os.symlink(os.path.relpath(os.path.join(seed_dir, target), row_dir), link)


def seeded(config: Any, k: int) -> ml_collections.ConfigDict:
  """`config` for seed k: every field in `ablation.seed_keys` moved by k."""
  keys = [key.strip() for key in config.ablation.seed_keys.split(",") if key.strip()]
  values = {}
  for key in keys:
    node = config
    for part in key.split("."):
      node = node[part]
    values[key] = node + k
  return derive(config, values)


def mean_interval(values: Sequence[float | None], confidence: float = 0.95
                  ) -> tuple[float | None, float | None]:
  """(mean, half-width of the two-sided `confidence` interval by Student's t) of `values`.

  Nones (a metric a seed could not measure) are left out; the half-width is None below two values.
  """
  xs = np.asarray([v for v in values if v is not None], np.float64)
  if not len(xs):
    return None, None
  if len(xs) < 2:
    return float(xs[0]), None
  t = stats.t.ppf(0.5 + confidence / 2, df=len(xs) - 1)
  return float(xs.mean()), float(t * xs.std(ddof=1) / math.sqrt(len(xs)))


def reference_row(config: Any) -> str:
  name = "student" if config.ablation.get("student") else "base model"
  return f"{name} + own data" if config.ablation.get("student_data") else name


_STUDENT_ORDER_SALT = 7301


def student_data(config: Any, seed_dir: str) -> list[dict]:
  """The student's own instruction data for the seed of `config` (already seeded): built by the source
  `ablation.student_data` names (and written to `seed_dir/student_data.jsonl`), or read from the
  records file it names; [] without it."""
  data = config.ablation.get("student_data", "")
  if not data:
    return []
  source = registry.SOURCES.get(data)
  if source is not None and source.instruction_data is not None:
    records = source.instruction_data(config)
    path = os.path.join(seed_dir, "student_data.jsonl")
    os.makedirs(seed_dir, exist_ok=True)
    runtime.get().lead_writes("ablation:student_data", lambda: write_jsonl(path, records))
    return records
  records, _ = read_records(data)
  return records


def student_part(own: Sequence[dict], count: int, seed: int) -> list[dict]:
  """The first `count` records of the seeded order of the student's data `own` (a permutation that
  depends on `seed` alone: the parts of one seed are prefixes of one another)."""
  if count > len(own):
    raise BadInput(f"ablation: the student's data holds {len(own)} records, the mix needs {count} "
                   "(lower ablation.student_data_share or give more records)")
  order = np.random.default_rng([seed, _STUDENT_ORDER_SALT]).permutation(len(own))
  return [own[int(i)] for i in order[:count]]


def _write_records(directory: str, records: Sequence[dict], barrier: str) -> str:
  """`directory/records.jsonl`: the QA fields of `records`, the VLIT data of a sub-run; written once by
  the lead process (kept on a rerun), every process meeting at `barrier`. Returns the path."""
  os.makedirs(directory, exist_ok=True)
  data = os.path.join(directory, "records.jsonl")

  def write() -> None:
    if not os.path.exists(data):
      write_jsonl(data, [{k: r[k] for k in ("id", "image", "question", "answer")} for r in records])

  runtime.get().lead_writes(barrier, write)
  return data


def instruct_student(config: Any, seed_dir: str, own: Sequence[dict]) -> str:
  """The student instruction-tuned on all of its own data `own` (VLIT, `ablation.student_steps` at
  `ablation.student_learning_rate`) in `seed_dir/student/`; returns the tuned model's directory, from
  which the seed's fine-tunes start. A rerun in the same workdir finds it done."""
  from c3l_jax import pipeline

  out = os.path.join(seed_dir, "student")
  data = _write_records(out, own, "ablation:student_records")
  steps = config.ablation.student_steps
  cfg = derive(config, {
      "model.checkpoint": config.ablation.get("student") or config.model.checkpoint,
      "stages": "train", "train.objective": "vlit", "data.records": data, "train.steps": steps,
      "train.learning_rate": config.ablation.student_learning_rate, "train.checkpoint_every": steps})
  with console.captured_stdout("ablation student instruction tuning"):
    metrics = pipeline.run_stages(cfg, out, ("train",))
  release("student instruction tuning")
  console.say(f"ablation: the student instruction-tuned on its {len(own)} own records for {steps} steps "
              f"(loss {metrics['train'].get('first_loss') or float('nan'):.3f} -> "
              f"{metrics['train'].get('last_loss') or float('nan'):.3f})")
  return os.path.join(out, "train", "generator")


def mix(generated: Sequence[dict], own: Sequence[dict], share: float, seed: int) -> list[dict]:
  """A fine-tune's records: the `generated` ones, then `student_count(len(generated), share)` of the
  student's own (`student_part`), so that they are `share` of the whole."""
  return list(generated) + student_part(own, student_count(len(generated), share), seed)


def _memory_maps() -> int | None:
  """The process's memory-map count (Linux; None elsewhere)."""
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:
    return None


def _map_limit() -> int | None:
  """The kernel's per-process limit on memory maps (`vm.max_map_count`; None where there is none)."""
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      return int(f.read())
  except (OSError, ValueError):
    return None


def release(label: str, fraction: float = 0.5) -> bool:
  """Frees compiled programs once the process holds more than `fraction` of the memory maps it may.

  XLA's CPU JIT maps each compiled executable's code into the process and the jit caches keep every
  sub-run's executables alive (each row trains a new model: new programs); the 3-seed ablation went past
  the kernel's `vm.max_map_count` (65530 by default) in its third seed and LLVM failed with "Cannot
  allocate memory". Clearing the caches after every sub-run costs recompiling the programs rows do
  share (generation, eval: 60 % more wall time on the test's run), so it happens only when needed.
  Returns whether it cleared.
  """
  maps, limit = _memory_maps(), _map_limit()
  if maps is None or limit is None or maps <= fraction * limit:
    logging.info("ablation %s: %s memory maps (limit %s)", label, maps, limit)
    return False
  jax.clear_caches()
  gc.collect()
  logging.info("ablation %s: %d memory maps of %d allowed, %s after clearing the jit caches", label, maps,
               limit, _memory_maps())
  return True


def _downstream(config: Any, row_dir: str, records: list[dict], name: str) -> dict:
  """VLIT fine-tune of the student on `records` (a row's data, with the student's own mixed in when
  there is any), then eval (`ablation.benchmarks`); with no records, the student's own eval. Returns
  the eval's table columns (`_summary`)."""
  from c3l_jax import pipeline

  down = os.path.join(row_dir, "downstream")
  data = _write_records(down, records, "ablation:records")
  student = config.ablation.get("student") or config.model.checkpoint
  config = derive(config, {"model.checkpoint": student})
  if records:
    stages = ("train", "eval")
    cfg = derive(config, {
        "stages": "train,eval", "train.objective": "vlit", "data.records": data,
        "train.steps": config.ablation.vlit_steps, "train.learning_rate": config.ablation.vlit_learning_rate,
        "train.checkpoint_every": config.ablation.vlit_steps, "eval.checkpoint": "",
        "eval.benchmarks": config.ablation.benchmarks})
  else:
    stages = ("eval",)
    cfg = derive(config, {"stages": "eval", "eval.benchmarks": config.ablation.benchmarks})
  # The sub-run's stage lines and eval tables go to the log; the console gets one line per model.
  with console.captured_stdout(f"ablation {name}"):
    metrics = pipeline.run_stages(cfg, down, stages)
  release(f"{name} model")
  summary = _summary(metrics["eval"])
  console.say(f"ablation {name} model: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()
                                                     if k in COLUMNS and isinstance(v, float)))
  return summary


def _summary(eval_metrics: dict) -> dict:
  """The table's model columns: POPE's mean accuracy / F1 / yes-ratio and the registered benchmarks'
  summaries (the scenes world's `vqa_acc`)."""
  out = {}
  pope = eval_metrics.get("pope")
  if pope:
    out.update(pope_acc=pope.get("mean_accuracy"), pope_f1=pope.get("mean_f1"),
               pope_yes=pope.get("mean_yes_ratio"))
    for split in POPE_SPLITS:
      if isinstance(pope.get(split), dict):
        out[f"pope_{split}_acc"] = pope[split].get("accuracy")
        out[f"pope_{split}_f1"] = pope[split].get("f1")
        out[f"pope_{split}_yes"] = pope[split].get("yes_ratio")
  for name, bench in registry.BENCHMARKS.items():
    if bench.summary is not None and eval_metrics.get(name):
      out.update(bench.summary(eval_metrics[name]))
  return out


COLUMNS = ("instances", "relevance", "accuracy", "hallucination", "vqa_acc", "pope_acc", "pope_f1",
           "pope_yes")
SPLIT_COLUMNS = tuple(f"pope_{s}_{m}" for s in POPE_SPLITS for m in ("acc", "f1", "yes"))


def aggregate(per_seed: Sequence[dict[str, dict]]) -> tuple[dict[str, dict], dict[str, dict]]:
  """(means, half-widths): per row and metric, over the seeds' results (`mean_interval`)."""
  means: dict[str, dict] = {}
  widths: dict[str, dict] = {}
  for name in per_seed[0]:
    metrics = sorted({m for results in per_seed for m in results.get(name, {})})
    for m in metrics:
      mean, width = mean_interval([results.get(name, {}).get(m) for results in per_seed])
      means.setdefault(name, {})[m] = mean
      widths.setdefault(name, {})[m] = width
  return means, widths


def _cell(mean: float | None, width: float | None, integer: bool = False) -> str:
  if mean is None:
    return "-"
  text = f"{mean:.0f}" if integer else f"{mean:.3f}"
  return text if width is None else f"{text}±{width:.0f}" if integer else f"{text}±{width:.3f}"


def table(means: dict[str, dict], widths: dict[str, dict] | None = None, seeds: int = 1) -> str:
  """The printed Table 4: data quality and the fine-tuned models' scores (mean±95 % half-width over
  `seeds`), then POPE per split."""
  widths = widths or {}

  def cells(name: str, cols: Sequence[str]) -> str:
    return " ".join(f"{_cell(means[name].get(c), widths.get(name, {}).get(c), c == 'instances'):>13s}"
                    for c in cols)

  title = f"mean±95 % interval over {seeds} seeds" if seeds > 1 else "one seed"
  w = max([18, *(len(name) for name in means)])  # the row names' column
  lines = [f"Table 4 ({title}):", f"{'row':{w}s} " + " ".join(f"{c:>13s}" for c in COLUMNS)]
  lines += [f"{name:{w}s} {cells(name, COLUMNS)}" for name in means]
  if any(c in r for r in means.values() for c in SPLIT_COLUMNS):
    short = {"random": "rand", "popular": "pop", "adversarial": "adv"}
    heads = (f"{short.get(s, s)} {m}" for s in POPE_SPLITS for m in ("acc", "F1", "yes"))
    lines += ["", "POPE per split:", f"{'row':{w}s} " + " ".join(f"{h:>13s}" for h in heads)]
    lines += [f"{name:{w}s} {cells(name, SPLIT_COLUMNS)}" for name in means]
  return "\n".join(lines)


def run_seed(config: Any, workdir: str, k: int) -> dict[str, dict]:
  """Every row's metrics for seed k (see the module docstring for the layout)."""
  from c3l_jax import pipeline

  seed_dir = os.path.join(workdir, "ablation", f"seed{k}")
  cfg = seeded(config, k)
  ref = reference_row(config)
  own = student_data(cfg, seed_dir)  # first: a mix it cannot make fails before any model work
  share = config.ablation.get("student_data_share", 0.0)
  reference: list[dict] = []
  if own:  # the student fine-tuned on its own part alone (that of generation.num_final records)
    reference = student_part(own, student_count(cfg.generation.num_final, share), cfg.seed)
  if own and config.ablation.get("student_steps", 0):
    # The paper's student already follows instructions: tuned on its own data first, once per seed.
    cfg = derive(cfg, {"ablation.student": instruct_student(cfg, seed_dir, own)})
  if k == 0:
    missing = [s for s in SHARED if not common.stage_done(workdir, s)]
    if missing:
      pipeline.run_stages(derive(config, {"stages": ",".join(missing)}), workdir, missing)
    _link(workdir, seed_dir, {s: s for s in SHARED})
  else:
    pipeline.run_stages(derive(cfg, {"stages": ",".join(SHARED)}), seed_dir, SHARED)
  release(f"seed {k} shared stages")
  results: dict[str, dict] = {}
  if own:
    console.say(f"ablation seed {k} {ref}: {len(reference)} of the student's {len(own)} own records")
  results[ref] = _downstream(cfg, os.path.join(seed_dir, "base"), reference, f"seed {k} {ref}")
  if own:
    results[ref]["student_records"] = len(reference)
  for name, row in all_rows(config).items():
    row_dir = os.path.join(seed_dir, row.dirname)
    _link(seed_dir, row_dir, row.links)
    # Each sub-run's config names its own stages: a stage's input must come from this job's stages.
    with console.captured_stdout(f"ablation seed {k} {name}"):  # stage lines and tables: to the log
      metrics = pipeline.run_stages(derive(cfg, {**row.overrides, "stages": ",".join(row.stages)}),
                                    row_dir, row.stages)
    release(f"seed {k} {name} data")
    rows = shards.read_parts(os.path.join(row_dir, "final", "filtered"))
    result = {"instances": len(rows)}
    quality = metrics["export"].get("quality", {}).get("final")
    if quality:
      result.update({m: quality.get(m) for m in ("relevance", "accuracy", "hallucination", "mean_i2c")})
    console.say(f"ablation seed {k} {name} data: " + ", ".join(
        f"{m} {v:.3f}" if isinstance(v, float) else f"{m} {v}" for m, v in result.items()))
    records = mix(rows, own, share, cfg.seed) if own else rows
    if own:
      result["student_records"] = len(records) - len(rows)
    result.update(_downstream(cfg, row_dir, records, f"seed {k} {name}"))
    results[name] = result
  return results


def run(config: Any, workdir: str) -> dict:
  seeds = config.ablation.seeds
  per_seed = [run_seed(config, workdir, k) for k in range(seeds)]
  means, widths = aggregate(per_seed)
  text = table(means, widths, seeds)
  if runtime.get().is_lead:
    write_text_atomic(os.path.join(workdir, "ablation", "table.txt"), text + "\n")
    print(text, flush=True)
  return {"seeds": seeds, "rows": means, "ci95": widths, "per_seed": per_seed}


__all__ = ["ROWS", "Row", "VARIANTS", "aggregate", "all_rows", "derive", "first_stage", "mean_interval",
           "instruct_student", "mix", "reading_row", "reference_row", "run", "seeded", "student_data",
           "student_part", "table", "variant_rows"]
