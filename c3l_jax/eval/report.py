"""`WORKDIR/report.html`: one self-contained page (images inlined as data URIs, no scripts, no network).

Sections: the run's per-stage counts, the initial-vs-final data quality (when ground truth exists), an
S(I2C) histogram of the scored initial data (inline SVG; split into image-dependent and generic QA when
the source can judge samples), what the top fraction by S(I2C) is made of (summed and length-normalised,
`c3l_jax.eval.selection`), and the best and worst scored samples with their images and verdicts, so a
reader sees what the content-relevance score rewards and what it rejects.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Callable, Sequence

import numpy as np

from c3l_jax.eval.selection import composition_table

THUMB = 96  # px, the longer side of an inlined image


def _img_uri(image) -> str:
  image = image.copy()
  image.thumbnail((THUMB, THUMB))
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def histogram_svg(values: Sequence[float], bins: int = 30, width: int = 600, height: int = 180,
                  split: Sequence[bool] | None = None,
                  split_names: tuple[str, str] = ("image-dependent", "generic")) -> str:
  """An inline SVG bar chart of `values` with labelled x-axis ends.

  With `split` (one bool per value), each bar is stacked: the values with `split` true at the bottom in
  blue, the others above in orange, over the same bins, with a legend naming `split_names`.
  """
  if not values:
    return "<p>no scored samples</p>"
  values = np.asarray(values, np.float64)
  edges = np.histogram_bin_edges(values, bins=bins)
  groups = [np.ones(len(values), bool)] if split is None else [np.asarray(split, bool),
                                                              ~np.asarray(split, bool)]
  counts = [np.histogram(values[g], bins=edges)[0] for g in groups]
  colours = ("#4a7bd0", "#e0a040")
  top = max(int(sum(counts).max()), 1)
  bar_w = width / bins
  bars = []
  for i in range(bins):
    base = 0.0
    for g, c in enumerate(counts):
      if not c[i]:
        continue
      h = (height - 30) * c[i] / top
      label = f"{split_names[g]}: " if split is not None else ""
      bars.append(f'<rect x="{i * bar_w:.1f}" y="{height - 20 - base - h:.1f}" width="{bar_w - 1:.1f}" '
                  f'height="{h:.1f}" fill="{colours[g]}"><title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): '
                  f'{label}{int(c[i])}</title></rect>')
      base += h
  labels = (f'<text x="0" y="{height - 4}" font-size="11">{edges[0]:.3g}</text>'
            f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{edges[-1]:.3g}</text>'
            f'<text x="{width / 2}" y="{height - 4}" font-size="11" text-anchor="middle">S(I2C)</text>'
            f'<text x="2" y="12" font-size="11">max count {top}</text>')
  if split is not None:
    labels += "".join(
        f'<rect x="{width - 150}" y="{4 + 14 * g}" width="10" height="10" fill="{colours[g]}"/>'
        f'<text x="{width - 136}" y="{13 + 14 * g}" font-size="11">{split_names[g]} '
        f'({int(counts[g].sum())})</text>' for g in range(2))
  return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
          f'role="img" aria-label="S(I2C) histogram">{"".join(bars)}{labels}</svg>')


def verdict_text(verdict: dict) -> str:
  """One line for a sample's ground-truth verdict, e.g. "image-dependent, wrong, hallucinates"."""
  parts = ["image-dependent" if verdict["image_dependent"] else "generic"]
  if verdict.get("correct") is not None:
    parts.append("correct" if verdict["correct"] else "wrong")
  if verdict.get("hallucinated"):
    parts.append("hallucinates")
  return ", ".join(parts)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
  def cell(v):
    if isinstance(v, float):
      return "-" if math.isnan(v) else f"{v:.3f}"
    return html.escape("-" if v is None else str(v))
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
  return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _samples(rows: Sequence[dict], load: Callable[[str], Any], title: str,
             verdicts: Sequence[dict | None]) -> str:
  cards = []
  for r, verdict in zip(rows, verdicts):
    try:
      img = f'<img src="{_img_uri(load(r["image"]))}" alt="{html.escape(r["image"])}">'
    except Exception as e:  # noqa: BLE001 — a report must render even when an image went missing
      img = f"<p>(image unavailable: {html.escape(str(e))})</p>"
    cards.append(f'<div class="card">{img}<p><b>S(I2C) = {r["i2c"]:.4f}</b></p>'
                 f'<p><b>Q:</b> {html.escape(r["question"])}</p>'
                 f'<p><b>A:</b> {html.escape(r["answer"])}</p>'
                 + (f'<p class="verdict"><b>checked:</b> {html.escape(verdict_text(verdict))}</p>'
                    if verdict is not None else "") + '</div>')
  return f"<h3>{html.escape(title)}</h3><div class='cards'>{''.join(cards)}</div>"


def build_report(metrics: dict, scored: Sequence[dict], load: Callable[[str], Any],
                 quality: dict | None = None, examples: int = 6,
                 verdicts: Sequence[dict] | None = None, selection: dict | None = None,
                 top_fraction: float = 0.1) -> str:
  """The report's HTML text (see the module docstring). `verdicts[i]` judges `scored[i]` (a registered
  source's `verdicts`); `selection` is `c3l_jax.eval.selection.selection_composition` of `scored`."""
  counts = [(stage, m.get("read"), m.get("written"), m.get("rejected"))
            for stage, m in metrics.items() if isinstance(m, dict)]
  parts = ["<h2>Stages</h2>", _table(counts, ("stage", "read", "written", "rejected"))]
  if quality:
    names = sorted({k for q in quality.values() for k in q})
    parts += ["<h2>Initial vs final data</h2>",
              _table([(n, quality["initial"].get(n), quality["final"].get(n)) for n in names],
                     ("metric", "initial", "final"))]
  index = [i for i, r in enumerate(scored) if isinstance(r.get("i2c"), (int, float))]
  values = [scored[i]["i2c"] for i in index]
  split = [bool(verdicts[i]["image_dependent"]) for i in index] if verdicts is not None else None
  parts += [f"<h2>S(I2C) of the initial data ({len(values)} samples)</h2>",
            histogram_svg(values, split=split)]
  if selection:
    header, rows = composition_table(selection)
    parts += [f"<h2>What the top {top_fraction:.0%} by S(I2C) is made of</h2>",
              "<p>top_sum ranks by S(I2C) as eq. 1 defines it (a sum over answer tokens); "
              "top_length_norm by S(I2C) / answer tokens (<code>scoring.length_norm</code>). "
              "Type rows and image_dependent / hallucinated are shares of the set; correct is the "
              "share of its decidable image-dependent samples.</p>", _table(rows, header)]
  ranked = sorted(index, key=lambda i: -scored[i]["i2c"])
  if ranked:
    verdict_of = (lambda idx: [verdicts[i] for i in idx]) if verdicts is not None else \
        (lambda idx: [None] * len(idx))
    best, worst = ranked[:examples], ranked[::-1][:examples]
    parts.append(_samples([scored[i] for i in best], load,
                          f"Best {len(best)} by S(I2C)", verdict_of(best)))
    parts.append(_samples([scored[i] for i in worst], load,
                          f"Worst {len(worst)} by S(I2C)", verdict_of(worst)))
  style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
           ".cards{display:flex;flex-wrap:wrap;gap:12px}.card{width:220px;border:1px solid #ddd;"
           "padding:6px;font-size:13px}img{image-rendering:pixelated;width:96px}")
  return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>C3L run report</title>"
          f"<style>{style}</style></head><body><h1>C3L run report</h1>{''.join(parts)}</body></html>\n")


def _conversation_card(row: dict, entry: Any, load: Callable[[str], Any], key: str) -> str:
  image = entry.get("image") if isinstance(entry, dict) else None
  try:
    img = f'<img src="{_img_uri(load(image))}" alt="{html.escape(image)}">' if image else ""
  except Exception as e:  # noqa: BLE001 — a report must render even when an image went missing
    img = f"<p>(image unavailable: {html.escape(str(e))})</p>"
  turns = entry.get("conversations", []) if isinstance(entry, dict) else []
  scores = iter(row["turns"])
  lines = []
  for turn in turns:
    who = "Q" if turn.get("from") == "human" else "A"
    score = f" <i>[{next(scores, float('nan')):.3f}]</i>" if who == "A" else ""
    lines.append(f"<p><b>{who}:</b> {html.escape(str(turn.get('value', '')))}{score}</p>")
  return (f'<div class="card wide">{img}<p><b>{html.escape(str(row["id"]))}</b> '
          f'({html.escape(row["source"])}): {key} = {row[key]:.4f}, {len(row["turns"])} gpt turns</p>'
          f'{"".join(lines)}</div>')


def build_curation_report(stats: dict, values: dict[str, Sequence[float]], key: str,
                          best: Sequence[tuple[dict, Any]], worst: Sequence[tuple[dict, Any]],
                          load: Callable[[str], Any]) -> str:
  """`report.html` of the curate stage: the per-source counts, the S(I2C) histogram of each source
  (`key`: `i2c` summed over a conversation's answers, or `i2c_per_token`), and the best and worst
  conversations `(scores.jsonl row, the input entry)` with their image and every turn's S(I2C)."""
  names = ("entries", "scored", "text_only", "rejected", "selected")
  rows = [(s, *(c.get(n) for n in names), c.get(f"{key}_mean")) for s, c in stats["sources"].items()]
  parts = ["<h2>Sources</h2>", _table(rows, ("source", *names, f"mean {key}"))]
  for source, vals in sorted(values.items()):
    parts += [f"<h2>{html.escape(key)} of {html.escape(source)} ({len(vals)} conversations)</h2>",
              histogram_svg(list(vals))]
  for title, pairs in (("Best", best), ("Worst", worst)):
    cards = [_conversation_card(row, entry, load, key) for row, entry in pairs]
    parts.append(f"<h2>{title} {len(cards)} by {html.escape(key)}</h2><div class='cards'>"
                 f"{''.join(cards)}</div>")
  style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
           ".cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;padding:6px;"
           "font-size:13px}.wide{width:520px}img{width:96px}")
  return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Curation report</title>"
          f"<style>{style}</style></head><body><h1>Curation report</h1>{''.join(parts)}</body></html>\n")


__all__ = ["build_curation_report", "build_report", "histogram_svg", "verdict_text"]
