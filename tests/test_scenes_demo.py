"""The default job (`python launch.py`: configs/scenes_demo.py), shrunk: every stage on the shipped scenes
checkpoint, the data-quality metrics against ground truth, the eval stage (scenes POPE + VQA), the
report and the closing table."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import browser

from c3l_jax import scenes
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


# The demo's flags, shrunk to a 40-scene world (so the val split has every shape) and a few steps.
SHRINK = ("--config.data.scenes_images=40", "--config.data.max_images=16", "--config.generation.per_image=3",
          "--config.generation.shard_size=8", "--config.generation.num_final=16",
          "--config.scoring.shard_size=64", "--config.train.steps=3", "--config.train.checkpoint_every=3",
          "--config.select.top_fraction=0.3", "--config.eval.pope_num_images=4",
          "--config.eval.max_items=8", "--config.eval.max_new_tokens=4", "--config.data.eval_batch_size=8")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


def _pairwise_auc(scores, labels):
  """P(score of an image-dependent QA > a generic one), ties 1/2, by direct pairwise comparison."""
  pos = [s for s, y in zip(scores, labels) if y]
  neg = [s for s, y in zip(scores, labels) if not y]
  if not pos or not neg:
    return None
  return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """(workdir, tfds dir, completed process) of one shrunken `python launch.py` run."""
  if not os.path.exists(os.path.join(SCENES, "c3l_model.json")):
    pytest.skip("the shipped scenes checkpoint is missing")
  tmp_path = tmp_path_factory.mktemp("demo")
  workdir = tmp_path / "w"
  # A relative --workdir, as users type it (orbax needs absolute paths: launch.py resolves it).
  cmd = [sys.executable, "launch.py", f"--workdir={os.path.relpath(workdir, REPO)}",
         f"--config.data.tfds_dir={tmp_path / 'tfds'}", *SHRINK]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, tmp_path / "tfds", proc


def test_shrunken_demo_end_to_end(demo):
  workdir, _, proc = demo
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
    decided = [v.correct for v in verdicts if v.image_dependent and v.correct is not None]
    assert q["accuracy"] == (pytest.approx(sum(decided) / len(decided)) if decided else None)
    assert q["mean_i2c"] == pytest.approx(sum(r["i2c"] for r in rows) / len(rows), rel=1e-6)
    auc = _pairwise_auc([r["i2c"] for r in rows], [v.image_dependent for v in verdicts])
    assert q["i2c_auc"] == (pytest.approx(auc) if auc is not None else None)
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


def test_what_the_top_fraction_is_made_of(demo):
  """metrics.json's `selection`: the top 30 % (the shrunken demo's select.top_fraction) of the scored data
  by S(I2C) (eq. 1's sum) and by S(I2C) / answer tokens, recounted by hand: instruction-type shares,
  answer length and the checker's verdicts; and the sum ranking is exactly the select stage's top set."""
  import math

  workdir, _, _ = demo
  selection = json.load(open(workdir / "metrics.json"))["export"]["selection"]
  scored = _parts(workdir / "score")
  world = {s.file_name: s for s in scenes.generate_world(40, 0)}
  k = math.ceil(0.3 * len(scored))
  by_sum = sorted(range(len(scored)), key=lambda i: (-scored[i]["i2c"], i))[:k]
  by_norm = sorted(range(len(scored)), key=lambda i: (-scored[i]["i2c"] / scored[i]["n_tokens"], i))[:k]
  assert {scored[i]["id"] for i in by_sum} == \
      {r["id"] for r in _parts(workdir / "select") if r["top_fraction"]}
  for name, picked in (("all", range(len(scored))), ("top_sum", by_sum), ("top_length_norm", by_norm)):
    rows = [scored[i] for i in picked]
    got = selection[name]
    assert got["n"] == len(rows)
    for kind in {r["instruction_type"] for r in scored}:
      share = sum(r["instruction_type"] == kind for r in rows) / len(rows)
      assert got["instruction_types"].get(kind, 0.0) == pytest.approx(share), (name, kind)
    assert got["avg_answer_words"] == pytest.approx(np.mean([len(r["answer"].split()) for r in rows]))
    assert got["avg_answer_tokens"] == pytest.approx(np.mean([r["n_tokens"] for r in rows]))
    verdicts = [scenes.check(world[r["image"]], r["question"], r["answer"]) for r in rows]
    assert got["image_dependent"] == pytest.approx(np.mean([v.image_dependent for v in verdicts]))
    assert got["hallucinated"] == pytest.approx(np.mean([bool(v.hallucinated) for v in verdicts]))
    decided = [v.correct for v in verdicts if v.image_dependent and v.correct is not None]
    assert got["correct"] == (pytest.approx(np.mean(decided)) if decided else None)


def test_console_is_quiet_and_the_log_holds_the_rest(demo):
  """The console: the workdir, a start and an end line per stage, bars, the tables; no library log line
  (orbax, tfds, jax, absl INFO), no inapplicable warning. They are in WORKDIR/logs/run.log; a rerun
  with --verbosity=1 (every stage done, so it only reprints) shows log lines on the console too."""

  workdir, tfds_dir, proc = demo
  console = proc.stdout + proc.stderr
  assert not re.search(r"^[IWE]\d{4} ", console, flags=re.M), console[:3000]
  for chatter in ("orbax", "Using custom data configuration", "Downloading and preparing",
                  "Generating splits", "libtpu", "PyTorch was not found"):
    assert chatter not in console, chatter
  stages = ["initial", "filter", "score", "select", "train", "final", "export", "eval"]
  assert proc.stdout.splitlines()[0].startswith(f"workdir {os.path.abspath(workdir)}; stages ")
  for stage in stages:
    assert f"\nstage {stage}: start\n" in proc.stdout
    assert re.search(rf"^stage {stage}: done in \d+\.\ds", proc.stdout, flags=re.M), stage
  assert re.search(r"^stage score: done in .*\(read (\d+), written \1, rejected 0\)$", proc.stdout,
                   flags=re.M)
  log = (workdir / "logs" / "run.log").read_text(encoding="utf-8")
  assert re.search(r"^I\d{4} .*\] initial: shard 0 done \(", log, flags=re.M)
  assert "orbax" in log.lower() and "Dataset scenes_world downloaded and prepared" in log
  assert re.search(r"stage score metrics: \{", log)

  cmd = [sys.executable, "launch.py", f"--workdir={workdir}", f"--config.data.tfds_dir={tfds_dir}", *SHRINK,
         "--verbosity=1"]
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
  assert again.returncode == 0, again.stderr[-4000:]
  for stage in stages:
    assert f"stage {stage}: already done in this workdir, skipped" in again.stdout
  assert re.search(r"^I\d{4} .*\] done: metrics in ", again.stderr, flags=re.M), again.stderr[-3000:]
  assert again.stdout.strip().splitlines()[-1] == proc.stdout.strip().splitlines()[-1]  # workdir line


# What the rendered page must show, read back from the DOM after Chromium has laid it out and decoded it.
_RENDERED = """
const box = e => e.getBoundingClientRect();
const svg = document.querySelector('svg');
return {
  title: document.title,
  viewport: [innerWidth * devicePixelRatio, innerHeight * devicePixelRatio],
  fetched: performance.getEntriesByType('resource').map(r => r.name),
  images: [...document.images].map(i => ({src: i.src, complete: i.complete, w: i.naturalWidth,
                                          h: i.naturalHeight, shown: box(i).width})),
  svg_width: box(svg).width,
  bars: [...svg.querySelectorAll('rect')].filter(r => r.querySelector('title')).map(
      r => ({h: box(r).height, title: r.textContent, fill: r.getAttribute('fill')})),
  legend: [...svg.querySelectorAll('text')].map(t => t.textContent),
  verdicts: [...document.querySelectorAll('.verdict')].map(p => p.innerText),
  tables: [...document.querySelectorAll('table')].map(t => [...t.rows].map(
      r => [...r.cells].map(c => c.innerText))),
};
"""


@pytest.mark.skipif(browser.binaries() is None,
                    reason="chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
def test_report_renders_in_headless_chromium(demo):
  workdir, _, _ = demo
  metrics = json.load(open(workdir / "metrics.json"))
  scored = _parts(workdir / "score")
  with browser.headless_page() as page:
    page.open((workdir / "report.html").as_uri())
    dom = page.run(_RENDERED)
    page.run("document.querySelector('svg').scrollIntoView()")
    shot = PIL.Image.open(io.BytesIO(page.screenshot())).convert("RGB")

  assert dom["title"] == "C3L run report"
  assert dom["fetched"] == []  # self-contained: the page loaded nothing besides itself
  # Best and worst samples: every inlined image decoded to the thumbnail's size and is shown 96 px wide.
  assert len(dom["images"]) == 2 * min(6, len(scored))
  for img in dom["images"]:
    thumb = PIL.Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
    assert img["complete"] and (img["w"], img["h"]) == thumb.size and max(thumb.size) <= 96
    assert img["shown"] == 96
  # The histogram is the scored data's histogram, each bar stacked: image-dependent QA (by the checker)
  # at the bottom in blue, generic QA above in orange; heights in proportion to the counts.
  world = {s.file_name: s for s in scenes.generate_world(40, 0)}
  verdicts = [scenes.check(world[r["image"]], r["question"], r["answer"]) for r in scored]
  i2c = np.array([r["i2c"] for r in scored])
  dependent = np.array([v.image_dependent for v in verdicts])
  edges = np.histogram_bin_edges(i2c, bins=30)
  counts = {"image-dependent": np.histogram(i2c[dependent], edges)[0],
            "generic": np.histogram(i2c[~dependent], edges)[0]}
  assert dom["svg_width"] == 600
  drawn = {"image-dependent": [], "generic": []}
  for b in dom["bars"]:
    group, n = b["title"].split("): ", 1)[1].rsplit(": ", 1)
    drawn[group].append((b["title"].split(")", 1)[0] + ")", int(n), b["h"], b["fill"]))
  total = counts["image-dependent"] + counts["generic"]
  for group, fill in (("image-dependent", "#4a7bd0"), ("generic", "#e0a040")):
    nonzero = [(f"[{edges[i]:.3g}, {edges[i + 1]:.3g})", int(c)) for i, c in enumerate(counts[group]) if c]
    assert [(t, n) for t, n, _, _ in drawn[group]] == nonzero
    assert {f for _, _, _, f in drawn[group]} <= {fill}
    np.testing.assert_allclose([h for _, n, h, _ in drawn[group]],
                               [150 * n / total.max() for _, n in nonzero], atol=0.6)
    assert f"{group} ({int(counts[group].sum())})" in dom["legend"]
  # Each best / worst sample shows the checker's verdict on it.
  ranked = sorted(range(len(scored)), key=lambda i: -scored[i]["i2c"])
  k = min(6, len(scored))
  expect = []
  for i in ranked[:k] + ranked[::-1][:k]:
    v = verdicts[i]
    words = ["image-dependent" if v.image_dependent else "generic"]
    words += [] if v.correct is None else ["correct" if v.correct else "wrong"]
    words += ["hallucinates"] if v.hallucinated else []
    expect.append("checked: " + ", ".join(words))
  assert dom["verdicts"] == expect
  # The stage-count and initial-vs-final tables show metrics.json's numbers.
  stages, quality = dom["tables"][:2]
  assert stages[0] == ["stage", "read", "written", "rejected"]
  assert {r[0]: r[2] for r in stages[1:]}["score"] == str(metrics["score"]["written"])
  shown = {r[0]: r[1:] for r in quality[1:]}
  fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731  (the report's cell format)
  for name in ("relevance", "accuracy", "hallucination", "mean_i2c"):
    assert shown[name] == [fmt(metrics["export"]["quality"][k][name]) for k in ("initial", "final")]
  # What the top fraction is made of: metrics.json's `selection`, one column per set.
  composition = dom["tables"][2]
  assert composition[0] == ["measure", "all", "top_sum", "top_length_norm"]
  shown = {r[0]: r[1:] for r in composition[1:]}
  sets = ("all", "top_sum", "top_length_norm")
  assert shown["n"] == [str(metrics["export"]["selection"][k]["n"]) for k in sets]
  for name in ("image_dependent", "correct", "hallucinated", "avg_answer_words"):
    assert shown[name] == [fmt(metrics["export"]["selection"][k][name]) for k in sets]
  # The pixels: the screenshot is the viewport, and the histogram's bars are painted in their colours.
  assert list(shot.size) == dom["viewport"]
  for group, rgb in (("image-dependent", (0x4a, 0x7b, 0xd0)), ("generic", (0xe0, 0xa0, 0x40))):
    painted = (np.asarray(shot) == rgb).all(-1).sum()
    assert painted > 0.5 * sum(h for _, _, h, _ in drawn[group]) * (600 / 30 - 1), group


def test_ablation_table_on_the_demo_data(demo, tmp_path):
  """`configs/scenes_ablation.py` (Table 4) for one seed on the shrunken demo: four generator
  rows, the variants (the other final mode, for the base and the C3L generator; length-normalised
  S(I2C)) and the student
  (`checkpoints/scenes_student`: captions only, no instruction data); each row's data, with as many of
  the student's own instruction records (`ablation.student_data=scenes`, share 0.5), fine-tunes a fresh
  copy of the student (VLIT) that is evaluated on scenes POPE (random / popular / adversarial) and
  held-out VQA; the reference row is the student fine-tuned on its own records alone. The own records
  are of the seed's training scenes, never of a scene the eval asks about; every fine-tune starts from
  the student instruction-tuned on all of them. One seed: the interval arithmetic over seeds is
  `test_mean_interval_by_hand`'s, and
  what a second seed changes (the world and every seeded field) is `test_ablation_rows_derive_their_configs`'."""
  import shutil

  from c3l_jax.pipeline import ablation
  from configs import scenes_ablation

  demo_dir, tfds_dir, _ = demo
  workdir = tmp_path / "ablation_run"
  for stage in ablation.SHARED:  # the shared initial data, as a rerun of the demo's workdir would find it
    shutil.copytree(demo_dir / stage, workdir / stage)
  cmd = [sys.executable, "launch.py", "--config=configs/scenes_ablation.py", f"--workdir={workdir}",
         f"--config.data.tfds_dir={tfds_dir}", *SHRINK,  # the config's stages: initial..score are done
         "--config.ablation.vlit_steps=2", "--config.ablation.seeds=1", "--config.ablation.student_steps=3",
         "--config.generation.num_final=8", "--config.eval.max_items=4"]  # 14 rows: kept small
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.load(open(workdir / "metrics.json"))["ablation"]
  names = ["student + own data", *ablation.ROWS, "filtering direct", "+CRM+CLM direct", "+CRM+CLM len-norm"]
  assert out["seeds"] == 1 and [list(r) for r in out["per_seed"]] == [names]
  dirs = {name: row.dirname for name, row in ablation.all_rows(scenes_ablation.get_config()).items()}
  dirs["student + own data"] = "base"

  for k, results in enumerate(out["per_seed"]):
    seed_dir = workdir / "ablation" / f"seed{k}"
    world = {s.file_name: s for s in scenes.generate_world(40, k)}  # seed k is world k
    scored = _parts(seed_dir / "score")
    assert all(world.get(r["image"]) for r in scored)
    # The student's own data: the seed's training scenes (the 40 of world k).
    own = {r["id"]: r for r in _rows(seed_dir / "student_data.jsonl")}
    assert {r["image"] for r in own.values()} == set(world)
    assert all(scenes.check(world[r["image"]], r["question"].split("\n")[0], r["answer"]).correct is True
               for r in own.values())
    # The student, instruction-tuned on all of them first, is where every fine-tune starts.
    assert {r["id"] for r in _rows(seed_dir / "student" / "records.jsonl")} == set(own)
    tuned = json.load(open(seed_dir / "student" / "train" / "DONE.json"))
    assert tuned["steps"] == 3 and tuned["checkpoint"] == "checkpoints/scenes_student"
    reference = _rows(seed_dir / "base" / "downstream" / "records.jsonl")
    assert len(reference) == 8 and all(r["id"] in own for r in reference)  # num_final 8 * 0.5 / 0.5
    asked: set = set()  # every image the seed's evals asked about
    for name, result in results.items():
      down = seed_dir / dirs[name] / "downstream"
      trained = _rows(down / "records.jsonl")
      assert [(r["image"], r["question"], r["answer"]) for r in trained if r["id"] in own] == \
          [(own[r["id"]]["image"], own[r["id"]]["question"], own[r["id"]]["answer"]) for r in trained
           if r["id"] in own]
      mine = [r for r in trained if r["id"] in own]
      fine_tune = json.load(open(down / "train" / "DONE.json"))
      assert fine_tune["steps"] == 2
      assert fine_tune["checkpoint"] == str(seed_dir / "student" / "train" / "generator")  # the tuned student
      evaluated = json.load(open(down / "metrics.json"))["eval"]["checkpoint"]  # the fine-tuned copy
      assert os.path.realpath(evaluated) == os.path.realpath(down / "train" / "generator")
      if name != "student + own data":
        # The row's final data: its size and checker quality; it and as many of the student's own
        # records (share 0.5: the first of the seed's order, as the reference row's) fine-tuned the copy.
        data = _parts(seed_dir / dirs[name] / "final" / "filtered")
        assert result["instances"] == len(data) > 0
        verdicts = [scenes.check(world[r["image"]], r["question"], r["answer"]) for r in data]
        assert result["relevance"] == pytest.approx(sum(v.image_dependent for v in verdicts) / len(data))
        assert [(r["id"], r["question"], r["answer"]) for r in trained[:len(data)]] == \
            [(r["id"], r["question"], r["answer"]) for r in data]
        assert trained[len(data):] == mine and result["student_records"] == len(mine) == len(data)
        assert len(mine) / len(trained) == 0.5
        assert [r["id"] for r in mine] == [r["id"] for r in reference[:len(mine)]]
        mode = "direct" if name.endswith(" direct") else "two_step"  # two-step: the paper's final generation
        assert {r["mode"] for r in _parts(seed_dir / dirs[name] / "final")} == {mode}
      else:
        # The reference row: the student (that the fine-tunes start from it:
        # test_pipeline_parts.py::test_ablation_fine_tunes_the_student) on its own records alone.
        assert trained == mine == reference and result["student_records"] == 8
      asked |= {r["image"] for split in pope.SPLITS for r in _parts(down / "eval" / f"pope_{split}")}
      asked |= {r["image"] for r in _rows(down / "eval" / "scenes_vqa_answers.jsonl")}
      # POPE per split and VQA, recounted from the downstream model's written answers.
      for split in pope.SPLITS:
        answers = _parts(down / "eval" / f"pope_{split}")
        assert len(answers) == 4
        said = [pope.parse_yes_no(a["answer"]) for a in answers]
        assert result[f"pope_{split}_acc"] == pytest.approx(
            np.mean([s == a["label"] for s, a in zip(said, answers)]))
        assert result[f"pope_{split}_yes"] == pytest.approx(np.mean([s == "yes" for s in said]))
      assert result["pope_acc"] == pytest.approx(np.mean([result[f"pope_{s}_acc"] for s in pope.SPLITS]))
      assert 0.0 <= result["vqa_acc"] <= 1.0
    assert asked and not asked & {r["image"] for r in own.values()}  # never an eval scene

    # Which generator each row trained: +CRM has no contrastive term, +CLM picked its roles at random.
    history = lambda d: _rows(seed_dir / d / "train" / "history.jsonl")  # noqa: E731
    assert all(h.get("contrastive", 0.0) == 0.0 for h in history("crm"))
    assert any(h.get("contrastive", 0.0) > 0.0 for h in history("crm_clm"))
    top = {d: {r["id"] for r in _parts(seed_dir / d / "select") if r["top_fraction"]}
           for d in ("clm", "crm", "crm_clm", "crm_clm_length_norm")}
    by_sum = sorted(scored, key=lambda r: -r["i2c"])
    assert top["crm"] == top["crm_clm"] == {r["id"] for r in by_sum[:len(top["crm"])]}
    assert len(top["clm"]) == len(top["crm"]) and top["clm"] != top["crm"]
    # The length-normalised row scored the same data again: S(I2C) / answer tokens.
    normed = {r["id"]: r for r in _parts(seed_dir / "crm_clm_length_norm" / "score")}
    assert set(normed) == {r["id"] for r in scored}
    for r in scored:
      assert normed[r["id"]]["i2c"] == pytest.approx(r["i2c"] / r["n_tokens"], rel=1e-4, abs=1e-6)
    by_norm = sorted(scored, key=lambda r: -r["i2c"] / r["n_tokens"])
    assert top["crm_clm_length_norm"] == {r["id"] for r in by_norm[:len(top["crm"])]}
    # The direct row used C3L's trained generator, not a new one.
    assert os.path.realpath(seed_dir / "crm_clm_direct" / "train") == os.path.realpath(seed_dir / "crm_clm" / "train")

  # One seed: the table's cells are that seed's values, without an interval.
  for name in names:
    for metric, value in out["rows"][name].items():
      assert value == out["per_seed"][0][name][metric] and out["ci95"][name][metric] is None
  # The printed table is table.txt: Table 4's rows, then POPE per split, with mean±half-width cells.
  text = (workdir / "ablation" / "table.txt").read_text()
  assert text.strip() in proc.stdout
  # The console: one line per row and seed (the sub-runs' stage lines and eval tables are in the log).
  assert "stage train: start" not in proc.stdout and "stage eval: start" not in proc.stdout
  for k in range(1):
    for name in names[1:]:
      assert re.search(rf"^ablation seed {k} {re.escape(name)} data: instances \d+", proc.stdout, re.M)
    for name in names:
      assert re.search(rf"^ablation seed {k} {re.escape(name)} model: .*vqa_acc \d", proc.stdout, re.M)
  lines = text.splitlines()
  assert lines[0] == "Table 4 (one seed):"
  assert [line[:18].strip() for line in lines[2:2 + len(names)]] == names
  vqa = out["rows"]["+CRM+CLM"]["vqa_acc"]
  assert f" {vqa:.3f} " in lines[2 + names.index("+CRM+CLM")] + " "
  assert "POPE per split:" in lines


def test_mean_interval_by_hand():
  """The ablation's interval arithmetic on hand-made numbers (t quantiles from a printed t table)."""
  from c3l_jax.pipeline.ablation import aggregate, mean_interval

  # 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t(0.975, 2 dof) = 4.3027 -> half-width 2.4841.
  assert mean_interval([1.0, 2.0, 3.0]) == (2.0, pytest.approx(4.3027 / 3 ** 0.5, rel=1e-4))
  # 0.40, 0.50, 0.45, 0.55: mean 0.475, sd 0.06455; t(0.975, 3 dof) = 3.1824 -> half-width 0.10272.
  mean, width = mean_interval([0.40, 0.50, 0.45, 0.55])
  assert mean == pytest.approx(0.475) and width == pytest.approx(0.10272, rel=1e-3)
  assert mean_interval([0.7]) == (0.7, None)  # one seed: no interval
  assert mean_interval([None, 0.2, None]) == (0.2, None)  # a seed that could not measure is left out
  assert mean_interval([]) == (None, None)
  means, widths = aggregate([{"row": {"acc": 0.1, "n": 10}}, {"row": {"acc": 0.3, "n": 20}}])
  assert means == {"row": {"acc": pytest.approx(0.2), "n": 15.0}}
  assert widths["row"]["acc"] == pytest.approx(12.7062 * 0.1, rel=1e-5)
