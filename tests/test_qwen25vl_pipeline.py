"""Every stage on a tiny Qwen2.5-VL through `launch.py`, with pictures of different sizes (so different
image-token counts) and one of every bad input.

A random tiny Qwen never writes "Question: ... Answer: ...", and teaching it (as pipeline_world does for
the tiny LLaVA, whose vocabulary is 128 tokens) would take minutes with Qwen's 151,936: so one run
generates (initial, whose outputs the filter quarantines as unparsable, counted) and a second runs the
rest from QA records of the same pictures (score with prefix sharing, select, train with CE +
contrastive, final generation with the trained generator, export).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import pipeline_world as pw
import qwen_reference as Q
from c3l_jax import convert
from hf_reference import REPO

# Pictures beyond pipeline_world's 40 x 40 ones (a 4 x 4 patch grid, 4 image tokens), under its
# quarantine limit of 3000 pixels: grids 4 x 6 (6 tokens), 2 x 10 (5) and 6 x 4 (6, transposed).
EXTRA = {"wide.png": (75, 40), "strip.png": (150, 20), "tall.png": (40, 75)}
QA = [("What is in the picture?", "A few coloured dots on a grey ground."),
      ("What colour is the top left corner?", "It is mostly dark."),
      ("Describe the picture.", "Noise in many colours, with no object in it.")]
KINDS = ("conversation", "detailed_description", "complex_reasoning")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("qwen_pipeline"))
  Q.make_tiny_qwen(os.path.join(root, "hf"))
  model = os.path.join(root, "model")
  convert.convert(os.path.join(root, "hf"), model)
  records = pw.make_images(root)
  images = os.path.join(root, "images")
  rng = np.random.default_rng(1)
  with open(records, "a") as f:
    for name, (w, h) in EXTRA.items():
      PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(images, name))
      f.write(json.dumps({"id": name[:-4], "image": name}) + "\n")
  qa = os.path.join(root, "qa.jsonl")
  pictures = [f"im{i}.png" for i in range(3)] + list(EXTRA)
  with open(qa, "w") as f:
    for picture in pictures:
      for k, (q, a) in enumerate(QA):
        f.write(json.dumps({"id": f"{picture}-{k}", "image": picture, "question": q, "answer": a,
                            "instruction_type": KINDS[k]}) + "\n")
  return {"root": root, "model": model, "records": records, "images": images, "qa": qa,
          "pictures": pictures}


def _launch(world, workdir, *extra):
  cmd = [sys.executable, "launch.py", "--config=configs/qwen25vl.py:tiny", f"--workdir={workdir}",
         f"--config.model.checkpoint={world['model']}", f"--config.data.image_root={world['images']}",
         f"--config.data.max_pixels={pw.MAX_PIXELS}", "--config.generation.max_new_tokens=8",
         "--config.generation.caption_max_new_tokens=8", "--config.generation.per_image=2", *extra]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO})
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.load(open(os.path.join(workdir, "metrics.json")))


def _rows(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _parts(workdir, stage):
  d = os.path.join(workdir, stage)
  return [r for p in sorted(os.listdir(d)) if p.startswith("part-") and p.endswith(".jsonl")
          and "rejected" not in p
          for r in _rows(os.path.join(d, p))]


def test_generation_stages_quarantine_and_count(world):
  workdir = os.path.join(world["root"], "generate")
  metrics = _launch(world, workdir, "--config.stages=initial,filter",
                    f"--config.data.records={world['records']}", "--config.generation.mode=direct")
  initial, rejected = metrics["initial"], _rows(os.path.join(workdir, "initial", "rejected.jsonl"))
  reasons = " | ".join(r["reason"] for r in rejected)
  for reason in list(pw.BAD_IMAGES.values()) + list(pw.BAD_LINES.values()):
    assert reason in reasons, (reason, reasons)
  generated = _parts(workdir, "initial")
  # Every good picture, whatever its size, got its per_image generations (a random model's text).
  good = {f"im{i}.png" for i in range(pw.GOOD_IMAGES)} | set(EXTRA)
  assert {r["image"] for r in generated} == good
  assert len(generated) == 2 * len(good) and all("output" in r for r in generated)
  assert initial["read"] == initial["images"] + initial["repeated"] + initial["rejected"], initial
  assert initial["images"] == len(good)
  assert metrics["filter"]["read"] == metrics["filter"]["written"] + metrics["filter"]["rejected"]


def test_scoring_training_final_and_export(world):
  workdir = os.path.join(world["root"], "rest")
  metrics = _launch(world, workdir, "--config.stages=score,select,train,final,export",
                    f"--config.data.records={world['qa']}", "--config.train.steps=1",
                    "--config.select.top_fraction=0.5", "--config.generation.num_final=2")
  scored = _parts(workdir, "score")
  assert len(scored) == len(world["pictures"]) * len(QA)
  assert all(np.isfinite(r["i2c"]) and r["n_tokens"] > 0 for r in scored)
  # The same answer is more or less likely with pictures of different sizes, and without one.
  first = [r for r in scored if r["question"] == QA[0][0]]
  assert len({round(r["logp_image"], 3) for r in first}) == len(first)
  assert all(abs(r["logp_image"] - r["logp_text"]) > 1e-3 for r in first)
  assert metrics["train"]["steps"] == 1 and np.isfinite(metrics["train"]["last_loss"])
  assert os.path.exists(os.path.join(workdir, "train", "generator", "c3l_model.json"))
  final = metrics["final"]
  assert final["read"] == final["written"] + final["rejected"], final
  assert os.path.exists(os.path.join(workdir, "export", "c3l_vlit.json"))
