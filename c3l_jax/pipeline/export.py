"""The `export` stage: the generated dataset in LLaVA's instruction-tuning format, and its statistics.

Reads the final data (`WORKDIR/final/filtered`; the filtered initial data `WORKDIR/filter` when the final
stage has not run) and writes
  WORKDIR/export/c3l_vlit.json  [{"id", "image", "conversations": [{"from": "human", "value":
                                "<image>\\n{question}"}, {"from": "gpt", "value": "{answer}"}]}, ...]
  WORKDIR/export/stats.json     Table-2 statistics: instances, images, average question / answer length
                                in words (whitespace-separated, as the paper counts), per-type counts.
  WORKDIR/report.html           counts, S(I2C) histogram, best / worst scored samples with their images
                                (`c3l_jax.eval.report`); when the data source has ground truth (a
                                registered source with a `quality` check, e.g. the scenes world) also
                                the quality of the initial and the final data, printed as a table too,
                                and (with its `verdicts`) each sample's verdict and the histogram split
                                into image-dependent and generic QA.
The metrics also hold `selection`: what the top `select.top_fraction` by S(I2C) is made of, summed (the
paper's eq. 1) and length-normalised (`c3l_jax.eval.selection`).
Both are deterministic functions of the input records (no timestamps), so an interrupted and resumed
run exports the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Sequence

from etils import epath

from c3l_jax import registry, runtime
from c3l_jax.data.records import BadInput, write_text_atomic
from c3l_jax.data.sources import open_source, source_kind
from c3l_jax.eval.selection import selection_composition
from c3l_jax.eval.table import format_cell
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


def _dump(path: epath.Path, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def run(config: Any, workdir: str) -> dict:
  if common.stage_done(workdir, "final"):
    rows, where = shards.read_parts(os.path.join(workdir, "final", "filtered")), "final"
  elif common.stage_done(workdir, "filter"):
    rows, where = shards.read_parts(os.path.join(workdir, "filter")), "filter"
  else:
    raise BadInput("the export stage needs the final (or filter) stage's output in this workdir")
  out_dir = epath.Path(workdir) / "export"
  out_dir.mkdir(parents=True, exist_ok=True)
  llava = to_llava(rows)
  stats = statistics(llava)
  stats["instruction_types"] = dict(sorted(collections.Counter(
      r.get("instruction_type", "unknown") for r in rows).items()))
  stats["source"] = where
  rt = runtime.get()
  if rt.is_lead:
    _dump(out_dir / "c3l_vlit.json", llava)
    _dump(out_dir / "stats.json", stats)
  rt.barrier("export:written")
  metrics = {"read": len(rows), "written": len(llava), "rejected": 0, **stats}
  plugin = registry.SOURCES.get(source_kind(config))
  scored = shards.read_parts(os.path.join(workdir, "score")) if common.stage_done(workdir, "score") \
      else []
  source, verdicts = open_source(config), None
  if plugin is not None and plugin.quality is not None:
    metrics["quality"] = {"initial": plugin.quality(config, source, scored),
                          "final": plugin.quality(config, source, rows if where == "final" else [])}
  if plugin is not None and plugin.verdicts is not None and scored:
    verdicts = plugin.verdicts(config, source, scored)
  if scored:
    metrics["selection"] = selection_composition(scored, config.select.top_fraction, verdicts)
  if rt.is_lead:
    write_report(config, workdir, metrics, source, scored, verdicts)
  return metrics


def write_report(config: Any, workdir: str, export_metrics: dict, source: Any, scored: Sequence[dict],
                 verdicts: Sequence[dict] | None) -> None:
  """WORKDIR/report.html from the metrics so far and the scored initial data (with its verdicts)."""
  from c3l_jax.eval.report import build_report

  path = epath.Path(workdir) / "metrics.json"
  metrics = json.loads(path.read_text()) if path.exists() else {}
  metrics["export"] = export_metrics
  text = build_report(metrics, scored, source.load, export_metrics.get("quality"),
                      verdicts=verdicts, selection=export_metrics.get("selection"),
                      top_fraction=config.select.top_fraction)
  write_text_atomic(epath.Path(workdir) / "report.html", text)


def quality_title(config: Any) -> str:
  """The line above `quality_table`: the registered source's title."""
  plugin = registry.SOURCES.get(source_kind(config))
  title = plugin.quality_title if plugin is not None else ""
  return title or "Generated data, checked against ground truth:"


def quality_table(quality: dict) -> str:
  """The demo's summary: initial vs final data, one metric per line."""
  names = ("instances", "relevance", "accuracy", "hallucination", "avg_question_words",
           "avg_answer_words", "mean_i2c", "i2c_auc")
  lines = [f"{'':20s} {'initial':>10s} {'final':>10s}"]
  for name in names:
    lines.append(f"{name:20s} {format_cell(quality['initial'].get(name)):>10s} "
                 f"{format_cell(quality['final'].get(name)):>10s}")
  return "\n".join(lines)


__all__ = ["run", "statistics", "to_llava"]
