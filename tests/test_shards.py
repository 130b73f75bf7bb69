"""A stage's parts against their markers (`c3l_jax.pipeline.shards`): each kind of damage a workdir
gets (a part cut short by a copy, a part without its marker, a marker without its part, a changed
byte) is found, by a resuming stage (`is_done` is False: it redoes the shard) and by every reader
(`DamagedPart`, naming the file); an intact shard reads back exactly what was written."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from c3l_jax.pipeline import shards

ROWS = [{"id": f"q{i}", "answer": "a red circle " * i} for i in range(4)]
BAD = [{"raw": "x", "reason": "malformed JSON", "line": 3}]


@pytest.fixture
def stage(tmp_path):
  for index in range(3):
    shards.write_shard(str(tmp_path), index, ROWS[index:], BAD[:index % 2])
  (tmp_path / "DONE.json").write_text("{}\n")
  return tmp_path


def test_marker_records_bytes_and_sha256(stage):
  data = (stage / "part-00001.jsonl").read_bytes()
  marker = json.loads((stage / "part-00001.done").read_text())
  assert data == b"".join(json.dumps(r).encode() + b"\n" for r in ROWS[1:])  # written by hand here
  assert marker["bytes"] == len(data) and marker["sha256"] == hashlib.sha256(data).hexdigest()
  assert marker["written"] == 3 and marker["rejected"] == 1
  assert [shards.is_done(str(stage), i) for i in range(3)] == [True, True, True]
  assert shards.read_parts(str(stage)) == ROWS[0:] + ROWS[1:] + ROWS[2:]
  assert shards.gather_rejected(str(stage), ()) == 1


def _truncate(stage):
  path = stage / "part-00001.jsonl"
  path.write_bytes(path.read_bytes()[:-7])
  return path, "bytes, its marker says"


def _flip(stage):
  path = stage / "part-00001.jsonl"
  data = bytearray(path.read_bytes())
  data[5] ^= 1  # same length, one byte changed
  path.write_bytes(bytes(data))
  return path, "sha256"


def _no_marker(stage):
  os.remove(stage / "part-00001.done")
  return stage / "part-00001.jsonl", "has no marker"


def _no_part(stage):
  os.remove(stage / "part-00001.jsonl")
  return stage / "part-00001.jsonl", "is missing"


def _no_rejected(stage):
  os.remove(stage / "part-00001.rejected.jsonl")
  return stage / "part-00001.rejected.jsonl", "is missing"


def _old_marker(stage):
  marker = json.loads((stage / "part-00001.done").read_text())
  (stage / "part-00001.done").write_text(json.dumps({"written": marker["written"], "rejected": 1}))
  return stage / "part-00001.jsonl", "without a checksum"


@pytest.mark.parametrize("damage", [_truncate, _flip, _no_marker, _no_part, _no_rejected, _old_marker])
def test_damage_is_found_by_resume_and_refused_by_readers(stage, damage):
  path, why = damage(stage)
  assert [shards.is_done(str(stage), i) for i in range(3)] == [True, False, True]  # redone on resume
  assert why in shards.verify(str(stage), 1) and str(path) in shards.verify(str(stage), 1)
  with pytest.raises(shards.DamagedPart) as error:
    if "rejected" in path.name:
      shards.gather_rejected(str(stage), ())
    else:
      shards.read_parts(str(stage))
  assert str(path) in str(error.value) and why in str(error.value)
  assert f"delete {stage / 'DONE.json'}" in str(error.value)  # the stage said it was done
  # The resumed stage rewrites the shard: whole again, the same rows.
  shards.write_shard(str(stage), 1, ROWS[1:], BAD)
  assert shards.read_parts(str(stage)) == ROWS[0:] + ROWS[1:] + ROWS[2:]


@pytest.mark.parametrize("code, target", [("EROFS", "part-00001.done"), ("ENOSPC", "part-00001.jsonl"),
                                          ("EDQUOT", "part-00001.rejected.jsonl")])
def test_a_write_that_fails_marks_nothing_done(tmp_path, monkeypatch, code, target):
  """A full or read-only disk (the errno injected at the write site): the error names the path and
  the errno, the shard is not marked done, and once the disk takes writes again the shard is whole."""
  import errno

  from c3l_jax.data import records

  monkeypatch.setenv(records.WRITE_FAULT_ENV, f"{code}:*/{target}.tmp")
  with pytest.raises(OSError) as error:
    shards.write_shard(str(tmp_path), 1, ROWS, BAD)
  assert error.value.errno == getattr(errno, code) and error.value.filename == f"{tmp_path}/{target}.tmp"
  assert records.disk_error(RuntimeError("wrapped")) is None
  wrapped = RuntimeError("orbax wrapped it")
  wrapped.__cause__ = error.value
  assert records.disk_error(wrapped) is error.value
  assert not (tmp_path / target).exists() and not shards.is_done(str(tmp_path), 1)
  monkeypatch.delenv(records.WRITE_FAULT_ENV)
  shards.write_shard(str(tmp_path), 1, ROWS, BAD)
  assert shards.is_done(str(tmp_path), 1) and shards.read_parts(str(tmp_path)) == ROWS
