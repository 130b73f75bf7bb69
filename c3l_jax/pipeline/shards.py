"""Sharded, atomic, resumable stage outputs (docs/design.md, "Data flow").

`WORKDIR/<stage>/part-NNNNN.jsonl` is written to a tmp file and renamed, then `part-NNNNN.done` marks it
finished (also written to a tmp file and renamed: a SIGKILL never leaves a half-written marker); a rerun
skips finished shards. Inputs a shard rejected go to `part-NNNNN.rejected.jsonl` (written before the
marker) and are gathered into `WORKDIR/<stage>/rejected.jsonl` at the end. The marker holds the shard's
counts as JSON: `written`, `rejected` and whatever else the stage counts (`read_counts`).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

from c3l_jax.data.records import write_jsonl


def part_path(stage_dir: str, index: int) -> str:
  return os.path.join(stage_dir, f"part-{index:05d}.jsonl")


def is_done(stage_dir: str, index: int) -> bool:
  return os.path.exists(os.path.join(stage_dir, f"part-{index:05d}.done"))


def write_shard(stage_dir: str, index: int, rows: Sequence[dict], rejected: Sequence[dict],
                counts: dict[str, int] | None = None) -> None:
  """Write one shard (and its rejections) atomically, then its DONE marker with its counts."""
  os.makedirs(stage_dir, exist_ok=True)
  write_jsonl(os.path.join(stage_dir, f"part-{index:05d}.rejected.jsonl"), rejected)
  write_jsonl(part_path(stage_dir, index), rows)
  marker = os.path.join(stage_dir, f"part-{index:05d}.done")
  with open(f"{marker}.tmp", "w") as f:
    f.write(json.dumps({"written": len(rows), "rejected": len(rejected), **(counts or {})}) + "\n")
  os.replace(f"{marker}.tmp", marker)


def read_counts(stage_dir: str, index: int) -> dict[str, int]:
  """The counts a finished shard's marker holds (`write_shard`)."""
  with open(os.path.join(stage_dir, f"part-{index:05d}.done")) as f:
    return json.loads(f.read())


def read_shard_counts(stage_dir: str, index: int) -> tuple[int, int]:
  counts = read_counts(stage_dir, index)
  return counts["written"], counts["rejected"]


def sum_counts(stage_dir: str, indices: Sequence[int], keys: Sequence[str]) -> dict[str, int]:
  """`{key: sum over the shards' markers}` of finished shards `indices`."""
  markers = [read_counts(stage_dir, i) for i in indices]
  return {k: sum(m[k] for m in markers) for k in keys}


def part_files(stage_dir: str) -> list[str]:
  """The stage's output shards, in order (not their rejections)."""
  return [p for p in sorted(glob.glob(os.path.join(stage_dir, "part-*.jsonl")))
          if not p.endswith(".rejected.jsonl")]


def read_part(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def read_parts(stage_dir: str) -> list[dict]:
  """Every record of a stage's shards, in shard order."""
  return [row for path in part_files(stage_dir) for row in read_part(path)]


def gather_rejected(stage_dir: str, upfront: Sequence[dict]) -> int:
  """`rejected.jsonl` = rejections found before sharding + every shard's, in order; returns the count."""
  os.makedirs(stage_dir, exist_ok=True)
  rows = list(upfront)
  for path in sorted(glob.glob(os.path.join(stage_dir, "part-*.rejected.jsonl"))):
    with open(path, encoding="utf-8") as f:
      rows.extend(json.loads(line) for line in f if line.strip())
  write_jsonl(os.path.join(stage_dir, "rejected.jsonl"), rows)
  return len(rows)
