"""The whole pipeline through `launch.py`: initial -> filter -> score -> select -> train -> final -> export.

One uninterrupted run on a tiny taught model (see pipeline_world.py) with one of every bad input is the
reference; a run killed with SIGKILL at several points and resumed must export the same bytes.
"""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest

import pipeline_world as pw
from pipeline_world import rows as _rows, parts as _parts
from hf_reference import REPO

STAGES = ("initial", "filter", "score", "select", "train", "final", "export")
PER_IMAGE, NUM_FINAL = 3, 8


def _cmd(world, workdir, *extra):
  return [sys.executable, "launch.py", "--config=configs/llava15.py:tiny", f"--workdir={workdir}",
          f"--config.model.checkpoint={world['model']}", f"--config.data.records={world['records']}",
          f"--config.data.image_root={world['images']}", f"--config.data.max_pixels={pw.MAX_PIXELS}",
          "--config.generation.shard_size=3", "--config.generation.max_new_tokens=40",
          f"--config.generation.per_image={PER_IMAGE}", f"--config.generation.num_final={NUM_FINAL}",
          "--config.scoring.shard_size=4",
          "--config.train.steps=4", "--config.train.checkpoint_every=1", "--config.select.top_fraction=0.5",
          *extra]


class _Tags(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.images, self.rects = [], 0

  def handle_starttag(self, tag, attrs):
    if tag == "img":
      self.images.append(dict(attrs)["src"])
    self.rects += tag == "rect"


def _env():
  # The runs share JAX's persistent compilation cache (tests/conftest.py): a resumed run recompiles
  # nothing.
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}






@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return pw.make_world(str(tmp_path_factory.mktemp("pipeline")))


@pytest.fixture(scope="module")
def reference(world):
  workdir = os.path.join(world["root"], "reference")
  proc = subprocess.run(_cmd(world, workdir), cwd=REPO, capture_output=True, text=True, env=_env())
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "launch.stderr"), "w") as f:
    f.write(proc.stderr)
  with open(os.path.join(workdir, "launch.stdout"), "w") as f:
    f.write(proc.stdout)
  return workdir


def test_pipeline_end_to_end_exports_llava_json(world, reference):
  from transformers import AutoProcessor
  from c3l_jax.data.images import load_image

  with open(os.path.join(reference, "export", "c3l_vlit.json")) as f:
    data = json.load(f)
  assert data, "nothing survived to the export"
  assert len({d["id"] for d in data}) == len(data)
  processor = AutoProcessor.from_pretrained(world["model"], local_files_only=True)
  image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
  for d in data:
    assert set(d) == {"id", "image", "conversations"}
    human, gpt = d["conversations"]
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert human["value"].startswith("<image>\n") and gpt["value"].strip()
    # LLaVA training code renders the conversation with the model's processor: it must tokenise with
    # the image expanded to its patch tokens.
    conv = [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": human["value"][len("<image>\n"):]}]},
            {"role": "assistant", "content": [{"type": "text", "text": gpt["value"]}]}]
    text = processor.apply_chat_template(conv, tokenize=False)
    enc = processor(images=load_image(os.path.join(world["images"], d["image"])), text=text,
                    return_tensors="np")
    assert int((enc["input_ids"][0] == image_token).sum()) == 4  # (28 / 14)^2 patches
    assert enc["input_ids"].shape[1] > 4 + len(processor.tokenizer(gpt["value"]).input_ids) - 1

  # stats.json equals a recount of the JSON file.
  stats = json.load(open(os.path.join(reference, "export", "stats.json")))
  questions = [d["conversations"][0]["value"].replace("<image>", "").split() for d in data]
  answers = [d["conversations"][1]["value"].split() for d in data]
  assert stats["instances"] == len(data)
  assert stats["images"] == len({d["image"] for d in data})
  assert stats["avg_question_words"] == pytest.approx(sum(map(len, questions)) / len(data), abs=1e-4)
  assert stats["avg_answer_words"] == pytest.approx(sum(map(len, answers)) / len(data), abs=1e-4)
  assert sum(stats["instruction_types"].values()) == len(data)

  # report.html is self-contained: every image is an inlined PNG that decodes, the histogram has its
  # bars, and nothing points outside the file. (Headless Chromium is not available to the tests.)
  text = open(os.path.join(reference, "report.html"), encoding="utf-8").read()
  tags = _Tags()
  tags.feed(text)
  assert len(tags.images) == 2 * min(6, len(_parts(reference, "score")))  # best + worst samples
  for src in tags.images:
    assert src.startswith("data:image/png;base64,")
    PIL.Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
  scores = [r["i2c"] for r in _parts(reference, "score")]
  assert tags.rects == int(np.count_nonzero(np.histogram(scores, bins=30)[0]))  # one bar per non-empty bin
  assert "https://" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")


def test_bad_inputs_are_quarantined_with_reasons_and_counts_add_up(world, reference):
  rejected = _rows(os.path.join(reference, "initial", "rejected.jsonl"))
  by_line = {r["raw"].encode("utf-8", "replace") if isinstance(r["raw"], str) else None: r["reason"]
             for r in rejected if "line" in r}
  for raw, reason in pw.BAD_LINES.items():
    key = raw if b"\xff" not in raw else raw.decode("utf-8", "replace").encode("utf-8")
    assert reason in by_line[key], (raw, by_line.get(key))
  by_image = {r["image"]: r["reason"] for r in rejected if "image" in r}
  for image, reason in pw.BAD_IMAGES.items():
    assert reason in by_image[image], (image, by_image.get(image))
  assert len(rejected) == len(pw.BAD_LINES) + len(pw.BAD_IMAGES)
  # Every good image came through to generation.
  initial = _parts(reference, "initial")
  assert {r["image"] for r in initial} == {f"im{i}.png" for i in range(pw.GOOD_IMAGES)}

  # metrics.json: every stage's counts add up, and match the files.
  metrics = json.load(open(os.path.join(reference, "metrics.json")))
  assert set(metrics) == set(STAGES)
  m = metrics["initial"]
  assert m["read"] == m["images"] + m["rejected"] + m["repeated"]
  assert (m["images"], m["rejected"]) == (pw.GOOD_IMAGES, len(pw.BAD_IMAGES) + len(pw.BAD_LINES))
  assert m["repeated"] == 1  # im0_again: a second line for im0.png
  assert m["samples"] == m["written"] + m["samples_rejected"] == pw.GOOD_IMAGES * PER_IMAGE
  assert m["written"] == len(initial) and m["samples_rejected"] == 0
  assert m["rejected"] + m["samples_rejected"] == len(rejected)
  assert m["unparsable"] == sum(not r["question"] for r in initial)
  for stage in ("filter", "score", "select", "export"):
    m = metrics[stage]
    assert m["read"] + m.get("generated", 0) == m["written"] + m["rejected"], (stage, m)
    if stage != "export":
      assert m["written"] == len(_parts(reference, stage))
      assert m["rejected"] == len(_rows(os.path.join(reference, stage, "rejected.jsonl")))
  assert metrics["filter"]["read"] == metrics["initial"]["written"]
  assert metrics["score"]["read"] == metrics["filter"]["written"]
  m = metrics["select"]
  assert m["read"] == metrics["score"]["written"] and m["generated"] == 0
  assert m["written"] == m["positive"] + m["negative"] + m["unused"]
  select = _parts(reference, "select")
  contrasted = {r["image"] for r in select if r["role"] == "negative"}
  assert metrics["train"]["ce_examples"] == m["top_fraction"]
  assert metrics["train"]["groups"] == len(contrasted) == m["positive"]
  # final: the images its NUM_FINAL samples cycle over (the source's order: good ones, then bad ones).
  m = metrics["final"]
  items = [f"im{i}.png" for i in range(pw.GOOD_IMAGES)] + list(pw.BAD_IMAGES)
  used = [items[k % len(items)] for k in range(NUM_FINAL)]
  good = [im for im in used if im.startswith("im")]
  final_rejected = _rows(os.path.join(reference, "final", "rejected.jsonl"))
  assert m["read"] == m["images"] + m["rejected"] == len(set(used)) + len(pw.BAD_LINES)
  assert m["images"] == len(set(good))
  assert sorted(r["image"] for r in final_rejected if "image" in r) == sorted(set(used) - set(good))
  assert m["samples"] == m["written"] + m["samples_rejected"] == len(good)
  assert m["written"] == len(_parts(reference, "final")) and m["samples_rejected"] == 0
  assert m["rejected"] + m["samples_rejected"] == len(final_rejected)
  assert m["written"] == m["kept"] + m["filtered_out"]
  assert m["kept"] == len(_parts(reference, "final/filtered")) == metrics["export"]["read"]
  assert m["filtered_out"] == len(_rows(os.path.join(reference, "final", "filtered", "rejected.jsonl")))
  assert metrics["export"]["written"] == len(json.load(open(os.path.join(reference, "export",
                                                                          "c3l_vlit.json"))))
  # The filter's rejections carry their reasons (the taught model writes duplicates and bad output).
  reasons = [r["reason"] for r in _rows(os.path.join(reference, "filter", "rejected.jsonl"))]
  assert any(r.startswith("duplicate of") or r.startswith("near duplicate of") for r in reasons)
  assert {r["role"] for r in select} <= {"positive", "negative", "unused"}
  assert sum(r["top_fraction"] for r in select) == metrics["select"]["top_fraction"] >= 1

  # Progress: each sharded stage's tqdm bar (on the console) ran to N/N, and the stage logged one line
  # per shard it wrote (in WORKDIR/logs/run.log). The rate's format is not asserted: tqdm writes
  # `rec/s` or `s/rec` depending on the machine's speed.
  console = open(os.path.join(reference, "launch.stderr"), encoding="utf-8").read()
  log = open(os.path.join(reference, "logs", "run.log"), encoding="utf-8").read()
  for stage, folder in (("initial", "initial"), ("filter", "filter"), ("score", "score"),
                        ("select", "select"), ("final", "final"), ("final:filter", "final/filtered")):
    n = sum(name.endswith(".done") for name in os.listdir(os.path.join(reference, folder)))
    done = re.findall(rf"(?<![:\w]){stage}: 100%\|[^|]*\| (\d+)/(\d+) \[", console)
    assert done and all(a == b for a, b in done), (stage, done)
    assert sorted(int(i) for i in re.findall(rf"\] {stage}: shard (\d+) done \(", log)) == \
        list(range(n)), stage
  # A quiet console: no library log lines (they are in the log), a start and an end line per stage.
  stdout = open(os.path.join(reference, "launch.stdout"), encoding="utf-8").read()
  assert not re.search(r"^[IW]\d{4} ", console, flags=re.M), console[:2000]
  assert "orbax" not in console.lower() and "orbax" in log.lower()
  assert "libtpu" not in console and "PyTorch was not found" not in console
  for stage in STAGES:
    assert f"stage {stage}: start" in stdout and re.search(rf"^stage {stage}: done in ", stdout, re.M)


def test_strict_mode_stops_at_the_first_bad_input(world, tmp_path):
  proc = subprocess.run(_cmd(world, tmp_path / "w", "--config.strict=True"), cwd=REPO,
                        capture_output=True, text=True, env=_env())
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and "images.jsonl:3" in last and "malformed JSON" in last


def _run_until(world, workdir, marker, timeout=600):
  """Start a run; SIGKILL it as soon as `marker` exists under workdir. True if it was killed.

  The run kills itself right after `marker` is renamed into place (tests/kill_at.py), so where it stops
  does not depend on the machine's speed; polling for the file stays as a fallback."""
  cmd = _cmd(world, workdir)
  cmd = [cmd[0], os.path.join(REPO, "tests", "kill_at.py"), os.path.join(workdir, marker), *cmd[1:]]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=_env())
  deadline = time.time() + timeout
  while proc.poll() is None and time.time() < deadline:
    if os.path.exists(os.path.join(workdir, marker)):
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.05)
  if proc.returncode == -signal.SIGKILL:
    return True
  assert proc.returncode == 0
  return False


def test_kill_9_and_resume_exports_identical_bytes(world, reference, tmp_path):
  workdir = str(tmp_path / "killed")
  markers = ("initial/part-00000.done", "train/checkpoints/2", "final/part-00000.done")
  for marker in markers:
    assert _run_until(world, workdir, marker), f"the run finished before {marker} was written"
    # ... within that stage (initial's last shards take ~0.3 s, too little to rely on).
    if not marker.startswith("initial"):
      assert not os.path.exists(os.path.join(workdir, marker.split("/")[0], "DONE.json")), marker
  proc = subprocess.run(_cmd(world, workdir), cwd=REPO, capture_output=True, text=True, env=_env())
  assert proc.returncode == 0, proc.stderr[-4000:]
  for name in ("c3l_vlit.json", "stats.json"):
    with open(os.path.join(reference, "export", name), "rb") as a, \
         open(os.path.join(workdir, "export", name), "rb") as b:
      assert a.read() == b.read(), name
  for stage in ("initial", "filter", "score", "select", "final"):
    ids = [r["id"] for r in _parts(workdir, stage)]
    assert len(ids) == len(set(ids)), stage  # no duplicates
    assert ids == [r["id"] for r in _parts(reference, stage)], stage  # none missing, same order
  history = _rows(os.path.join(workdir, "train", "history.jsonl"))
  assert len(history) == 4 and history == _rows(os.path.join(reference, "train", "history.jsonl"))


@pytest.mark.parametrize("method", ["self_instruct", "vigc"])
def test_table5_selection_baselines_through_the_select_and_train_stages(world, reference, tmp_path, method):
  """`select.method` = Table 5's alternatives, run by launch.py on the reference run's scored samples:
  the select contract (per image at most one positive, its negatives from the same image, L_r on
  ceil(top_fraction x N) samples), counts that add up, and a train stage that trains on exactly them."""
  import math
  import shutil

  from c3l_jax.pipeline import baselines

  workdir = tmp_path / "w"
  shutil.copytree(os.path.join(reference, "score"), workdir / "score")
  proc = subprocess.run(_cmd(world, workdir, "--config.stages=select,train", "--config.train.steps=2",
                             f"--config.select.method={method}"),
                        cwd=REPO, capture_output=True, text=True, env=_env())
  assert proc.returncode == 0, proc.stderr[-4000:]
  metrics = json.load(open(workdir / "metrics.json"))
  m = metrics["select"]
  scored = _parts(reference, "score")
  rows = _parts(workdir, "select")
  assert m["read"] == len(scored) and m["rejected"] == 0
  assert m["read"] + m["generated"] == m["written"] + m["rejected"] == len(rows)
  assert m["written"] == m["positive"] + m["negative"] + m["unused"]
  assert [r["id"] for r in rows[:len(scored)]] == [r["id"] for r in scored]  # every input, in order
  by_image = {}
  for r in rows:
    by_image.setdefault(r["image"], []).append(r)
  for image, members in by_image.items():
    roles = [r["role"] for r in members]
    assert roles.count("positive") == (1 if "negative" in roles else 0), (image, roles)
  top = [r for r in rows if r["top_fraction"]]
  budget = math.ceil(0.5 * len(scored))  # _cmd's select.top_fraction
  if method == "self_instruct":
    assert m["generated"] == 0
    for members in by_image.values():
      kept = [r for r in members if r["select_reason"] == ""]
      for r in kept:
        assert 3 < len(r["question"].split()) <= 150
      assert len({(r["question"], r["answer"]) for r in kept}) == len(kept)
      assert all(baselines.rouge_l(a["question"], b["question"]) <= baselines.ROUGE_THRESHOLD
                 for i, a in enumerate(kept) for b in kept[i + 1:])
      for r in members:
        if r["role"] == "positive":
          assert r is kept[0]
        elif r["role"] == "negative":
          assert r["select_reason"]
    assert any(r["select_reason"] for r in rows)  # "describe the image" has 3 words
    survivors = [r for r in rows if r["select_reason"] == ""]
    assert len(top) == min(budget, len(survivors)) and all(r["select_reason"] == "" for r in top)
  else:
    vigc = rows[len(scored):]
    assert m["generated"] == len(vigc) >= 1
    firsts = {}
    for r in scored:
      firsts.setdefault(r["image"], r)
    for r in vigc:
      src = firsts[r["image"]]
      assert r["id"] == f"{src['id']}_vigc" and r["generator"] == "vigc_iterative"
      assert r["question"] == src["question"] and r["answer"] == r["output"] and r["answer"].strip()
      assert math.isfinite(r["i2c"]) and r["n_tokens"] >= 1 and r["role"] == "positive"
      assert len(re.findall(r"[.!?](?=\s|$)", r["answer"])) <= baselines.VIGC_MAX_ROUNDS
    assert sorted(r["image"] for r in vigc) == sorted({r["image"] for r in vigc})  # one per image
    assert {r["id"] for r in rows if r["role"] == "positive"} == {r["id"] for r in vigc}
    assert all(r["role"] in ("negative", "unused") for r in rows[:len(scored)])
    assert len(top) == min(budget, len(vigc)) and all(r["generator"] == "vigc_iterative" for r in top)
  # The train stage uses exactly this selection: L_r on the top fraction, L_c on the contrasted images.
  train = metrics["train"]
  assert train["ce_examples"] == m["top_fraction"] == len(top)
  assert train["groups"] == m["positive"] == len({r["image"] for r in rows if r["role"] == "negative"})
  assert (workdir / "train" / "generator" / "c3l_model.json").exists()
