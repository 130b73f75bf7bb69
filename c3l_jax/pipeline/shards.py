"""Sharded, atomic, resumable stage outputs (DESIGN.md, "Data flow").

`WORKDIR/<stage>/part-NNNNN.jsonl` is written to a tmp file and renamed, then `part-NNNNN.done` marks it
finished; a rerun skips finished shards. Inputs a shard rejected go to `part-NNNNN.rejected.jsonl`
(written before the marker) and are gathered into `WORKDIR/<stage>/rejected.jsonl` at the end.
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


def write_shard(stage_dir: str, index: int, rows: Sequence[dict], rejected: Sequence[dict]) -> None:
  """Write one shard (and its rejections) atomically, then its DONE marker."""
  os.makedirs(stage_dir, exist_ok=True)
  write_jsonl(os.path.join(stage_dir, f"part-{index:05d}.rejected.jsonl"), rejected)
  write_jsonl(part_path(stage_dir, index), rows)
  with open(os.path.join(stage_dir, f"part-{index:05d}.done"), "w") as f:
    f.write(f"{len(rows)} {len(rejected)}\n")


def read_shard_counts(stage_dir: str, index: int) -> tuple[int, int]:
  with open(os.path.join(stage_dir, f"part-{index:05d}.done")) as f:
    written, rejected = f.read().split()
  return int(written), int(rejected)


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
