"""Every generator stage on a tiny Qwen2.5-VL through `launch.py`, in one run, with pictures of different
sizes (so different image-token counts) and one of every bad input; then the inference stages (score,
and final resumed after a kill) as two processes against it, byte for byte.

A random tiny Qwen never writes "Question: ... Answer: ..." (the filter would drop everything), and
teaching it would take minutes with Qwen's 151,936-token vocabulary: so the tiny model's weights are set
to answer every prompt with one text holding two QA pairs (`qwen_reference.teach_reply`: a bigram table
in its untied head, the decoder blocks damped so that pictures still move the scores). Initial
(direct), filter, score (prefix sharing), select, train (CE + contrastive), final (two-step) and export
then run as on a real model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import pipeline_world as pw
from pipeline_world import rows as _rows, parts as _parts, tree as _tree
import ports
import qwen_reference as Q
from c3l_jax import convert
from hf_reference import REPO

# Pictures beyond pipeline_world's 40 x 40 ones (a 4 x 4 patch grid, 4 image tokens), under its
# quarantine limit of 3000 pixels: grids 4 x 6 (6 tokens), 2 x 10 (5) and 6 x 4 (6, transposed).
EXTRA = {"wide.png": (75, 40), "strip.png": (150, 20), "tall.png": (40, 75)}
# Two QA pairs (`generation.qa_per_prompt=2`: the contrastive loss needs two samples per picture), in
# markers the parser accepts, spelt so that no token repeats (the reply is a bigram chain).
REPLY = ("Question:\nWhat is in the picture? Answer: Many coloured dots. Q：Which colours are there?\n"
         "A:\n\nRed and blue")
PAIRS = {("What is in the picture?", "Many coloured dots."), ("Which colours are there?", "Red and blue")}
STAGES = "initial,filter,score,select,train,final,export"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("qwen_pipeline"))
  # 7B-like: its own lm_head, the 7B's vocabulary size, saved with transformers 5's key names.
  hf = Q.make_tiny_qwen(os.path.join(root, "hf"), tied=False, layout="v5", vocab_size=152064, reply=REPLY)
  model = os.path.join(root, "model")
  convert.convert(os.path.join(root, "hf"), model)
  records = pw.make_images(root)
  images = os.path.join(root, "images")
  rng = np.random.default_rng(1)
  with open(records, "a") as f:
    for name, (w, h) in EXTRA.items():
      PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(images, name))
      f.write(json.dumps({"id": name[:-4], "image": name}) + "\n")
  return {"root": root, "hf": hf, "model": model, "records": records, "images": images,
          "good": {f"im{i}.png" for i in range(pw.GOOD_IMAGES)} | set(EXTRA)}


def test_untied_head_and_transformers5_layout(world):
  """The converted 7B-like checkpoint's logits are transformers' (fp32), its own head included."""
  import jax

  from c3l_jax import sharding
  from c3l_jax.models import qwen25vl as M

  model = sharding.load_model(world["model"], sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                                                 jax.devices()[:1]))
  assert not model.cfg.text.tie_word_embeddings and model.cfg.text.vocab_size == 152064
  proc = Q.Processor(os.path.join(world["root"], "hf"))
  pixels, grid = proc.image(Q.pictures()["grey"])
  ids = proc.expand(proc.prompt(Q.QUESTION, True), M.image_tokens(grid))
  pos = M.mrope_positions(np.asarray([ids]), None, [grid], model.cfg)[0]
  got = np.asarray(model(np.asarray([ids]), M.pack_images(pixels, [grid], model.cfg.vision), None, pos))[0]
  want = Q.torch_forward(world["hf"], ids, pixels, grid)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
  assert np.abs(want).max() > 30  # the reply's bigram logits


def _cmd(world, workdir, *extra):
  return ["launch.py", "--config=configs/qwen25vl.py:tiny", f"--workdir={workdir}",
          f"--config.model.checkpoint={world['model']}", f"--config.data.image_root={world['images']}",
          f"--config.data.records={world['records']}", f"--config.data.max_pixels={pw.MAX_PIXELS}",
          "--config.generation.max_new_tokens=32", "--config.generation.caption_max_new_tokens=32",
          "--config.generation.per_image=2", "--config.generation.mode=direct",
          "--config.generation.qa_per_prompt=2", "--config.scoring.shard_size=6",
          "--config.generation.shard_size=2",
          "--config.train.steps=1", "--config.select.top_fraction=0.5",
          "--config.generation.num_final=4", *extra]


def _env(**extra):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **extra}


def _two_processes(world, workdir, stages):
  """`stages` as a 2-task SLURM step on this machine (as tests/test_multihost.py starts it)."""
  jobs = random.Random(os.urandom(8)).sample(range(4096), 200)
  reservation = ports.reserve(61440 + job for job in jobs)
  procs = []
  try:
    for i in range(2):
      env = _env(SLURM_JOB_ID=str(reservation.port - 61440), SLURM_NTASKS="2", SLURM_PROCID=str(i),
                 SLURM_LOCALID=str(i), SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1",
                 SLURM_NODEID="0", JAX_NUM_CPU_DEVICES="1")
      log = open(os.path.join(os.path.dirname(workdir), f"task-{i}.log"), "w")
      procs.append(subprocess.Popen([sys.executable] + _cmd(world, workdir, f"--config.stages={stages}",
                                                            "--config.distributed=True"),
                                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env))
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    reservation.release()
  logs = "".join(open(os.path.join(os.path.dirname(workdir), f"task-{i}.log")).read()[-2000:]
                 for i in range(2))
  assert codes == [0, 0], logs


@pytest.fixture(scope="module")
def runs(world):
  """One run of every stage; then score and final again as two processes in a workdir holding that
  run's initial, filter and train outputs and what a run killed right after final's first shard leaves
  (that shard's files, renamed into place, nothing else: tests/kill_at.py's kill point), so the two
  processes score from scratch and resume final."""
  root = world["root"]
  one = os.path.join(root, "one", "w")
  proc = subprocess.run([sys.executable] + _cmd(world, one, f"--config.stages={STAGES}"), cwd=REPO,
                        capture_output=True, text=True, env=_env())
  assert proc.returncode == 0, proc.stderr[-4000:]
  metrics = json.load(open(os.path.join(one, "metrics.json")))
  two = os.path.join(root, "two", "w")
  os.makedirs(os.path.join(two, "final"))
  for stage in ("initial", "filter", "train"):  # train: its DONE.json and generator (not its checkpoints)
    shutil.copytree(os.path.join(one, stage), os.path.join(two, stage),
                    ignore=shutil.ignore_patterns("checkpoints"))
  shard = [name for name in os.listdir(os.path.join(one, "final")) if name.startswith("part-00000.")]
  for name in shard:
    shutil.copy2(os.path.join(one, "final", name), os.path.join(two, "final", name))
  kept = {name: os.stat(os.path.join(two, "final", name)).st_mtime_ns for name in shard}
  with open(os.path.join(two, "metrics.json"), "w") as f:
    json.dump({s: metrics[s] for s in ("initial", "filter", "train")}, f)
  _two_processes(world, two, "score,final")
  return {"one": one, "two": two, "kept": kept, "metrics": metrics}






def test_generation_stages_quarantine_and_count(world, runs):
  workdir, metrics = runs["one"], runs["metrics"]
  initial, rejected = metrics["initial"], _rows(os.path.join(workdir, "initial", "rejected.jsonl"))
  reasons = " | ".join(r["reason"] for r in rejected)
  for reason in list(pw.BAD_IMAGES.values()) + list(pw.BAD_LINES.values()):
    assert reason in reasons, (reason, reasons)
  generated = _parts(workdir, "initial")
  # Every good picture, whatever its size, got its per_image generations: the model's one reply.
  assert {r["image"] for r in generated} == world["good"]
  assert len(generated) == 2 * 2 * len(world["good"]) and all(r["output"] == REPLY for r in generated)
  assert {(r["question"], r["answer"]) for r in generated} == PAIRS
  assert initial["read"] == initial["images"] + initial["repeated"] + initial["rejected"], initial
  assert initial["images"] == len(world["good"])
  # Two pairs per sample; the filter keeps each picture's two (the second sample's are duplicates).
  kept = _parts(workdir, "filter")
  assert sorted(r["image"] for r in kept) == sorted(2 * list(world["good"]))
  assert {(r["question"], r["answer"]) for r in kept} == PAIRS
  f = metrics["filter"]
  assert f["read"] == f["written"] + f["rejected"] and f["written"] == 2 * len(world["good"])


def test_scoring_training_final_and_export(world, runs):
  workdir, metrics = runs["one"], runs["metrics"]
  scored = _parts(workdir, "score")
  assert sorted(r["image"] for r in scored) == sorted(2 * list(world["good"]))
  assert all(np.isfinite(r["i2c"]) and r["n_tokens"] > 0 for r in scored)
  # The same answer is more or less likely with pictures of different sizes, and without one.
  for question, _ in PAIRS:
    same = {r["image"]: r for r in scored if r["question"] == question}
    assert len(same) == len(world["good"])
    assert len({round(same[name]["logp_image"], 3) for name in ["im0.png", *EXTRA]}) == 1 + len(EXTRA)
    assert all(abs(r["logp_image"] - r["logp_text"]) > 1e-3 for r in same.values())
  assert metrics["train"]["steps"] == 1 and np.isfinite(metrics["train"]["last_loss"])
  assert os.path.exists(os.path.join(workdir, "train", "generator", "c3l_model.json"))
  final = metrics["final"]
  assert final["read"] == final["written"] + final["rejected"], final
  assert final["written"] > 0
  assert os.path.exists(os.path.join(workdir, "export", "c3l_vlit.json"))




def test_two_processes_resume_final_and_write_the_same_bytes(runs):
  """Two processes (which split the score and final shards between them, pictures of different token
  counts in each) kept the killed run's final shard (not redone) and wrote the rest; their score and
  final outputs equal the one-process run's, file for file and byte for byte, and so do the counts."""
  assert {"part-00000.done", "part-00000.jsonl"} <= set(runs["kept"])
  for name, mtime in runs["kept"].items():
    assert os.stat(os.path.join(runs["two"], "final", name)).st_mtime_ns == mtime, name
  one, two = runs["one"], runs["two"]
  for stage in ("score", "final"):  # shards for both processes
    assert len([p for p in os.listdir(os.path.join(one, stage)) if p.endswith(".done")]) >= 2, stage
  for stage in ("score", "final"):
    got, want = _tree(os.path.join(two, stage), two), _tree(os.path.join(one, stage), one)
    assert sorted(got) == sorted(want), stage
    for name in want:
      assert got[name] == want[name], (stage, name)
  metrics = json.load(open(os.path.join(two, "metrics.json")))
  for stage in ("score", "final"):
    strip = lambda m, w: json.loads(json.dumps(m).replace(w, "W"))  # noqa: E731
    assert strip(metrics[stage], two) == strip(runs["metrics"][stage], one), stage
