"""Sharded, atomic, resumable stage outputs (docs/design.md, "Data flow").

`WORKDIR/<stage>/part-NNNNN.jsonl` is written to a tmp file and renamed, then `part-NNNNN.done` marks it
finished (also written to a tmp file and renamed: a SIGKILL never leaves a half-written marker); a rerun
skips finished shards. Inputs a shard rejected go to `part-NNNNN.rejected.jsonl` (written before the
marker) and are gathered into `WORKDIR/<stage>/rejected.jsonl` at the end. The marker holds the shard's
counts as JSON: `written`, `rejected` and whatever else the stage counts (`read_counts`).
Paths go through `etils.epath`: a stage directory may be local or on GCS (`gs://...`).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from etils import epath

from c3l_jax.data.records import write_jsonl, write_text_atomic


def part_path(stage_dir: str | os.PathLike, index: int) -> str:
  return os.fspath(epath.Path(stage_dir) / f"part-{index:05d}.jsonl")


def _marker(stage_dir: str | os.PathLike, index: int) -> epath.Path:
  return epath.Path(stage_dir) / f"part-{index:05d}.done"


def is_done(stage_dir: str | os.PathLike, index: int) -> bool:
  return _marker(stage_dir, index).exists()


def write_shard(stage_dir: str, index: int, rows: Sequence[dict], rejected: Sequence[dict],
                counts: dict[str, int] | None = None) -> None:
  """Write one shard (and its rejections) atomically, then its DONE marker with its counts."""
  epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)
  write_jsonl(epath.Path(stage_dir) / f"part-{index:05d}.rejected.jsonl", rejected)
  write_jsonl(part_path(stage_dir, index), rows)
  write_text_atomic(_marker(stage_dir, index),
                    json.dumps({"written": len(rows), "rejected": len(rejected), **(counts or {})}) + "\n")


def read_counts(stage_dir: str, index: int) -> dict[str, int]:
  """The counts a finished shard's marker holds (`write_shard`)."""
  return json.loads(_marker(stage_dir, index).read_text())


def read_shard_counts(stage_dir: str, index: int) -> tuple[int, int]:
  counts = read_counts(stage_dir, index)
  return counts["written"], counts["rejected"]


def sum_counts(stage_dir: str, indices: Sequence[int], keys: Sequence[str]) -> dict[str, int]:
  """`{key: sum over the shards' markers}` of finished shards `indices`."""
  markers = [read_counts(stage_dir, i) for i in indices]
  return {k: sum(m[k] for m in markers) for k in keys}


def part_files(stage_dir: str) -> list[str]:
  """The stage's output shards, in order (not their rejections)."""
  return [p for p in _glob(stage_dir, "part-*.jsonl") if not p.endswith(".rejected.jsonl")]


def _glob(stage_dir: str | os.PathLike, pattern: str) -> list[str]:
  root = epath.Path(stage_dir)
  return sorted(os.fspath(p) for p in root.glob(pattern)) if root.exists() else []


def read_part(path: str | os.PathLike) -> list[dict]:
  text = epath.Path(path).read_text(encoding="utf-8")
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_parts(stage_dir: str) -> list[dict]:
  """Every record of a stage's shards, in shard order."""
  return [row for path in part_files(stage_dir) for row in read_part(path)]


def gather_rejected(stage_dir: str, upfront: Sequence[dict]) -> int:
  """`rejected.jsonl` = rejections found before sharding + every shard's, in order; returns the count."""
  epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)
  rows = list(upfront)
  for path in _glob(stage_dir, "part-*.rejected.jsonl"):
    rows.extend(read_part(path))
  write_jsonl(epath.Path(stage_dir) / "rejected.jsonl", rows)
  return len(rows)
