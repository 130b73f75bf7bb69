"""`WORKDIR/report.html`: one self-contained page (images inlined as data URIs, no scripts, no network).

Sections: the run's per-stage counts, the initial-vs-final data quality (when ground truth exists), an
S(I2C) histogram of the scored initial data (inline SVG), and the best and worst scored samples with
their images, so a reader sees what the content-relevance score rewards and what it rejects.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Callable, Sequence

import numpy as np

THUMB = 96  # px, the longer side of an inlined image


def _img_uri(image) -> str:
  image = image.copy()
  image.thumbnail((THUMB, THUMB))
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def histogram_svg(values: Sequence[float], bins: int = 30, width: int = 600, height: int = 180) -> str:
  """An inline SVG bar chart of `values` with labelled x-axis ends."""
  if not values:
    return "<p>no scored samples</p>"
  counts, edges = np.histogram(np.asarray(values, np.float64), bins=bins)
  top = max(int(counts.max()), 1)
  bar_w = width / bins
  bars = []
  for i, c in enumerate(counts):
    h = (height - 30) * c / top
    bars.append(f'<rect x="{i * bar_w:.1f}" y="{height - 20 - h:.1f}" width="{bar_w - 1:.1f}" '
                f'height="{h:.1f}" fill="#4a7bd0"><title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): '
                f'{int(c)}</title></rect>')
  labels = (f'<text x="0" y="{height - 4}" font-size="11">{edges[0]:.3g}</text>'
            f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{edges[-1]:.3g}</text>'
            f'<text x="{width / 2}" y="{height - 4}" font-size="11" text-anchor="middle">S(I2C)</text>'
            f'<text x="2" y="12" font-size="11">max count {top}</text>')
  return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
          f'role="img" aria-label="S(I2C) histogram">{"".join(bars)}{labels}</svg>')


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
  def cell(v):
    if isinstance(v, float):
      return "-" if math.isnan(v) else f"{v:.3f}"
    return html.escape("-" if v is None else str(v))
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
  return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _samples(rows: Sequence[dict], load: Callable[[str], Any], title: str) -> str:
  cards = []
  for r in rows:
    try:
      img = f'<img src="{_img_uri(load(r["image"]))}" alt="{html.escape(r["image"])}">'
    except Exception as e:  # noqa: BLE001 — a report must render even when an image went missing
      img = f"<p>(image unavailable: {html.escape(str(e))})</p>"
    cards.append(f'<div class="card">{img}<p><b>S(I2C) = {r["i2c"]:.4f}</b></p>'
                 f'<p><b>Q:</b> {html.escape(r["question"])}</p>'
                 f'<p><b>A:</b> {html.escape(r["answer"])}</p></div>')
  return f"<h3>{html.escape(title)}</h3><div class='cards'>{''.join(cards)}</div>"


def build_report(metrics: dict, scored: Sequence[dict], load: Callable[[str], Any],
                 quality: dict | None = None, examples: int = 6) -> str:
  """The report's HTML text (see the module docstring)."""
  counts = [(stage, m.get("read"), m.get("written"), m.get("rejected"))
            for stage, m in metrics.items() if isinstance(m, dict)]
  parts = ["<h2>Stages</h2>", _table(counts, ("stage", "read", "written", "rejected"))]
  if quality:
    names = sorted({k for q in quality.values() for k in q})
    parts += ["<h2>Initial vs final data</h2>",
              _table([(n, quality["initial"].get(n), quality["final"].get(n)) for n in names],
                     ("metric", "initial", "final"))]
  values = [r["i2c"] for r in scored if isinstance(r.get("i2c"), (int, float))]
  parts += [f"<h2>S(I2C) of the initial data ({len(values)} samples)</h2>", histogram_svg(values)]
  ranked = sorted((r for r in scored if "i2c" in r), key=lambda r: -r["i2c"])
  if ranked:
    parts.append(_samples(ranked[:examples], load, f"Best {min(examples, len(ranked))} by S(I2C)"))
    parts.append(_samples(ranked[::-1][:examples], load,
                          f"Worst {min(examples, len(ranked))} by S(I2C)"))
  style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
           ".cards{display:flex;flex-wrap:wrap;gap:12px}.card{width:220px;border:1px solid #ddd;"
           "padding:6px;font-size:13px}img{image-rendering:pixelated;width:96px}")
  return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>C3L run report</title>"
          f"<style>{style}</style></head><body><h1>C3L run report</h1>{''.join(parts)}</body></html>\n")


__all__ = ["build_report", "histogram_svg"]
