"""The default job (`python launch.py`: configs/scenes_demo.py), shrunk: every stage on the shipped scenes
checkpoint, the data-quality metrics against ground truth, the eval stage (scenes POPE + VQA), the
report and the closing table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from c3l_jax.data import scenes
from c3l_jax.eval import pope
from hf_reference import REPO

SCENES = os.path.join(REPO, "checkpoints", "scenes_tiny")
QUALITY = ("relevance", "accuracy", "hallucination", "avg_question_words", "avg_answer_words",
           "mean_i2c")


def _rows(path):
  return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def _parts(d):
  return [r for p in sorted(os.listdir(d)) if p.startswith("part-") and p.endswith(".jsonl")
          and "rejected" not in p for r in _rows(os.path.join(d, p))]


@pytest.mark.skipif(not os.path.exists(os.path.join(SCENES, "c3l_model.json")),
                    reason="the shipped scenes checkpoint is missing")
def test_shrunken_demo_end_to_end(tmp_path):
  workdir = tmp_path / "w"
  # A relative --workdir, as users type it (orbax needs absolute paths: launch.py resolves it).
  cmd = [sys.executable, "launch.py", f"--workdir={os.path.relpath(workdir, REPO)}", f"--config.data.tfds_dir={tmp_path / 'tfds'}",
         "--config.data.scenes_images=40", "--config.data.max_images=16", "--config.generation.per_image=3",
         "--config.generation.shard_size=8", "--config.generation.num_final=16",
         "--config.scoring.shard_size=64", "--config.train.steps=3", "--config.train.checkpoint_every=3",
         "--config.select.top_fraction=0.3", "--config.eval.pope_num_images=4",
         "--config.eval.max_items=8", "--config.eval.max_new_tokens=4", "--config.data.eval_batch_size=8"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
  assert proc.returncode == 0, proc.stderr[-4000:]
  metrics = json.load(open(workdir / "metrics.json"))
  assert list(metrics) == ["initial", "filter", "score", "select", "train", "final", "export", "eval"]

  # The quality numbers are what the checker says about the records the stages wrote.
  world = {s.file_name: s for s in scenes.generate_world(40, 0)}
  quality = metrics["export"]["quality"]
  for name, rows in (("initial", _parts(workdir / "score")),
                     ("final", _parts(workdir / "final" / "filtered"))):
    q = quality[name]
    assert q["instances"] == len(rows) > 0
    verdicts = [scenes.check(world[r["image"]], r["question"], r["answer"]) for r in rows]
    assert q["relevance"] == pytest.approx(sum(v.image_dependent for v in verdicts) / len(rows))
    assert q["hallucination"] == pytest.approx(sum(bool(v.hallucinated) for v in verdicts) / len(rows))
    assert q["mean_i2c"] == pytest.approx(sum(r["i2c"] for r in rows) / len(rows), rel=1e-6)
    assert all(k in q for k in QUALITY)
  # The run ends with the initial-vs-final table.
  tail = proc.stdout.strip().splitlines()
  table = tail[tail.index("Generated data, checked against the scenes' ground truth:") + 1:]
  assert table[0].split() == ["initial", "final"]
  assert [line.split()[0] for line in table[1:9]] == ["instances", *QUALITY[:3], *QUALITY[3:], "i2c_auc"]

  # The eval stage: POPE on the held-out scenes (objects from the annotations, 2 + 2 per image) and VQA.
  p = metrics["eval"]["pope"]
  assert p["source"] == "scenes" and p["objects_per_image"] == 2
  for split in pope.SPLITS:
    rows = _parts(workdir / "eval" / f"pope_{split}")
    assert len(rows) == 8 and p[split]["n"] == 8  # eval.max_items per split
    assert all(r["object"] in scenes.SHAPES for r in rows)
  vqa = metrics["eval"]["scenes_vqa"]
  assert vqa["questions"] == 16 and 0.0 <= vqa["accuracy"] <= 1.0
  assert (workdir / "report.html").stat().st_size > 1000
  assert "POPE" in proc.stdout
