"""`launch.py --config.stages=eval` on a tiny converted checkpoint (one subprocess run): POPE built from
annotations, SEED-Bench by option likelihood (checked against transformers), MMBench with CircularEval,
the LLaVA-Bench answers file, metrics.json and the printed table. (The eval stage on the shipped scenes
checkpoint runs in tests/test_scenes_demo.py.)"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from c3l_jax.data.images import load_image
from c3l_jax.data.prompts import PromptBuilder, load_processor
from c3l_jax.eval import multiple_choice as mc
from c3l_jax.eval import pope
from c3l_jax.convert import convert
from hf_reference import REPO, make_hf_llava, make_tiny_processor, torch_answer_logprobs

ANNOTATIONS = [
    {"image": "im1.png", "objects": ["dog", "car", "tree"]},
    {"image": "im2.png", "objects": ["dog", "cat", "car"]},
    {"image": "im3.png", "objects": ["cat", "tree", "sky", "car"]},
    {"image": "im4.png", "objects": ["bird", "boat"]},  # 2 objects: not drawn
    {"image": "im5.png", "objects": ["dog", "tree", "sky"]},  # not on disk: its questions are rejected
]
# Bad lines of the POPE annotation file (quarantined with their line number and reason).
BAD_ANNOTATIONS = ['{"image": "im1.png", "objects": ', '{"image": "im2.png", "objects": "dog"}']
SEED = [("how many objects are there?", ("one", "two", "three", "four"), "B", "im1.png", 5),
        ("what color is the circle?", ("red", "blue", "green", "yellow"), "A", "im2.png", 3),
        ("where is the dog?", ("on the left", "on the right", "at the top", "in the middle"), "D",
         "im3.png", 4)]


def _png(path, seed):
  rng = np.random.default_rng(seed)
  PIL.Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  hf = make_hf_llava(str(root / "hf"), logit_scale=8.0)
  make_tiny_processor(str(root / "hf"))
  convert(str(root / "hf"), str(root / "model"))  # in-process: no second interpreter start-up
  images = root / "images"
  (images / "images").mkdir(parents=True)
  for i in range(1, 5):
    _png(images / f"im{i}.png", i)
  with open(root / "pope.jsonl", "w") as f:
    f.writelines([json.dumps(a) + "\n" for a in ANNOTATIONS] + [b + "\n" for b in BAD_ANNOTATIONS])
  questions = [{"answer": ans, **{f"choice_{c}": o for c, o in zip("abcd", opts)}, "data_id": im,
                "data_type": "image", "question": q, "question_id": str(100 + i), "question_type_id": t}
               for i, (q, opts, ans, im, t) in enumerate(SEED)]
  questions.append({**questions[0], "data_type": "video", "question_id": "v1", "question_type_id": 10})
  questions.append({**questions[0], "question_id": "103", "data_id": "missing.png"})  # image rejected
  questions.append({k: v for k, v in questions[1].items() if k != "choice_d"} | {"question_id": "104"})
  (root / "seed.json").write_text(json.dumps({"questions": questions, "question_type": {
      "Instance Attributes": 3, "Instance Location": 4, "Instances Counting": 5}}))
  buf = io.BytesIO()
  PIL.Image.open(images / "im1.png").save(buf, format="PNG")
  b64 = base64.b64encode(buf.getvalue()).decode()
  rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"],
          ["1", "what color is the circle?", "nan", "red", "blue", "green", "yellow", "B", "attribute",
           b64],
          ["2", "is there a dog?", "look at the image", "yes", "no", "nan", "", "A", "existence", "1"],
          # not an image: rejected once (with every rotation in generate mode), never half-scored
          ["3", "which shape is it?", "nan", "circle", "square", "triangle", "star", "C", "attribute",
           base64.b64encode(b"hello").decode()],
          ["4", "which shape is it?", "nan", "circle", "square", "", "", "A", "attribute", "not*base64"]]
  (root / "mmb.tsv").write_text("\n".join("\t".join(r) for r in rows) + "\n")
  with open(root / "images" / "questions.jsonl", "w") as f:
    for qid, im in ((0, "im1.png"), (1, "im2.png"), (2, "missing.png")):
      f.write(json.dumps({"question_id": qid, "image": im, "text": "describe the image",
                          "category": "detail"}) + "\n")
    f.write('{"question_id": 3, "image": "im1.png"}\n')  # no text
  for i in (1, 2):
    _png(images / "images" / f"im{i}.png", i)
  workdir = root / "w"
  cmd = [sys.executable, "launch.py", "--config=configs/llava15.py:tiny", f"--workdir={workdir}",
         "--config.stages=eval", f"--config.eval.checkpoint={root / 'model'}",
         "--config.eval.benchmarks=pope,seed,mmbench,llava_bench",
         f"--config.eval.pope_annotations={root / 'pope.jsonl'}", f"--config.eval.pope_images={images}",
         f"--config.eval.seed_bench_json={root / 'seed.json'}", f"--config.eval.seed_bench_images={images}",
         f"--config.eval.mmbench_tsv={root / 'mmb.tsv'}", f"--config.eval.llava_bench_dir={images}",
         "--config.eval.max_new_tokens=3", "--config.eval.long_max_new_tokens=3",
         "--config.data.eval_batch_size=8",
         "--config.scoring.prefix_sharing=False"]  # equal results (test_scoring), fewer compiles here
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
  # The same multiple-choice benchmarks answered by a generated letter (eval.mc_mode=generate).
  gen_workdir = root / "w_generate"
  gen_cmd = [c for c in cmd if not c.startswith(("--workdir=", "--config.eval.benchmarks="))]
  gen_proc = subprocess.run(gen_cmd + [f"--workdir={gen_workdir}", "--config.eval.benchmarks=seed,mmbench",
                                       "--config.eval.mc_mode=generate"],
                            cwd=REPO, capture_output=True, text=True, env=env)
  return dict(root=root, hf=hf, images=images, model=str(root / "model"), proc=proc, workdir=workdir,
              gen_proc=gen_proc, gen_workdir=gen_workdir, cmd=cmd, env=env)


def _rejected(directory):
  """The quarantine a benchmark wrote (`directory/rejected.jsonl`), in order."""
  with open(os.path.join(directory, "rejected.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _parts(directory):
  rows = []
  for name in sorted(os.listdir(directory)):
    if name.startswith("part-") and name.endswith(".jsonl") and "rejected" not in name:
      with open(os.path.join(directory, name)) as f:
        rows += [json.loads(line) for line in f if line.strip()]
  return rows


def test_eval_stage_tiny_checkpoint(corpus):
  proc, w = corpus["proc"], corpus["workdir"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.load(open(w / "metrics.json"))["eval"]
  assert metrics["checkpoint"] == corpus["model"]

  # POPE: 3 eligible images x (3 yes + 3 no) per split; metrics are those of the answers written.
  p = metrics["pope"]
  assert p["source"] == "annotations" and p["objects_per_image"] == 3
  bad_lines = _rejected(w / "eval" / "pope")
  assert [(b["line"], b["raw"]) for b in bad_lines] == [
      (len(ANNOTATIONS) + 1 + i, raw) for i, raw in enumerate(BAD_ANNOTATIONS)]
  assert p["annotations_rejected"] == 2
  # 4 drawn images x 6 questions per split; im5.png's 6 are rejected (missing image) in each split.
  assert (p["read"], p["n"], p["rejected"], p["unasked"]) == (72, 54, 18, 0)
  f1s = []
  for split in pope.SPLITS:
    rows = _parts(w / "eval" / f"pope_{split}")
    assert len(rows) == 18 and [r["label"] for r in rows].count("yes") == 9
    assert {r["image"] for r in rows} == {"im1.png", "im2.png", "im3.png"}
    bad = _rejected(w / "eval" / f"pope_{split}")
    assert len(bad) == 6 and all(b["raw"]["image"] == "im5.png" and "missing" in b["reason"] for b in bad)
    want = pope.metrics([pope.parse_yes_no(r["answer"]) for r in rows], [r["label"] for r in rows])
    assert p[split] == want
    f1s.append(want["f1"])
    with open(w / "eval" / "pope" / f"annotations_pope_{split}.json") as f:
      official = [json.loads(line) for line in f]
    assert [q["text"] for q in official if q["image"] != "im5.png"] == [r["text"] for r in rows]
  assert p["mean_f1"] == pytest.approx(sum(f1s) / 3)

  # SEED (image questions only) by option likelihood = transformers' mean answer log-prob.
  seed_rows = _parts(w / "eval" / "seed")
  assert [r["id"] for r in seed_rows] == ["100", "101", "102"]
  builder = PromptBuilder(load_processor(corpus["model"]))
  correct = 0
  for row, (question, options, answer, image, _) in zip(seed_rows, SEED):
    ids, pixels = builder.encode_prompt(question, load_image(str(corpus["images"] / image)))
    want = [float(np.mean(torch_answer_logprobs(corpus["hf"], ids, builder.encode_answer(o),
                                                pixels)[0])) for o in options]
    np.testing.assert_allclose(row["scores"], want, atol=1e-3)
    assert row["predictions"][0] == int(np.argmax(want))
    correct += "ABCD"[int(np.argmax(want))] == answer
  assert metrics["seed"]["n"] == 3 and metrics["seed"]["overall"] == pytest.approx(100 * correct / 3)
  # 5 image questions read (the video one is out of scope): 103's image is missing, 104 has no choice_d.
  assert (metrics["seed"]["read"], metrics["seed"]["rejected"], metrics["seed"]["unasked"]) == (5, 2, 0)
  bad = _rejected(w / "eval" / "seed")
  assert [(b["raw"].get("question_id", b["raw"].get("id")), b["reason"][:20]) for b in bad] == [
      ("104", "missing field 'choic"), ("103", "missing image file /")]
  assert metrics["seed"]["mode"] == "loglik"

  # MMBench: 4 and 2 options (row 2 reuses row 1's image), CircularEval over the rotations.
  mmb = _parts(w / "eval" / "mmbench")
  assert [len(r["targets"]) for r in mmb] == [4, 2] and mmb[0]["targets"] == [1, 0, 3, 2]
  right = [r["predictions"] == r["targets"] for r in mmb]
  assert metrics["mmbench"]["overall"] == pytest.approx(50.0 * sum(right))
  assert metrics["mmbench"]["circular"] is True
  assert (metrics["mmbench"]["read"], metrics["mmbench"]["n"], metrics["mmbench"]["rejected"]) == (4, 2, 2)
  bad = _rejected(w / "eval" / "mmbench")
  assert [(b["raw"].get("index", b["raw"].get("id")), b["reason"]) for b in bad][0] == (
      "4", "image is not valid base64")
  assert bad[1]["raw"]["id"] == "3" and "image" in bad[1]["reason"]

  # LLaVA-Bench: LLaVA's answer-file format.
  with open(w / "eval" / "llava_bench_answers.jsonl") as f:
    answers = [json.loads(line) for line in f]
  assert [a["question_id"] for a in answers] == [0, 1]
  assert all(a["prompt"] == "describe the image" and a["model_id"] == "model" for a in answers)
  lb = metrics["llava_bench"]
  assert (lb["read"], lb["n"], lb["rejected"]) == (4, 2, 2)
  bad = _rejected(w / "eval" / "llava_bench")
  assert [b["reason"][:20] for b in bad] == ["missing field 'text'", "missing image file /"]

  # The printed Table-1 row.
  table = (w / "eval" / "table.txt").read_text()
  assert table in proc.stdout
  header, row = table.splitlines()[:2]
  assert header.split() == ["Method", "SEED", "LLaVA^W", "MMB", "POPE"]
  assert row.split() == ["model", f"{metrics['seed']['overall']:.1f}", "judge",
                         f"{metrics['mmbench']['overall']:.1f}", f"{100 * p['mean_f1']:.1f}"]
  assert metrics["table"]["POPE"] == f"{100 * p['mean_f1']:.1f}"
  assert not math.isnan(p["mean_accuracy"])


def test_eval_stage_generated_letters(corpus):
  """`eval.mc_mode=generate`: every rotation's reply is transformers' greedy continuation of LLaVA's
  multiple-choice prompt (3 new tokens), its prediction is `parse_choice` of that reply, and the
  accuracies (SEED: the original order; MMBench: CircularEval, every rotation right) recount from the
  written rows."""
  import torch

  proc, w = corpus["gen_proc"], corpus["gen_workdir"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.load(open(w / "metrics.json"))["eval"]
  assert set(metrics) >= {"seed", "mmbench"} and "pope" not in metrics
  builder = PromptBuilder(load_processor(corpus["model"]))
  items = {"seed": mc.load_seed_bench(str(corpus["root"] / "seed.json"), str(corpus["images"])),
           "mmbench": mc.load_mmbench(str(corpus["root"] / "mmb.tsv"))}
  for name, circular in (("seed", False), ("mmbench", True)):
    rows = _parts(w / "eval" / name)
    items[name] = items[name][0]
    good = [it for it in items[name] if it.id != "3" and "missing" not in it.image]
    assert [r["id"] for r in rows] == [it.id for it in good]
    replies = _parts(w / "eval" / f"{name}_rotations")
    assert len(replies) == sum(len(it.options) if circular else 1 for it in good)
    right = []
    for row, item in zip(rows, good):
      image = (load_image(str(corpus["images"] / item.image)) if item.image_bytes is None
               else PIL.Image.open(io.BytesIO(item.image_bytes)).convert("RGB"))
      rotations = range(len(item.options)) if circular else range(1)
      assert len(row["outputs"]) == len(rotations) and "scores" not in row
      for r in rotations:
        options, target = mc.rotated(item, r)
        ids, pixels = builder.encode_prompt(mc.choice_prompt(item, options), image)
        with torch.no_grad():
          out = corpus["hf"].generate(input_ids=torch.as_tensor([ids]), pixel_values=torch.as_tensor(
              pixels[None]), max_new_tokens=3, do_sample=False)
        want = builder.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip()
        assert row["outputs"][r] == want, (name, item.id, r)
        assert row["predictions"][r] == mc.parse_choice(want, options)
        assert row["targets"][r] == target == options.index(item.options[item.answer])
      right.append(all(row["predictions"][r] == row["targets"][r] for r in rotations))
    assert metrics[name]["mode"] == "generate" and metrics[name]["circular"] is circular
    assert metrics[name]["n"] == len(rows)
    assert metrics[name]["overall"] == pytest.approx(100 * sum(right) / len(right))
  bad = _rejected(w / "eval" / "mmbench")
  assert [b["raw"].get("index", b["raw"].get("id")) for b in bad] == ["4", "3"]
  assert "image" in bad[1]["reason"]  # rejected once, not once per rotation
  assert metrics["mmbench"]["rejected"] == 2 and metrics["seed"]["rejected"] == 2
  for name in ("seed", "mmbench"):
    m = metrics[name]
    assert m["read"] == m["n"] + m["rejected"] + m["unasked"]


SCENES = os.path.join(REPO, "checkpoints", "scenes_tiny")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
  """`--config.stages=eval` of the shipped scenes checkpoint itself (the demo's config, no other stage)."""
  if not os.path.exists(os.path.join(SCENES, "c3l_model.json")):
    pytest.skip("the shipped scenes checkpoint is missing")
  root = tmp_path_factory.mktemp("eval_shipped")
  cmd = [sys.executable, "launch.py", f"--workdir={root / 'w'}", "--config.stages=eval",
         "--config.eval.checkpoint=checkpoints/scenes_tiny",  # relative to the repository, as typed
         f"--config.data.tfds_dir={root / 'tfds'}", "--config.data.scenes_images=40",
         "--config.eval.pope_num_images=4", "--config.eval.max_items=8", "--config.eval.max_new_tokens=4",
         "--config.data.eval_batch_size=8"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return root / "w", proc


def test_eval_stage_on_the_shipped_scenes_checkpoint(shipped):
  """Eval only: POPE on held-out scenes (present objects are the scene's shapes, absent ones are not),
  metrics that recount from the written answers, and the Table-1 row named after the checkpoint."""
  from c3l_jax import scenes
  from c3l_jax.scenes import dataset as scenes_tfds

  w, proc = shipped
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = json.load(open(w / "metrics.json"))
  assert list(metrics) == ["eval"] and not (w / "train").exists()
  ev = metrics["eval"]
  assert ev["checkpoint"] == "checkpoints/scenes_tiny"
  held_out = scenes.generate_world(scenes_tfds.default_num_val(40), 0, start_id=40)  # the val split
  world = {s.file_name: s for s in held_out}
  p = ev["pope"]
  assert p["source"] == "scenes"
  f1s = []
  for split in pope.SPLITS:
    rows = _parts(w / "eval" / f"pope_{split}")
    assert len(rows) == 8 == p[split]["n"]
    for r in rows:
      assert (r["object"] in scenes.object_names(world[r["image"]])) == (r["label"] == "yes"), r
    predicted = [pope.parse_yes_no(r["answer"]) for r in rows]
    tp = sum(a == "yes" and r["label"] == "yes" for a, r in zip(predicted, rows))
    fp = sum(a == "yes" and r["label"] == "no" for a, r in zip(predicted, rows))
    fn = sum(a != "yes" and r["label"] == "yes" for a, r in zip(predicted, rows))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    assert p[split]["f1"] == pytest.approx(f1)
    f1s.append(f1)
  assert p["mean_f1"] == pytest.approx(sum(f1s) / 3)
  vqa = ev["scenes_vqa"]
  assert vqa["questions"] == 16 and 0.0 <= vqa["accuracy"] <= 1.0
  # The answers file recounts to the accuracy, each verdict against the held-out scene's annotation
  # (whose reference answer is right for it).
  with open(w / "eval" / "scenes_vqa_answers.jsonl") as f:
    answers = [json.loads(line) for line in f]
  assert len(answers) == 16 and vqa["answers"] == str(w / "eval" / "scenes_vqa_answers.jsonl")
  for r in answers:
    assert scenes.check(world[r["image"]], r["question"], r["reference"]).correct is True, r
    assert r["correct"] == scenes.check(world[r["image"]], r["question"], r["answer"]).correct, r
  assert vqa["accuracy"] == pytest.approx(sum(r["correct"] is True for r in answers) / 16)

  table = (w / "eval" / "table.txt").read_text()
  assert table in proc.stdout
  header, row = table.splitlines()[:2]
  assert header.split() == ["Method", "SEED", "LLaVA^W", "MMB", "POPE"]
  assert row.split() == ["scenes_tiny", "-", "-", "-", f"{100 * sum(f1s) / 3:.1f}"]
  assert proc.stdout.strip().splitlines()[-1] == f"workdir: {w} (metrics.json, eval/table.txt)"


def test_eval_stage_strict_mode_stops_at_the_first_bad_input(corpus, tmp_path):
  cmd = [c for c in corpus["cmd"] if not c.startswith("--workdir=")]
  proc = subprocess.run(cmd + [f"--workdir={tmp_path / 'w'}", "--config.strict=True"], cwd=REPO,
                        capture_output=True, text=True, env=corpus["env"])
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  line = len(ANNOTATIONS) + 1
  assert last.startswith("error:") and f"pope.jsonl:{line}: malformed JSON" in last, last


def _tree(directory, workdir):
  """Every file under `directory` (relative path -> bytes), the workdir's path replaced by "W"."""
  out = {}
  for base, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read().replace(str(workdir).encode(), b"W")
  return out


def test_eval_stage_kill_9_and_resume_writes_identical_bytes(corpus, tmp_path):
  """SIGKILL once POPE's popular split is written (adversarial, SEED, MMBench and LLaVA-Bench not yet),
  rerun: every file under eval/ and the metrics equal the uninterrupted run's, byte for byte."""
  import signal
  import time

  assert corpus["proc"].returncode == 0
  workdir = tmp_path / "w"
  cmd = [c for c in corpus["cmd"] if not c.startswith("--workdir=")] + [f"--workdir={workdir}"]
  marker = workdir / "eval" / "pope_popular" / "part-00000.done"
  # The run kills itself right after the marker is renamed into place (tests/kill_at.py): the same
  # point of the run on any machine. Polling for the marker stays as a fallback.
  killing = [cmd[0], os.path.join(REPO, "tests", "kill_at.py"), str(marker), *cmd[1:]]
  proc = subprocess.Popen(killing, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=corpus["env"])
  deadline = time.time() + 600
  while proc.poll() is None and not marker.exists() and time.time() < deadline:
    time.sleep(0.02)
  assert proc.poll() in (None, -signal.SIGKILL), "the run ended before it could be killed"
  if proc.poll() is None:
    os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (workdir / "metrics.json").exists()
  assert not (workdir / "eval" / "llava_bench_answers.jsonl").exists()  # the last benchmark: not reached
  kept = {p: p.stat().st_mtime_ns for p in (workdir / "eval").glob("pope_*/part-*.jsonl")}
  assert len(kept) >= 2
  rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=corpus["env"])
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  got, want = _tree(workdir / "eval", workdir), _tree(corpus["workdir"] / "eval", corpus["workdir"])
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name] == want[name], name
  for path, mtime in kept.items():  # the finished chunks were kept, not redone
    assert path.stat().st_mtime_ns == mtime, path
  metrics = lambda w: json.loads(  # noqa: E731
      (w / "metrics.json").read_text().replace(str(w), "W"))["eval"]
  assert metrics(workdir) == metrics(corpus["workdir"])
