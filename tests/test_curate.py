"""Curating an existing LLaVA-format dataset (`configs/curate.py`, `c3l_jax/pipeline/curate.py`).

Real data: the mix665k slice and the ScienceQA slice in `tests/fixtures/llava-data/` (their images are
not published with them; random stand-ins are written under the same paths). The model is the tiny
LLaVA with the published llava-1.5-7b-hf files (`real_files.tiny_real_llava`); the reference for every
turn's S(I2C) is transformers' PyTorch model in fp32 fed by transformers' own processor, with the
conversation laid out by LLaVA's rule written out here (`<image>` moved to the front of the first
question).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import real_files
from c3l_jax.data import llava_data
from c3l_jax.data.records import read_records
from c3l_jax.pipeline import curate
from hf_reference import REPO, torch_i2c

DATA = os.path.join(real_files.FIXTURES, "llava-data")
MIX = os.path.join(DATA, "llava_v1_5_mix665k_entries_31-100.json")
SQA = os.path.join(DATA, "scienceqa_llava_test_CQM-A_2001-2040.json")
# Entries of the mix665k slice: 1 turn (<image> in front), 3 turns (behind), 5 turns (in front).
PARITY = {"000000562394": (1, True), "000000317730": (3, False), "000000040068": (5, True)}


def _load(path):
  with open(path) as f:
    return json.load(f)


def _write_images(root, entries, seed=0):
  rng = np.random.default_rng(seed)
  for e in entries:
    if "image" in e:
      path = os.path.join(root, e["image"])
      os.makedirs(os.path.dirname(path), exist_ok=True)
      h, w = rng.integers(40, 90, 2)
      PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format="JPEG")


def _config(model_dir, image_root, records="", prefix_sharing=True):
  import configs.curate

  config = configs.curate.get_config()
  with config.unlocked():
    config.model.checkpoint = model_dir
    config.model.dtype = config.model.param_dtype = "float32"
    config.data.image_root = str(image_root)
    config.data.records = str(records)
    config.scoring.batch_size = 4
    config.scoring.prefix_sharing = prefix_sharing
  return config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("curate")
  model = real_files.tiny_real_llava(root / "model", real_files.TINY_REAL_TEXT,
                                     real_files.TINY_REAL_VISION)
  images = root / "images"
  _write_images(images, _load(MIX) + _load(SQA))
  return dict(model, images=images)


def _reference_turns(tiny, entry):
  """Every gpt turn's S(I2C), logp_image, logp_text from transformers, laid out by LLaVA's rule."""
  from transformers import AutoProcessor

  processor = AutoProcessor.from_pretrained(tiny["hf"])
  image = PIL.Image.open(os.path.join(tiny["images"], entry["image"])).convert("RGB")
  values = [c["value"] for c in entry["conversations"]]
  values[0] = values[0].replace("<image>", "").strip()  # LLaVA's preprocess_multimodal
  out = []
  for k in range(len(values) // 2):
    def messages(with_image):
      msgs = []
      for j in range(k + 1):
        content = [{"type": "text", "text": values[2 * j]}]
        if j == 0 and with_image:
          content = [{"type": "image"}] + content
        msgs.append({"role": "user", "content": content})
        if j < k:
          msgs.append({"role": "assistant", "content": [{"type": "text", "text": values[2 * j + 1]}]})
      return msgs
    text_v = processor.apply_chat_template(messages(True), add_generation_prompt=True)
    text_d = processor.apply_chat_template(messages(False), add_generation_prompt=True)
    enc = processor(images=image, text=text_v, return_tensors="np")
    ids_v, pixels = enc["input_ids"][0].tolist(), enc["pixel_values"][0]
    ids_d = processor.tokenizer(text_d).input_ids
    answer = processor.tokenizer(values[2 * k + 1], add_special_tokens=False).input_ids
    out.append(torch_i2c(tiny["torch"], ids_v, ids_d, answer, pixels))
  return out


def test_each_turn_matches_transformers(tiny):
  """Per-turn eq. 1 (and both log-prob sums) of conversations of 1, 3 and 5 turns, `<image>` in front
  and behind, equal transformers' (fp32, 1e-3): scored as one sequence per conversation (the default:
  `curate.one_sequence`), turn by turn with one image prefix per conversation, and turn by turn with
  no sharing at all."""
  from c3l_jax.pipeline import common

  entries = [e for e in _load(MIX) if e["id"] in PARITY]
  for e in entries:  # the fixture holds what the test says it covers
    n, front = PARITY[e["id"]]
    assert len(e["conversations"]) == 2 * n and e["conversations"][0]["value"].startswith("<image>") == front
  want = {e["id"]: _reference_turns(tiny, e) for e in entries}
  chunk = [(llava_data.Raw(i, e), None, llava_data.check_entry(e, str(tiny["images"]))[1])
           for i, e in enumerate(entries)]
  config = _config(tiny["ours"], tiny["images"])
  inf = common.Inference(config)
  image = PIL.Image.open(os.path.join(tiny["images"], entries[-1]["image"])).convert("RGB")
  assert curate.one_sequence("k", inf.builder.encode_conversation(chunk[-1][2].turns, image)) is not None
  for whole, sharing in ((True, True), (False, True), (False, False)):
    config.scoring.prefix_sharing = sharing
    rows, rejected = curate.score_shard(config, chunk, inf, curate.make_scorer_for(config, inf), whole)
    assert not rejected and [r["id"] for r in rows] == [e["id"] for e in entries]
    for row in rows:
      ref = want[row["id"]]
      assert len(row["turns"]) == len(ref)
      for k, w in enumerate(ref):
        assert abs(row["turns"][k] - w["i2c"]) <= 1e-3, (whole, sharing, row["id"], k)
        assert abs(row["logp_image"][k] - w["logp_image"]) <= 1e-3 + 1e-4 * abs(w["logp_image"])
        assert abs(row["logp_text"][k] - w["logp_text"]) <= 1e-3 + 1e-4 * abs(w["logp_text"])
        assert row["turn_tokens"][k] == w["n_tokens"]
      assert row["i2c"] == pytest.approx(sum(row["turns"]), abs=1e-9)
      assert row["i2c_per_token"] == pytest.approx(row["i2c"] / sum(row["turn_tokens"]), abs=1e-12)
  # Not vacuous: the image moves every conversation's log-probs.
  assert all(abs(w["logp_image"] - w["logp_text"]) > 0.1 for ref in want.values() for w in ref)


def test_stream_reads_json_and_jsonl_alike(tmp_path):
  """The array and the same entries as JSONL stream to the same values; the format is detected; a
  malformed JSONL line is a quarantine row, a malformed array a clear error."""
  entries = _load(MIX)[:5] + _load(SQA)[:5]
  (tmp_path / "a.json").write_text(json.dumps(entries, indent=2))
  (tmp_path / "a.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries) + "{not json\n")
  assert llava_data.detect_format(str(tmp_path / "a.json")) == "json"
  assert llava_data.detect_format(str(tmp_path / "a.jsonl")) == "jsonl"
  from_json = list(llava_data.iter_entries(str(tmp_path / "a.json")))
  from_jsonl = list(llava_data.iter_entries(str(tmp_path / "a.jsonl")))
  assert [r.value for r in from_json] == entries == [r.value for r in from_jsonl[:-1]]
  assert from_jsonl[-1].problem.startswith("malformed JSON") and from_jsonl[-1].line == 11
  (tmp_path / "bad.json").write_text(json.dumps(entries)[:-30])
  with pytest.raises(llava_data.BadInput, match="not a valid JSON array after entry 9"):
    list(llava_data.iter_entries(str(tmp_path / "bad.json")))


def test_id_set_agrees_with_a_set():
  rng = np.random.default_rng(0)
  ids = [str(x) for x in rng.integers(0, 3000, 5000)] + [int(x) for x in rng.integers(0, 3000, 2000)]
  seen, ours = set(), llava_data.IdSet(capacity=4)
  for i in ids:
    key = (type(i), i)
    assert ours.add(i) == (key not in seen)
    seen.add(key)
  assert len(ours) == len(seen)


def test_select_by_hand():
  scores = np.array([5.0, 1.0, 4.0, 4.0, 0.5, 3.0, 2.0, 9.0, 0.1, 0.2])
  src = ["a", "a", "a", "a", "a", "a", "a", "b", "c", "c"]
  # Global: ceil(0.25 * 10) = 3 -> 9.0 (7), 5.0 (0), then the tie 4.0 goes to the earlier (2).
  assert curate.select(scores, src, 0.25).tolist() == [0, 2, 7]
  assert curate.select(scores, src, 0.25, count=4).tolist() == [0, 2, 3, 7]
  assert curate.select(scores, src, 0.01).tolist() == [7]  # at least one
  # Balanced by fraction: a: ceil(0.25 * 7) = 2 (0, 2); b: 1 (7); c: ceil(0.5) = 1 (9: 0.2 > 0.1).
  assert curate.select(scores, src, 0.25, balance=True).tolist() == [0, 2, 7, 9]
  # Balanced by count 5: shares 3.5 / 0.5 / 1.0 -> 3 / 0 / 1, one left for the largest remainder (a
  # and b tie at .5; a is larger) -> a 4 (0, 2, 3, 5), c 1 (9).
  assert curate.select(scores, src, 0.1, count=5, balance=True).tolist() == [0, 2, 3, 5, 9]
  assert curate.quota(0, 0.1, 0) == 0 and curate.quota(7, 0.1, 0) == 1 and curate.quota(7, 0.1, 9) == 7


# --------------------------------------------------------------------------------------------------
# The one command on a hand-made file with every kind of bad entry.

def _conv(*values):
  return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def _hand_made(tmp_path, images):
  """(entries, {id: the start of its quarantine reason}, the good ids, the text-only ids)."""
  mix, sqa = _load(MIX), _load(SQA)
  good = [mix[9], mix[15], dict(mix[58], id="gqa-1", image="gqa/images/1.jpg")]
  _write_images(images, [good[2]], seed=3)
  text_only = [e for e in sqa if "image" not in e][:2]
  q, a, img = "<image>\nWhat is this?", "A cat.", mix[9]["image"]
  (images / "corrupt").mkdir()
  (images / "corrupt" / "x.jpg").write_bytes(b"not really a jpeg")
  outside = tmp_path / "outside.jpg"
  PIL.Image.new("RGB", (30, 30)).save(outside)
  (images / "links").mkdir()
  os.symlink(outside, images / "links" / "out.jpg")
  bad = {
      "no-conv": ({"image": img}, "no conversations"),
      "empty-conv": ({"image": img, "conversations": []}, "no conversations"),
      "conv-dict": ({"image": img, "conversations": {"from": "human"}}, "'conversations' is not a list"),
      "gpt-first": ({"image": img, "conversations": _conv(q, a)[::-1]}, "turns do not alternate"),
      "two-humans": ({"image": img, "conversations": [_conv(q)[0], _conv(q)[0]]},
                     "turns do not alternate"),
      "no-answer": ({"image": img, "conversations": _conv(q, a, "And?")}, "turns do not alternate"),
      "empty-value": ({"image": img, "conversations": _conv(q, " ")}, "empty value in turn 1"),
      "tag-missing": ({"image": img, "conversations": _conv("What?", a)}, "<image> missing"),
      "tag-twice": ({"image": img, "conversations": _conv("<image>\nWhat?\n<image>", a)},
                    "<image> repeated"),
      "tag-later": ({"image": img, "conversations": _conv(q, a, "<image> and?", a)},
                    "<image> outside the first human turn (turn 2"),
      "no-file": ({"image": "coco/none.jpg", "conversations": _conv(q, a)}, "missing image file"),
      "corrupt": ({"image": "corrupt/x.jpg", "conversations": _conv(q, a)}, "not an image file"),
      "dotdot": ({"image": "../outside.jpg", "conversations": _conv(q, a)}, "image path '../outside.jpg' "
                 "leaves data.image_root"),
      "absolute": ({"image": str(outside), "conversations": _conv(q, a)}, "image path"),
      "symlink": ({"image": "links/out.jpg", "conversations": _conv(q, a)}, "image path 'links/out.jpg' is "
                  "a symlink"),
      "too-long": ({"image": img, "conversations": _conv(q, "cat " * 5000)}, "conversation of "),
      "text-with-tag": ({"conversations": _conv(q, a)}, "<image> in turn 0 of an entry without an image"),
  }
  entries = [good[0], text_only[0]]
  for eid, (entry, _) in bad.items():
    entries.append({"id": eid, **entry})
  entries += [good[1], dict(good[1], conversations=_conv(q, a)), text_only[1], good[2],
              {"conversations": _conv(q, a), "image": img}]
  reasons = {eid: reason for eid, (_, reason) in bad.items()}
  return entries, reasons, [g["id"] for g in good], [t["id"] for t in text_only]


@pytest.fixture(scope="module")
def curated(tiny, tmp_path_factory):
  root = tmp_path_factory.mktemp("curated")
  entries, reasons, good, text_only = _hand_made(root, tiny["images"])
  path = root / "data.json"
  path.write_text(json.dumps(entries, indent=2, ensure_ascii=False))
  args = [sys.executable, "launch.py", "--config=configs/curate.py", f"--workdir={root / 'w'}",
          f"--config.model.checkpoint={tiny['ours']}", f"--config.data.records={path}",
          f"--config.data.image_root={tiny['images']}", "--config.model.dtype=float32",
          "--config.model.param_dtype=float32", "--config.select.top_fraction=0.5",
          "--config.curate.shard_size=8", "--config.scoring.batch_size=4"]
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(root=root, work=root / "w", entries=entries, reasons=reasons, good=good,
              text_only=text_only, args=args, stdout=proc.stdout)


def test_quarantine_counts_and_reasons(curated):
  """Every bad entry is in rejected.jsonl with its reason and its id at the top level; counts add up;
  nothing else is lost."""
  work = curated["work"]
  rejected = [json.loads(line) for line in open(work / "curate" / "rejected.jsonl")]
  by_id = {r.get("id"): r for r in rejected}
  assert len(rejected) == len(curated["reasons"]) + 2  # + the duplicate id and the entry without id
  for eid, reason in curated["reasons"].items():
    assert by_id[eid]["reason"].startswith(reason), (eid, by_id[eid]["reason"])
    assert by_id[eid]["raw"]["id"] == eid
  assert "over the model's context of 4096" in by_id["too-long"]["reason"]
  dup = [r for r in rejected if r["reason"].startswith("duplicate id")]
  assert len(dup) == 1 and dup[0]["id"] == curated["good"][1] and dup[0]["raw"]["conversations"][0][
      "value"] == "<image>\nWhat is this?"  # the second entry with the id, not the first
  assert by_id[None]["reason"].startswith("no usable 'id'")
  metrics = json.loads((work / "metrics.json").read_text())["curate"]
  n = len(curated["entries"])
  assert metrics["read"] == n == metrics["scored"] + metrics["text_only"] + metrics["rejected"]
  assert (metrics["scored"], metrics["text_only"], metrics["rejected"]) == (3, 2, n - 5)
  scores = [json.loads(line) for line in open(work / "export" / "scores.jsonl")]
  assert sorted(s["id"] for s in scores) == sorted(curated["good"])
  sources = metrics["per_source"]
  assert sources["gqa"]["entries"] == sources["gqa"]["scored"] == 1
  assert sources["coco"]["scored"] == 2 and sources["(no image)"]["text_only"] == 2
  assert sum(s["entries"] for s in sources.values()) == n
  assert sum(s["rejected"] for s in sources.values()) == metrics["rejected"]


def test_export_is_a_verbatim_subset(curated, tiny):
  """selected.json: the top half of the scored entries (ceil(0.5 * 3) = 2 by the summed S(I2C) of
  scores.jsonl) and the text-only ones, each equal as a JSON value to its input entry, in input order;
  every turn's score equals transformers'. A rerun that finds the shards done writes the same bytes."""
  work = curated["work"]
  selected = _load(work / "export" / "selected.json")
  scores = {s["id"]: s for s in map(json.loads, open(work / "export" / "scores.jsonl"))}
  top = sorted(scores, key=lambda i: -scores[i]["i2c"])[:2]
  first = {}
  for e in curated["entries"]:
    first.setdefault(e.get("id"), e)
  want = [first[i] for i in first if i in top or i in curated["text_only"]]
  assert selected == want
  for entry in _load(MIX):
    if entry["id"] in scores:
      ref = _reference_turns(tiny, entry)
      assert np.allclose(scores[entry["id"]]["turns"], [w["i2c"] for w in ref], atol=1e-3)
  before = (work / "export" / "selected.json").read_bytes(), (work / "report.html").read_bytes()
  os.remove(work / "curate" / "DONE.json")
  proc = subprocess.run(curated["args"], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ((work / "export" / "selected.json").read_bytes(), (work / "report.html").read_bytes()) == before
  report = (work / "report.html").read_text()
  assert "Best 3 by i2c" in report and "gqa" in report


# --------------------------------------------------------------------------------------------------
# The pipeline's JSONL records: image paths that leave data.image_root.

def test_records_paths_outside_the_root(tiny, tmp_path):
  from c3l_jax.pipeline import common, score

  outside = os.path.join(os.path.dirname(tiny["images"]), "x.png")  # ../x.png from the image root
  PIL.Image.new("RGB", (30, 30)).save(outside)
  link = os.path.join(tiny["images"], "records-link.png")
  if not os.path.islink(link):
    os.symlink(outside, link)
  good = _load(MIX)[9]["image"]
  rows = [dict(id="up", image="../x.png"), dict(id="abs", image="/etc/x.png"),
          dict(id="link", image="records-link.png"), dict(id="ok-1", image=good),
          dict(id="ok-2", image=good), dict(id="ok-1", image=good)]
  path = tmp_path / "records.jsonl"
  path.write_text("".join(json.dumps({**r, "question": "What is this?", "answer": "A cat."}) + "\n"
                          for r in rows))
  config = _config(tiny["ours"], tiny["images"], path)
  records, read_rejected = read_records(str(path))
  assert [(r["id"], r["line"], r["reason"]) for r in read_rejected] == [
      ("ok-1", 6, "duplicate id 'ok-1'")]
  inf = common.Inference(config)
  scored, rejected = score.score_chunk(config, records, inf, curate.make_scorer_for(config, inf))
  reasons = {r["id"]: r["reason"] for r in rejected}
  assert sorted(r["id"] for r in scored) == ["ok-1", "ok-2"] and len(rejected) == 3
  assert reasons["up"].startswith("image path '../x.png' leaves data.image_root through '..'")
  assert reasons["abs"].startswith("image path '/etc/x.png' is absolute")
  assert reasons["link"].startswith("image path 'records-link.png' is a symlink")
  with config.unlocked():
    config.data.allow_outside_root = True
  inf.source = common.open_source(config, inf.builder)
  scored, rejected = score.score_chunk(config, records, inf, curate.make_scorer_for(config, inf))
  assert sorted(r["id"] for r in scored) == ["link", "ok-1", "ok-2", "up"]
  assert [r["reason"] for r in rejected] == ["missing image file /etc/x.png"]


def test_dry_run_counts(curated, tiny):
  """`--dry_run`'s counts (`curate.dry_run_lines`, which launch.py prints) of the hand-made file's
  entries, gpt turns and answer tokens equal the reference's (transformers' tokenizer on the answers
  of the entries that will be scored)."""
  from transformers import AutoTokenizer

  path = curated["root"] / "data.json"
  lines = curate.dry_run_lines(_config(tiny["ours"], tiny["images"], path))
  tokenizer = AutoTokenizer.from_pretrained(tiny["hf"])
  shape_ok = [e for e in curated["entries"] if e.get("id") in curated["good"] + ["no-file", "corrupt",
                                                                                  "too-long"]]
  shape_ok = list({e["id"]: e for e in reversed(shape_ok)}.values())  # the first of a duplicate id
  answers = [c["value"] for e in shape_ok for c in e["conversations"][1::2]]
  n_tokens = sum(len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers)
  n = len(curated["entries"])
  assert lines[0] == (f"curate: {n} entries in {path}: {len(shape_ok)} with an image ({len(answers)} gpt "
                      f"turns, {n_tokens} answer tokens), 2 text-only, {n - 2 - len(shape_ok)} to "
                      "quarantine by their structure")
  assert lines[2].startswith("curate: projected at least ")


def test_export_options(curated, tiny, tmp_path):
  """`curate.rank_by=per_token`, `curate.top_count` and `curate.keep_text_only=False` on the curated
  shards: selected.json is the entry with the best per-token score of scores.jsonl, nothing else."""
  import collections
  import shutil

  work = tmp_path / "w"
  shutil.copytree(curated["work"] / "curate", work / "curate")
  config = _config(tiny["ours"], tiny["images"], curated["root"] / "data.json")
  with config.unlocked():
    config.curate.rank_by, config.curate.top_count, config.curate.keep_text_only = "per_token", 1, False
  metrics = curate.export(config, str(work), str(work / "curate"),
                          collections.defaultdict(collections.Counter))
  scores = [json.loads(line) for line in open(work / "export" / "scores.jsonl")]
  best = max(scores, key=lambda s: s["i2c_per_token"])["id"]
  assert [e["id"] for e in _load(work / "export" / "selected.json")] == [best]
  assert metrics["written"] == metrics["selected"] == 1 and metrics["text_only_kept"] == 0
