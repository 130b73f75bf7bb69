"""The eval stage's printed summary: a row like the C3L paper's Table 1 (SEED, LLaVA^W, MMB, POPE), the
details behind it, and the Table-2 statistics of the generated dataset when the workdir has them.

Table 1's columns: SEED = accuracy (%) over SEED-Bench's image questions; LLaVA^W = the GPT-4 judge's
relative score (not computed here: "judge" when the answers file was written); MMB = MMBench dev
CircularEval accuracy (%); POPE = F1 (%) averaged over the random / popular / adversarial splits (the
convention of LLaVA-1.5's and the C3L paper's POPE column).
"""

from __future__ import annotations

from typing import Any

COLUMNS = ("SEED", "LLaVA^W", "MMB", "POPE")


def format_cell(value: Any) -> str:
  """A number in a printed table: "-" for None, ints as they are, floats to 3 decimals."""
  if value is None:
    return "-"
  return f"{value:d}" if isinstance(value, int) else f"{value:.3f}"


def table_row(metrics: dict[str, Any]) -> dict[str, str]:
  """The Table-1 cells (strings; "-" = not evaluated) from the eval stage's metrics."""
  row = {c: "-" for c in COLUMNS}
  if "seed" in metrics:
    row["SEED"] = f"{metrics['seed']['overall']:.1f}"
  if "llava_bench" in metrics:
    row["LLaVA^W"] = "judge"
  if "mmbench" in metrics:
    row["MMB"] = f"{metrics['mmbench']['overall']:.1f}"
  if "pope" in metrics:
    row["POPE"] = f"{100 * metrics['pope']['mean_f1']:.1f}"
  return row


def format_table(name: str, metrics: dict[str, Any], stats: dict[str, Any] | None = None) -> str:
  """Table 1's row for `name`, then per-benchmark details (and Table 2's row when `stats` is given)."""
  row = table_row(metrics)
  width = max(len("Method"), len(name))
  lines = [f"{'Method':<{width}}  " + "  ".join(f"{c:>7}" for c in COLUMNS),
           f"{name:<{width}}  " + "  ".join(f"{row[c]:>7}" for c in COLUMNS)]
  if "pope" in metrics:
    lines += ["", "POPE        accuracy  precision  recall     F1  yes-ratio      n"]
    for split in ("random", "popular", "adversarial"):
      if split in metrics["pope"]:
        m = metrics["pope"][split]
        lines.append(f"{split:<11} {100 * m['accuracy']:8.1f}  {100 * m['precision']:9.1f}  "
                     f"{100 * m['recall']:6.1f}  {100 * m['f1']:5.1f}  {100 * m['yes_ratio']:9.1f}  "
                     f"{m['n']:5d}")
  for key, title in (("seed", "SEED-Bench (image)"), ("mmbench", "MMBench dev (CircularEval)")):
    if key in metrics:
      m = metrics[key]
      lines += ["", f"{title}: {m['overall']:.1f} over {m['n']} questions ({m.get('mode', '')})"]
      lines += [f"  {task:<32} {acc:5.1f}" for task, acc in m["per_task"].items()]
  if "llava_bench" in metrics:
    m = metrics["llava_bench"]
    lines += ["", f"LLaVA-Bench (In-the-Wild): {m['n']} answers in {m['answers']} "
                  "(score with the GPT-4 judge, README 'Evaluation')"]
  if stats:
    lines += ["", "Dataset (Table 2)  Instances  Avg. Q len  Avg. A len",
              f"{'generated':<17}  {stats.get('instances', 0):>9}  "
              f"{stats.get('avg_question_words', 0.0):>10.1f}  {stats.get('avg_answer_words', 0.0):>10.1f}"]
  return "\n".join(lines) + "\n"


__all__ = ["COLUMNS", "format_cell", "format_table", "table_row"]
