"""`launch.py --config.stages=score`: outputs, torch parity, quarantine, strict mode and resumption."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from c3l_jax.data.images import load_image
from c3l_jax.data.prompts import PromptBuilder, load_processor
from hf_reference import REPO, convert_cli, make_hf_llava, make_tiny_processor, torch_i2c

GOOD = [
    ("g1", "grey.png", "what color is the circle?", "the circle is red"),
    ("g2", "grey.png", "how many objects are there?", "three"),
    ("r1", "rgba.png", "describe the image", "a small blue square is on the left"),
    ("o1", "odd.jpg", "where is the dog?", "next to the car"),
    ("o2", "odd.jpg", "is there a cat?", "no"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("stage")
  hf = make_hf_llava(str(root / "hf"), logit_scale=8.0)
  make_tiny_processor(str(root / "hf"))
  assert convert_cli(str(root / "hf"), str(root / "model")).returncode == 0
  images = root / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  PIL.Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L").save(images / "grey.png")
  PIL.Image.fromarray(rng.integers(0, 255, (32, 48, 4), dtype=np.uint8), mode="RGBA").save(images / "rgba.png")
  PIL.Image.fromarray(rng.integers(0, 255, (37, 23, 3), dtype=np.uint8)).save(images / "odd.jpg")
  (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  (images / "empty.png").write_bytes(b"")
  (images / "notes.jpg").write_bytes(b"plain text, not an image\n")
  lines = [json.dumps(dict(id=i, image=im, question=q, answer=a)) for i, im, q, a in GOOD]
  bad = {
      '{"id": "x1", "image": "grey.png", "question": "q?"': "malformed JSON",
      json.dumps(dict(id="x2", image="grey.png", question="what?")): "missing field 'answer'",
      json.dumps(dict(id="x3", image="grey.png", question="what?", answer="  ")): "empty field 'answer'",
      json.dumps(dict(id="g1", image="grey.png", question="again?", answer="yes")): "duplicate id",
      json.dumps(dict(id="x5", image="missing.png", question="what?", answer="a dog")): "missing image",
      json.dumps(dict(id="x6", image="corrupt.jpg", question="what?", answer="a dog")): "corrupt or truncated",
      json.dumps(dict(id="x7", image="empty.png", question="what?", answer="a dog")): "zero-byte",
      json.dumps(dict(id="x9", image="notes.jpg", question="what?", answer="a dog")): "not an image",
      # 300 answer tokens and more: over the tiny model's 256 positions.
      json.dumps(dict(id="x10", image="odd.jpg", question="what?", answer=" ".join(["red"] * 300))):
          "tokens is over the model's context of 256",
  }
  records = root / "records.jsonl"
  with open(records, "wb") as f:
    for line in lines[:3] + list(bad) + lines[3:]:
      f.write(line.encode() + b"\n")
    f.write(b'{"id": "x8", "image": "grey.png", "question": "\xff\xfe", "answer": "a"}\n')
  bad["x8"] = "not valid UTF-8"
  return dict(root=root, hf=hf, records=str(records), images=str(images),
              model=str(root / "model"), reasons=list(bad.values()))


def _launch(corpus, workdir, *extra, env=None):
  cmd = [sys.executable, "launch.py", "--config=configs/llava15.py:tiny", f"--workdir={workdir}",
         "--config.stages=score", f"--config.model.checkpoint={corpus['model']}",
         f"--config.data.records={corpus['records']}", f"--config.data.image_root={corpus['images']}",
         "--config.scoring.shard_size=2", *extra]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def _outputs(workdir):
  parts = sorted(p for p in os.listdir(os.path.join(workdir, "score")) if p.endswith(".jsonl")
                 and p.startswith("part-") and "rejected" not in p)
  data = b"".join(open(os.path.join(workdir, "score", p), "rb").read() for p in parts)
  return parts, data


def _errors(proc):
  return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def uninterrupted(corpus):
  """The score stage run once without faults: the reference every damaged or failed run's rerun must
  reproduce byte for byte."""
  workdir = corpus["root"] / "uninterrupted"
  proc = _launch(corpus, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(workdir=workdir, outputs=_outputs(workdir))


def test_score_stage_end_to_end(corpus, uninterrupted, tmp_path):
  """Outputs against transformers, the quarantine; then a damaged workdir (refused by the next stage's
  read, redone on resume) and a full disk: the rerun equals the uninterrupted run byte for byte."""
  shutil.copytree(uninterrupted["workdir"], tmp_path / "w")  # damaged below
  parts, data = uninterrupted["outputs"]
  assert len(parts) == 5  # 10 readable records (4 with bad images, 1 too long), shards of 2
  rows = [json.loads(line) for line in data.decode().splitlines()]
  assert [r["id"] for r in rows] == [g[0] for g in GOOD]
  builder = PromptBuilder(load_processor(corpus["model"]))
  for row in rows:
    enc = builder.encode_qa(row["question"], row["answer"],
                            load_image(os.path.join(corpus["images"], row["image"])))
    want = torch_i2c(corpus["hf"], enc.prompt_image, enc.prompt_text, enc.answer, enc.pixel_values)
    assert row["n_tokens"] == want["n_tokens"]
    for k in ("i2c", "logp_image", "logp_text"):
      assert abs(row[k] - want[k]) <= 1e-3 + 1e-3 * abs(want[k])
  rejected = [json.loads(line) for line in open(tmp_path / "w" / "score" / "rejected.jsonl")]
  assert len(rejected) == len(corpus["reasons"])
  for reason in corpus["reasons"]:
    assert sum(reason in r["reason"] for r in rejected) == 1, (reason, rejected)
  metrics = json.load(open(tmp_path / "w" / "metrics.json"))["score"]
  assert metrics == {"read": 15, "written": 5, "rejected": 10}
  assert metrics["read"] == metrics["written"] + metrics["rejected"]

  # A damaged part of a finished stage: the next stage's read refuses it (DONE.json is no proof).
  score = tmp_path / "w" / "score"
  cut = max(range(5), key=lambda i: os.path.getsize(score / f"part-{i:05d}.jsonl"))  # has rows
  whole = (score / f"part-{cut:05d}.jsonl").read_bytes()
  (score / f"part-{cut:05d}.jsonl").write_bytes(whole[:len(whole) // 2])  # a copy cut short
  proc = _launch(corpus, tmp_path / "w", "--config.stages=score,select")
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = _errors(proc)
  assert len(errors) == 1, proc.stderr
  assert f"{score / f'part-{cut:05d}.jsonl'} is {len(whole) // 2} bytes" in errors[0], errors
  assert f"delete {score / 'DONE.json'}" in errors[0], errors
  assert not (tmp_path / "w" / "select" / "DONE.json").exists()

  # Resumption: a finished stage is skipped; a stage interrupted midway (no DONE.json) redoes only the
  # shards that are not finished and whole -- no marker and no part, the part cut short (above), a part
  # without its marker, a marker without its part -- and the output is byte-identical.
  os.remove(score / "DONE.json")
  others = [i for i in range(5) if i != cut]
  os.remove(score / f"part-{others[0]:05d}.done")
  os.remove(score / f"part-{others[0]:05d}.jsonl")
  os.remove(score / f"part-{others[1]:05d}.done")
  os.remove(score / f"part-{others[2]:05d}.jsonl")
  # On the way, the disk fills up (ENOSPC writing a part, injected at the write site,
  # `records.write_fault`): the run ends with exit status 1 and one `error:` line naming the path and
  # the errno. Then a preemption notice: SIGTERM after a shard, the next one taking longer than the
  # grace (C3L_FAULT `term`, then `sleep`): the run abandons that shard and exits 143. Neither marks
  # anything done that is not complete. (EROFS at a marker, EDQUOT at DONE.json: tests/test_shards.py,
  # tests/test_config.py.)
  for fault, missing in [(f"ENOSPC:{score}/part-{others[0]:05d}.jsonl.tmp", f"part-{others[0]:05d}.done"),
                         ("SIGTERM", "DONE.json")]:
    if fault == "SIGTERM":
      proc = _launch(corpus, tmp_path / "w", "--config.preemption_grace_s=1",
                     env={"C3L_FAULT": "0:score:shard:term,0:score:shard:sleep=600"})
      assert proc.returncode == 143, proc.stderr[-3000:]
      assert "stopped by SIGTERM (a preemption notice): abandoned the shard in hand" in proc.stderr
      assert not _errors(proc) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    else:
      code, path = fault.split(":", 1)
      proc = _launch(corpus, tmp_path / "w", env={"C3L_WRITE_FAULT": fault})
      assert proc.returncode == 1, proc.stderr[-3000:]
      assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
      assert len(_errors(proc)) == 1 and f"cannot write {path}: " in _errors(proc)[0], proc.stderr
      assert code in _errors(proc)[0] and "rerun with the same --workdir" in _errors(proc)[0]
    assert not (score / missing).exists()
  proc = _launch(corpus, tmp_path / "w")  # space freed, the job restarted
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _outputs(tmp_path / "w") == (parts, data)
  assert json.loads((tmp_path / "w" / "metrics.json").read_text()) == json.loads(
      (uninterrupted["workdir"] / "metrics.json").read_text())
  redone = sorted({int(line.split("redoing shard ")[1].split()[0]) for line in
                  (tmp_path / "w" / "logs" / "run.log").read_text().splitlines() if "redoing shard" in line})
  assert redone == sorted([cut, others[2]]), redone  # the other two had no marker: not finished


def test_strict_mode_stops_at_first_bad_input(corpus, tmp_path):
  proc = _launch(corpus, tmp_path / "w", "--config.strict=True")
  assert proc.returncode != 0
  assert "records.jsonl:4" in proc.stderr and "malformed JSON" in proc.stderr
