"""JSONL records (docs/design.md, "Records") read with quarantine instead of crashes.

Every input line ends up either as a record or as a rejection `{"raw": <line>, "line": N, "reason": ...}`
so nothing is lost silently; with `strict=True` the first bad line raises `BadInput` naming it.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator, Sequence

from etils import epath

REQUIRED = ("id", "image", "question", "answer")


class BadInput(ValueError):
  """A bad input under `strict=True`; the message names the input and the reason."""


def reject(raw: object, reason: str, **where: object) -> dict:
  return {"raw": raw, "reason": reason, **where}


class Quarantine:
  """The rejections of one input file. `add` records one (`{"raw", "reason", **where}`); with
  `strict=True` it raises `BadInput` naming the file, the place (`line=` / `index=`) and the reason."""

  def __init__(self, path: str, strict: bool = False):
    self.path, self.strict, self.rows = path, strict, []

  def add(self, raw: object, reason: str, **where: object) -> None:
    if self.strict:
      place = "".join(f":{v}" if k == "line" else f" ({k} {v})" for k, v in where.items())
      raise BadInput(f"{self.path}{place}: {reason}")
    self.rows.append(reject(raw, reason, **where))


def read_jsonl(path: str, check: Callable[[dict], str | None] | None = None, strict: bool = False
               ) -> tuple[list[dict], list[dict]]:
  """Read a JSON-lines file: returns `(records, rejected)`.

  Rejected (`{"raw": <line>, "line": N, "reason"}`, plus the record's `"id"` when it has a string or
  integer one): non-UTF-8 lines, malformed JSON, non-objects, and records for which `check(record)`
  returns a reason. Blank lines are skipped. A missing file raises
  `BadInput`.
  """
  if not os.path.isfile(path):
    raise BadInput(f"{path}: file not found")
  records, bad = [], Quarantine(path, strict)
  for lineno, raw in _lines(path):
    problem, rec = _parse_line(raw)
    if problem is None and check is not None:
      problem = check(rec)
    if problem:
      where = {"line": lineno, **({"id": rec["id"]} if _has_id(rec) else {})}
      bad.add(raw if isinstance(raw, str) else raw.decode("utf-8", "replace"), problem, **where)
      continue
    records.append(rec)
  return records, bad.rows


def _has_id(rec: object) -> bool:
  return (isinstance(rec, dict) and isinstance(rec.get("id"), (str, int))
          and not isinstance(rec.get("id"), bool))


def read_records(path: str, required: Sequence[str] = REQUIRED, strict: bool = False
                 ) -> tuple[list[dict], list[dict]]:
  """Read `path`: returns `(records, rejected)`.

  Rejected: non-UTF-8 lines, malformed JSON, non-objects, missing or empty (or non-string) required
  fields, duplicate ids (the first occurrence is kept). Blank lines are skipped.
  """
  seen: set = set()

  def check(rec: dict) -> str | None:
    problem = missing_field(rec, required, str)
    if problem is None and rec["id"] in seen:
      problem = f"duplicate id {rec['id']!r}"
    if problem is None:
      seen.add(rec["id"])
    return problem

  return read_jsonl(path, check, strict)


def missing_field(rec: dict, required: Sequence[str], kind: type | tuple[type, ...] = str) -> str | None:
  """Why `rec` lacks one of `required` (absent, not of `kind`, or an empty string), or None."""
  for field in required:
    if field not in rec:
      return f"missing field {field!r}"
    value = rec[field]
    if not isinstance(value, kind) or isinstance(value, bool):
      names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
      return f"field {field!r} must be {'a ' if isinstance(kind, type) else ''}{names}, " \
             f"got {type(value).__name__}"
    if isinstance(value, str) and not value.strip():
      return f"empty field {field!r}"
  return None


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


def _parse_line(raw: str | bytes) -> tuple[str | None, dict]:
  if isinstance(raw, bytes):
    return "line is not valid UTF-8", {}
  try:
    rec = json.loads(raw)
  except json.JSONDecodeError as e:
    return f"malformed JSON: {e.msg} at column {e.colno}", {}
  if not isinstance(rec, dict):
    return f"a record must be a JSON object, got {type(rec).__name__}", {}
  return None, rec


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Write a file atomically: a tmp file beside it, then a rename (a local path or a gs:// URI)."""
  path = epath.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  tmp.replace(path)


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> None:
  """Write rows as JSON lines atomically (`write_text_atomic`)."""
  write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
