"""JSONL records (docs/design.md, "Records") read with quarantine instead of crashes.

Every input line ends up either as a record or as a rejection `{"raw": <line>, "line": N, "reason": ...}`
so nothing is lost silently; with `strict=True` the first bad line raises `BadInput` naming it.
"""

from __future__ import annotations

import errno
import fnmatch
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


# A disk that cannot take a write: full, over quota, or read-only. The run stops with one `error:` line
# naming the path and the errno (launch.py, `disk_error`), exit status 1 on every process.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
WRITE_FAULT_ENV = "C3L_WRITE_FAULT"


def write_fault(path: str | os.PathLike) -> None:
  """Test hook, called at every write site (shards, markers, DONE.json / metrics.json, the export,
  checkpoints): `C3L_WRITE_FAULT="ENOSPC:GLOB[,EROFS:GLOB...]"` makes a write to a path matching GLOB
  (fnmatch) raise `OSError(errno.ENOSPC, ..., path)`, every time (a full disk stays full until space
  is freed), so the tests inject the errors a full or read-only disk gives at each write site."""
  spec = os.environ.get(WRITE_FAULT_ENV, "")
  for entry in filter(None, (s.strip() for s in spec.split(","))):
    name, pattern = entry.split(":", 1)
    if fnmatch.fnmatch(os.fspath(path), pattern):
      code = getattr(errno, name)
      raise OSError(code, os.strerror(code), os.fspath(path))


def disk_error(e: BaseException) -> OSError | None:
  """The disk error (`DISK_ERRNOS`) that caused `e`, following `__cause__` / `__context__` (orbax and
  tensorstore wrap them), or None."""
  seen, first = set(), e
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
      return e
    e = e.__cause__ or e.__context__
  for code in DISK_ERRNOS:  # a library that kept only the message ("... No space left on device")
    if os.strerror(code) in str(first):
      return OSError(code, os.strerror(code))
  return None


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Write a file atomically: a tmp file beside it, then a rename (a local path or a gs:// URI). A
  failed write (a full disk) leaves at most the tmp file, never a partial `path`."""
  path = epath.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  write_fault(tmp)
  tmp.write_bytes(data)
  tmp.replace(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """`write_bytes_atomic` of `text` in UTF-8."""
  write_bytes_atomic(path, text.encode("utf-8"))


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> None:
  """Write rows as JSON lines atomically (`write_text_atomic`)."""
  write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
