"""What the content-relevance selection picks: the composition of the top fraction by S(I2C).

Eq. 1 of the paper sums the per-token terms over the answer, so long answers have large |S(I2C)| and can
fill the top fraction on length alone. `selection_composition` compares three sets of scored records:

  all               every scored record
  top_sum           the top `fraction` by S(I2C) as the paper defines it (the select stage's default)
  top_length_norm   the top `fraction` by S(I2C) / answer tokens (`scoring.length_norm = True`)

and gives for each: its size, the share of each instruction type, mean answer length (words and scored
tokens) and, when the data source can judge records against ground truth (a registered source's
`verdicts`, e.g. the scenes world's checker), the share that is image-dependent, correct (of the
image-dependent records whose correctness can be decided) and hallucinating. Both rankings come from the
same scored records: the length-normalised score is `i2c / n_tokens`, exactly what the score stage
writes with `scoring.length_norm = True` (`c3l_jax.scoring`).
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from c3l_jax.pipeline.select import select_top

SETS = ("all", "top_sum", "top_length_norm")


def length_normalised(row: dict) -> float:
  """S(I2C) / answer tokens, as `scoring.length_norm = True` writes it."""
  return float(row["i2c"]) / max(int(row["n_tokens"]), 1)


def composition(rows: Sequence[dict], verdicts: Sequence[dict] | None = None) -> dict:
  """Size, instruction-type shares, answer lengths and (with `verdicts`) ground-truth shares of `rows`.

  `verdicts[i]` judges `rows[i]`: `image_dependent` (bool), `correct` (bool or None: undecided),
  `hallucinated` (bool).
  """
  n = len(rows)
  out: dict = {"n": n}
  if not n:
    return out
  types = collections.Counter(r.get("instruction_type", "unknown") for r in rows)
  out["instruction_types"] = {t: types[t] / n for t in sorted(types)}
  out["avg_answer_words"] = float(np.mean([len(r["answer"].split()) for r in rows]))
  tokens = [r["n_tokens"] for r in rows if isinstance(r.get("n_tokens"), int)]
  out["avg_answer_tokens"] = float(np.mean(tokens)) if tokens else None
  if verdicts is not None:
    dependent = [bool(v["image_dependent"]) for v in verdicts]
    decided = [v["correct"] for v in verdicts if v["image_dependent"] and v["correct"] is not None]
    out["image_dependent"] = float(np.mean(dependent))
    out["correct"] = float(np.mean(decided)) if decided else None
    out["hallucinated"] = float(np.mean([bool(v["hallucinated"]) for v in verdicts]))
  return out


def selection_composition(rows: Sequence[dict], fraction: float,
                          verdicts: Sequence[dict] | None = None) -> dict:
  """`composition` of all scored `rows` and of the top `fraction` by S(I2C), summed and length-normalised.

  Rows without a numeric `i2c` and `n_tokens` are left out (they cannot be ranked).
  """
  keep = [i for i, r in enumerate(rows)
          if isinstance(r.get("i2c"), (int, float)) and isinstance(r.get("n_tokens"), int)]
  scored = [rows[i] for i in keep]
  judged = [verdicts[i] for i in keep] if verdicts is not None else None
  normalised = [{"i2c": length_normalised(r)} for r in scored]
  picks = {"all": list(range(len(scored))), "top_sum": select_top(scored, fraction),
           "top_length_norm": select_top(normalised, fraction)}
  return {name: composition([scored[i] for i in idx],
                            [judged[i] for i in idx] if judged is not None else None)
          for name, idx in picks.items()}


def composition_table(comp: dict) -> tuple[list[str], list[list]]:
  """`comp` (from `selection_composition`) as (header, rows): one row per measure, one column per set."""
  types = sorted({t for c in comp.values() for t in c.get("instruction_types", {})})
  measures = (["n"] + [f"type: {t}" for t in types] + ["avg_answer_words", "avg_answer_tokens"]
              + [m for m in ("image_dependent", "correct", "hallucinated") if m in comp.get("all", {})])
  rows = []
  for m in measures:
    cells = []
    for name in SETS:
      c = comp.get(name, {})
      cells.append(c.get("instruction_types", {}).get(m[6:], 0.0 if c.get("n") else None)
                   if m.startswith("type: ") else c.get(m))
    rows.append([m, *cells])
  return ["measure", *SETS], rows


__all__ = ["SETS", "composition", "composition_table", "length_normalised", "selection_composition"]
