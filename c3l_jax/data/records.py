"""JSONL records (DESIGN.md, "Records") read with quarantine instead of crashes.

Every input line ends up either as a record or as a rejection `{"raw": <line>, "line": N, "reason": ...}`
so nothing is lost silently; with `strict=True` the first bad line raises `BadInput` naming it.
"""

from __future__ import annotations

import json
from typing import Iterator, Sequence

REQUIRED = ("id", "image", "question", "answer")


class BadInput(ValueError):
  """A bad input under `strict=True`; the message names the input and the reason."""


def reject(raw: object, reason: str, **where: object) -> dict:
  return {"raw": raw, "reason": reason, **where}


def read_records(path: str, required: Sequence[str] = REQUIRED, strict: bool = False
                 ) -> tuple[list[dict], list[dict]]:
  """Read `path`: returns `(records, rejected)`.

  Rejected: non-UTF-8 lines, malformed JSON, non-objects, missing or empty (or non-string) required
  fields, duplicate ids (the first occurrence is kept). Blank lines are skipped.
  """
  records, rejected, seen = [], [], set()
  for lineno, raw in _lines(path):
    problem, rec = _check_line(raw, required, seen)
    if problem:
      if strict:
        raise BadInput(f"{path}:{lineno}: {problem}")
      rejected.append(reject(raw if isinstance(raw, str) else raw.decode("utf-8", "replace"),
                             problem, line=lineno))
      continue
    seen.add(rec["id"])
    records.append(rec)
  return records, rejected


def _lines(path: str) -> Iterator[tuple[int, str | bytes]]:
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      line = line.rstrip(b"\r\n")
      if not line.strip():
        continue
      try:
        yield lineno, line.decode("utf-8")
      except UnicodeDecodeError:
        yield lineno, line


def _check_line(raw: str | bytes, required: Sequence[str], seen: set) -> tuple[str | None, dict]:
  if isinstance(raw, bytes):
    return "line is not valid UTF-8", {}
  try:
    rec = json.loads(raw)
  except json.JSONDecodeError as e:
    return f"malformed JSON: {e.msg} at column {e.colno}", {}
  if not isinstance(rec, dict):
    return f"a record must be a JSON object, got {type(rec).__name__}", {}
  for field in required:
    if field not in rec:
      return f"missing field {field!r}", {}
    value = rec[field]
    if not isinstance(value, str):
      return f"field {field!r} must be a string, got {type(value).__name__}", {}
    if not value.strip():
      return f"empty field {field!r}", {}
  if rec["id"] in seen:
    return f"duplicate id {rec['id']!r}", {}
  return None, rec


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
  """Write rows as JSON lines atomically (tmp file + rename)."""
  import os

  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
