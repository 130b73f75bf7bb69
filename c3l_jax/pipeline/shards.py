"""Sharded, atomic, resumable stage outputs (docs/design.md, "Data flow").

`WORKDIR/<stage>/part-NNNNN.jsonl` is written to a tmp file and renamed, then `part-NNNNN.done` marks it
finished (also written to a tmp file and renamed: a SIGKILL never leaves a half-written marker); a rerun
skips finished shards. Inputs a shard rejected go to `part-NNNNN.rejected.jsonl` (written before the
marker) and are gathered into `WORKDIR/<stage>/rejected.jsonl` at the end. The marker holds the shard's
counts as JSON: `written`, `rejected` and whatever else the stage counts (`read_counts`), and what the
part and its rejections must be: `bytes` / `sha256` of the part, `rejected_bytes` / `rejected_sha256` of
the rejections.

Every read checks a part against its marker (`verify`): a part shorter or different from what its
marker says (a node that died during a copy, a truncated sync), a marker without its part, a part
without its marker. A stage resuming redoes such a shard (`is_done` is False, with a warning in the
log); a reader of a stage's parts refuses it with `DamagedPart` (one `error:` line naming the file,
exit status 2) and says how to redo it, also when the stage's `DONE.json` says it finished (a rerun
skips a finished stage, so the next stage's read is where the damage shows). Nothing is read as if
it were whole.
Paths go through `etils.epath`: a stage directory may be local or on GCS (`gs://...`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Sequence

from absl import logging
from etils import epath

from c3l_jax.data.records import BadInput, write_bytes_atomic, write_text_atomic

_PART = re.compile(r"part-(\d{5})(\.rejected)?\.jsonl$")


class DamagedPart(BadInput):
  """A stage's part file does not match its marker (or one of the two is missing)."""


def part_path(stage_dir: str | os.PathLike, index: int) -> str:
  return os.fspath(epath.Path(stage_dir) / f"part-{index:05d}.jsonl")


def _marker(stage_dir: str | os.PathLike, index: int) -> epath.Path:
  return epath.Path(stage_dir) / f"part-{index:05d}.done"


def _rejected_path(stage_dir: str | os.PathLike, index: int) -> epath.Path:
  return epath.Path(stage_dir) / f"part-{index:05d}.rejected.jsonl"


def _jsonl(rows: Sequence[dict]) -> bytes:
  return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _fingerprint(data: bytes, prefix: str = "") -> dict:
  return {f"{prefix}bytes": len(data), f"{prefix}sha256": hashlib.sha256(data).hexdigest()}


def _problem(marker: dict | None, path: epath.Path, prefix: str) -> tuple[str | None, bytes]:
  """Why `path` is not the file `marker` describes (None: it is), and the file's bytes."""
  if marker is None:
    return "has no marker (part-NNNNN.done)", b""
  if f"{prefix}sha256" not in marker:
    return "has a marker without a checksum (written by an older version)", b""
  if not path.exists():
    return "is missing (its marker says it was written)", b""
  data = path.read_bytes()
  if len(data) != marker[f"{prefix}bytes"]:
    return f"is {len(data)} bytes, its marker says {marker[f'{prefix}bytes']}", data
  if hashlib.sha256(data).hexdigest() != marker[f"{prefix}sha256"]:
    return "does not match its marker's sha256", data
  return None, data


def _read_marker(stage_dir: str | os.PathLike, index: int) -> dict | None:
  path = _marker(stage_dir, index)
  try:
    marker = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (ValueError, UnicodeDecodeError):
    raise DamagedPart(f"{os.fspath(path)}: the marker is not valid JSON (damaged); delete it and rerun "
                      "with the same --workdir to redo the shard") from None
  return marker if isinstance(marker, dict) else None


def verify(stage_dir: str | os.PathLike, index: int) -> str | None:
  """Why shard `index` is not finished and whole (None: its marker, part and rejections all agree)."""
  path = _marker(stage_dir, index)
  try:
    marker = _read_marker(stage_dir, index)
  except DamagedPart:
    return f"{os.fspath(path)} is not valid JSON"
  if marker is None:
    return f"{part_path(stage_dir, index)} has no marker ({path.name})"
  for file, prefix in ((epath.Path(part_path(stage_dir, index)), ""),
                       (_rejected_path(stage_dir, index), "rejected_")):
    problem, _ = _problem(marker, file, prefix)
    if problem:
      return f"{os.fspath(file)} {problem}"
  return None


def is_done(stage_dir: str | os.PathLike, index: int) -> bool:
  """Whether shard `index` is finished and whole; a damaged one is logged and redone."""
  if not _marker(stage_dir, index).exists():
    return False
  problem = verify(stage_dir, index)
  if problem:
    logging.warning("redoing shard %d of %s: %s", index, os.fspath(stage_dir), problem)
  return problem is None


def write_shard(stage_dir: str, index: int, rows: Sequence[dict], rejected: Sequence[dict],
                counts: dict[str, int] | None = None) -> None:
  """Write one shard (and its rejections) atomically, then its DONE marker with its counts and the
  byte count and sha256 of both files."""
  epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)
  part, bad = _jsonl(rows), _jsonl(rejected)
  write_bytes_atomic(_rejected_path(stage_dir, index), bad)
  write_bytes_atomic(part_path(stage_dir, index), part)
  marker = {"written": len(rows), "rejected": len(rejected), **(counts or {}),
            **_fingerprint(part), **_fingerprint(bad, "rejected_")}
  write_text_atomic(_marker(stage_dir, index), json.dumps(marker) + "\n")


def read_counts(stage_dir: str, index: int) -> dict[str, int]:
  """The counts a finished shard's marker holds (`write_shard`)."""
  marker = _read_marker(stage_dir, index)
  if marker is None:
    raise DamagedPart(f"{os.fspath(_marker(stage_dir, index))} is missing{_remedy(stage_dir)}")
  return marker


def read_shard_counts(stage_dir: str, index: int) -> tuple[int, int]:
  counts = read_counts(stage_dir, index)
  return counts["written"], counts["rejected"]


def sum_counts(stage_dir: str, indices: Sequence[int], keys: Sequence[str]) -> dict[str, int]:
  """`{key: sum over the shards' markers}` of finished shards `indices`."""
  markers = [read_counts(stage_dir, i) for i in indices]
  return {k: sum(m[k] for m in markers) for k in keys}


def part_files(stage_dir: str) -> list[str]:
  """The stage's output shards, in order (not their rejections): every part and every marker's part
  (a marker whose part is missing lists the missing part, which `read_part` then refuses)."""
  indices = {int(m.group(1)) for p in _glob(stage_dir, "part-*")
             if (m := re.search(r"part-(\d{5})\.(?:jsonl|done)$", p))}
  return [part_path(stage_dir, i) for i in sorted(indices)]


def _glob(stage_dir: str | os.PathLike, pattern: str) -> list[str]:
  root = epath.Path(stage_dir)
  return sorted(os.fspath(p) for p in root.glob(pattern)) if root.exists() else []


def _remedy(stage_dir: str | os.PathLike) -> str:
  """What the user does about a damaged part of `stage_dir`: rerun, after deleting the DONE.json of the
  stage that wrote it (`WORKDIR/<stage>/` or, for `final/filtered`, its parent) if there is one."""
  for folder in (epath.Path(stage_dir), epath.Path(stage_dir).parent):
    if (folder / "DONE.json").exists():
      return (f"; delete {os.fspath(folder / 'DONE.json')} and rerun with the same --workdir to redo "
              "the damaged shard")
  return "; rerun with the same --workdir to redo the damaged shard"


def read_part(path: str | os.PathLike) -> list[dict]:
  """The records of one file. A stage's part (`part-NNNNN.jsonl`, `part-NNNNN.rejected.jsonl`) is read
  only if it matches its marker (byte count and sha256), else `DamagedPart` names it."""
  path = epath.Path(path)
  found = _PART.search(path.name)
  if found:
    marker = _read_marker(path.parent, int(found.group(1)))
    problem, data = _problem(marker, path, "rejected_" if found.group(2) else "")
    if problem:
      raise DamagedPart(f"{os.fspath(path)} {problem}{_remedy(path.parent)}")
    text = data.decode("utf-8")
  else:
    text = path.read_text(encoding="utf-8")
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_parts(stage_dir: str) -> list[dict]:
  """Every record of a stage's shards, in shard order."""
  return [row for path in part_files(stage_dir) for row in read_part(path)]


def gather_rejected(stage_dir: str, upfront: Sequence[dict]) -> int:
  """`rejected.jsonl` = rejections found before sharding + every shard's, in order; returns the count."""
  epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)
  rows = list(upfront)
  for path in part_files(stage_dir):
    rows.extend(read_part(os.fspath(_rejected_path(stage_dir, int(_PART.search(path).group(1))))))
  write_bytes_atomic(epath.Path(stage_dir) / "rejected.jsonl", _jsonl(rows))
  return len(rows)
