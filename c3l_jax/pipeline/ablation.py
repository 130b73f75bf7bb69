"""The `ablation` stage: the paper's Table 4 on the configured world (C3L Sec. 4.3).

Four ways to make the final data, each followed by the paper's protocol — fine-tune a fresh copy of the
base model on that data (VLIT) and evaluate it:

  filtering        the base generator's data, basic filtering only (no generator training)
  + CLM            generator trained with CE + the contrastive loss, but samples picked at random
                   (`select.method=random`: no content relevance)
  + CRM            generator trained with CE on the top S(I2C) fraction, no contrastive loss
  + CRM + CLM      C3L: CE on the top S(I2C) fraction + the contrastive loss on I2C roles

The rows share this workdir's `initial`, `filter` and `score` outputs (run first if missing) and live
under `WORKDIR/ablation/<row>/` (the generator's stages, then `downstream/` with the VLIT fine-tune and
its `eval`). The base model itself is evaluated too, as a reference. Metrics per row: the data's size
and, where the source has ground truth, its quality (e.g. the scenes world's checker); POPE (random /
popular / adversarial) and the columns of registered benchmarks (e.g. the scenes world's held-out VQA
accuracy, `vqa_acc`) of the fine-tuned model. A table is printed at the end.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from absl import logging

from c3l_jax import registry, runtime
from c3l_jax.data.records import write_jsonl
from c3l_jax.eval.pope import SPLITS as POPE_SPLITS
from c3l_jax.eval.table import format_cell
from c3l_jax.pipeline import common, shards

# row name -> (its directory under WORKDIR/ablation, generator stages, config overrides)
ROWS: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    "filtering": ("filtering", ("final", "export"), {}),
    "+CLM": ("clm", ("select", "train", "final", "export"), {"select.method": "random"}),
    "+CRM": ("crm", ("select", "train", "final", "export"), {"train.contrastive_weight": 0.0}),
    "+CRM+CLM": ("crm_clm", ("select", "train", "final", "export"), {}),
}
SHARED = ("initial", "filter", "score")


def derive(config: Any, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-path overrides (locked again)."""
  out = ml_collections.ConfigDict(config.to_dict())
  for path, value in overrides.items():
    section, key = path.rsplit(".", 1)
    node = out
    for part in section.split("."):
      node = node[part]
    node[key] = value
  out.lock()
  return out


def _link_shared(workdir: str, row_dir: str) -> None:
  os.makedirs(row_dir, exist_ok=True)
  for stage in SHARED:
    link = os.path.join(row_dir, stage)
    if not os.path.lexists(link):
      os.symlink(os.path.relpath(os.path.join(workdir, stage), row_dir), link)


def _downstream(config: Any, row_dir: str, records: list[dict], name: str) -> dict:
  """VLIT fine-tune of the base model on `records`, then eval (`ablation.benchmarks`)."""
  from c3l_jax import pipeline

  down = os.path.join(row_dir, "downstream")
  os.makedirs(down, exist_ok=True)
  data = os.path.join(down, "records.jsonl")
  if not os.path.exists(data):
    write_jsonl(data, [{k: r[k] for k in ("id", "image", "question", "answer")} for r in records])
  cfg = derive(config, {
      "train.objective": "vlit", "data.records": data, "train.steps": config.ablation.vlit_steps,
      "train.learning_rate": config.ablation.vlit_learning_rate,
      "train.checkpoint_every": config.ablation.vlit_steps, "eval.checkpoint": "",
      "eval.benchmarks": config.ablation.benchmarks})
  stages = ("train", "eval") if records else ("eval",)
  metrics = pipeline.run_stages(cfg if records else derive(config, {
      "eval.benchmarks": config.ablation.benchmarks}), down, stages)
  logging.info("ablation %s: downstream done", name)
  return metrics["eval"]


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
  for name, bench in registry.BENCHMARKS.items():
    if bench.summary is not None and eval_metrics.get(name):
      out.update(bench.summary(eval_metrics[name]))
  return out


def table(results: dict[str, dict]) -> str:
  """The printed Table 4: data quality and the fine-tuned models' scores, then POPE per split."""
  cols = ("instances", "relevance", "accuracy", "hallucination", "vqa_acc", "pope_acc", "pope_f1",
          "pope_yes")
  lines = [f"{'row':12s} " + " ".join(f"{c:>13s}" for c in cols)]
  for name, r in results.items():
    lines.append(f"{name:12s} " + " ".join(f"{format_cell(r.get(c)):>13s}" for c in cols))
  if any(f"pope_{s}_acc" in r for r in results.values() for s in POPE_SPLITS):
    lines += ["", "POPE per split, accuracy / F1:",
              f"{'row':12s} " + " ".join(f"{s:>13s}" for s in POPE_SPLITS)]
    for name, r in results.items():
      cells = (f"{format_cell(r.get(f'pope_{s}_acc'))}/{format_cell(r.get(f'pope_{s}_f1'))}" for s in POPE_SPLITS)
      lines.append(f"{name:12s} " + " ".join(f"{c:>13s}" for c in cells))
  return "\n".join(lines)


def run(config: Any, workdir: str) -> dict:
  from c3l_jax import pipeline

  missing = [s for s in SHARED if not common.stage_done(workdir, s)]
  if missing:
    pipeline.run_stages(config, workdir, missing)
  results: dict[str, dict] = {}
  base_eval = _downstream(config, os.path.join(workdir, "ablation", "base"), [], "base")
  results["base model"] = _summary(base_eval)
  for name, (dirname, stages, overrides) in ROWS.items():
    row_dir = os.path.join(workdir, "ablation", dirname)
    _link_shared(workdir, row_dir)
    metrics = pipeline.run_stages(derive(config, overrides), row_dir, stages)
    rows = shards.read_parts(os.path.join(row_dir, "final", "filtered"))
    result = {"instances": len(rows)}
    quality = metrics["export"].get("quality", {}).get("final")
    if quality:
      result.update({k: quality.get(k) for k in ("relevance", "accuracy", "hallucination",
                                                 "mean_i2c")})
    result.update(_summary(_downstream(config, row_dir, rows, name)))
    results[name] = result
  text = table(results)
  if runtime.get().is_lead:
    with open(os.path.join(workdir, "ablation", "table.txt"), "w") as f:
      f.write(text + "\n")
    print(text, flush=True)
  return {"rows": results}


__all__ = ["ROWS", "derive", "run", "table"]
