"""The pipeline's model-free pieces: QA parsing, instruction mixes, the basic filter, selection roles,
export statistics, the image sources over COCO / scenes tfds data, and the runtime's watchdog."""

from __future__ import annotations

import json
import os
import queue
import threading
import types

import numpy as np
import PIL.Image
import pytest

from c3l_jax import runtime
from c3l_jax.data import instructions as ins
from c3l_jax.data.images import ImageError
from c3l_jax.pipeline import export, filter as filter_stage, select as select_stage


@pytest.mark.parametrize("text, want", [
    ("Question: What colour is the star? Answer: It is yellow.", ("What colour is the star?",
                                                                   "It is yellow.")),
    ("question:how many circles?answer: two", ("how many circles?", "two")),
    ("Q: Is there a cat? A: No", ("Is there a cat?", "No")),
    ("**Question 1:** Where is the dog?\n**Answer 1:** next to the car\nQuestion 2: x? Answer 2: y",
     ("Where is the dog?", "next to the car")),
    ('Sure! Question: "Why is the sky blue?"\nAnswer: because of scattering.',
     ("Why is the sky blue?", "because of scattering.")),
    ("Question: what is this? Answer:", None),  # empty answer
    ("Answer: red. Question: what colour?", None),  # answer before any question
    ("the circle is red", None),
    ("Is there a question about it? Answer: a", None),  # 'question' without a colon is no marker
])
def test_parse_qa(text, want):
  assert ins.parse_qa(text) == want


@pytest.mark.parametrize("text, want", [
    ("Question 1: what is red? Answer 1: the circle.\nQuestion 2: how many squares? Answer 2: two",
     [("what is red?", "the circle."), ("how many squares?", "two")]),
    ("**Q:** is there a cat? **A:** no\n\nQ: where is the car? A: on the left",
     [("is there a cat?", "no"), ("where is the car?", "on the left")]),
    ("Here are three.\nQuestion: a? Answer: b\nQuestion: c? Answer:\nQuestion: d? Answer: e",
     [("a?", "b"), ("d?", "e")]),  # the pair without an answer is skipped, the rest kept
    ("Question: one? Answer: yes Question: dangling?", [("one?", "yes")]),
    ("Answer: red. Question: what colour? Answer: red", [("what colour?", "red")]),
    ("the circle is red", []),
])
def test_parse_qa_pairs_keeps_every_pair(text, want):
  assert ins.parse_qa_pairs(text) == want
  assert (want[0] if want else None) == ins.parse_qa(text)  # the first pair is what parse_qa reads


def test_parse_mix_normalises_and_rejects_bad_specs():
  assert ins.parse_mix("conversation=2,complex_reasoning=2") == {"conversation": 0.5,
                                                                  "complex_reasoning": 0.5}
  assert ins.parse_mix("conversation=1,detailed_description=0") == {"conversation": 1.0}
  for bad in ("chat=1", "conversation", "conversation=x", "conversation=-1", "conversation=0", ""):
    with pytest.raises(ValueError):
      ins.parse_mix(bad)


def test_draw_types_follows_the_proportions():
  rng = np.random.default_rng(0)
  drawn = ins.draw_types({"conversation": 0.75, "complex_reasoning": 0.25}, 4000, rng)
  assert abs(drawn.count("conversation") / 4000 - 0.75) < 0.03
  assert set(drawn) == {"conversation", "complex_reasoning"}


FILTER = types.SimpleNamespace(min_question_words=3, max_question_words=12, min_answer_words=1,
                               max_answer_words=10, near_duplicate=0.8, caption_overlap=0.9)


def _rec(i, q, a, image="a.png", caption="a red circle next to a blue square"):
  return {"id": f"r{i}", "image": image, "question": q, "answer": a, "caption": caption, "output": "?"}


def test_filter_rejects_each_kind_with_its_reason_and_keeps_the_rest():
  rows = [
      _rec(0, "what colour is the circle?", "red"),
      _rec(1, "", "", caption=""),
      _rec(2, "why?", "because"),  # question too short
      _rec(3, "what is in the picture here?", " ".join(["word"] * 11)),  # answer too long
      _rec(4, "the circle is red today", "The circle is red, today!"),
      _rec(5, "what does the image show?", "A red circle next to a blue square."),
      _rec(6, "What colour is the circle?", "Red."),  # exact duplicate of r0 once normalised
      _rec(7, "what colour is the circle", "it is red"),  # near duplicate (same question words)
      _rec(8, "what colour is the circle?", "red", image="b.png"),  # another image: kept
      _rec(9, "how many shapes are there?", "two"),
  ]
  kept, rejected = filter_stage.filter_rows(rows, FILTER)
  assert [r["id"] for r in kept] == ["r0", "r8", "r9"]
  reasons = {r["id"]: r["reason"] for r in rejected}
  assert reasons["r1"].startswith("unparsable output")
  assert reasons["r2"].startswith("question has 1 words")
  assert reasons["r3"].startswith("answer has 11 words")
  assert reasons["r4"] == "question equals answer"
  assert reasons["r5"].startswith("answer only repeats the caption")
  assert reasons["r6"] == "duplicate of 'r0'"
  assert reasons["r7"].startswith("near duplicate of 'r0'")
  assert len(kept) + len(rejected) == len(rows)
  assert all(r["raw"]["id"] == r["id"] for r in rejected)  # the whole record is kept


def test_select_roles_and_top_fraction():
  rows = [{"id": str(i), "image": img, "i2c": s} for i, (img, s) in
          enumerate([("a", 0.1), ("a", 0.9), ("a", 0.5), ("b", 0.7), ("c", 0.3), ("c", 0.3),
                     ("a", 0.2)])]
  out = select_stage.annotate_i2c(rows, top_fraction=0.3, max_negatives=2)
  roles = {r["id"]: r["role"] for r in out}
  # image a: positive = the best (0.9), negatives = the next two (0.5, 0.2); 0.1 unused.
  assert (roles["1"], roles["2"], roles["6"], roles["0"]) == ("positive", "negative", "negative",
                                                              "unused")
  assert roles["3"] == "unused"  # a single sample: nothing to contrast with
  assert (roles["4"], roles["5"]) == ("positive", "negative")  # tie: the earlier one wins
  # ceil(0.3 * 7) = 3 best: 0.9, 0.7, 0.5; records keep their input order.
  assert [r["id"] for r in out if r["top_fraction"]] == ["1", "2", "3"]
  assert [{k: v for k, v in r.items() if k not in ("role", "top_fraction")} for r in out] == rows


def test_export_statistics_count_words():
  rows = [{"id": "1", "image": "x.png", "question": "what is it?", "answer": "a red  circle"},
          {"id": "2", "image": "x.png", "question": "how many?", "answer": "two"}]
  llava = export.to_llava(rows)
  assert llava[0] == {"id": "1", "image": "x.png", "conversations": [
      {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a red  circle"}]}
  assert export.statistics(llava) == {"instances": 2, "images": 1, "avg_question_words": 2.5,
                                      "avg_answer_words": 2.0}


def _config(**data):
  from configs import common
  config = common.get_base_config()
  for k, v in data.items():
    config.data[k] = v
  return config


def test_coco_source_lists_and_loads_images(tmp_path):
  from c3l_jax.data.sources import open_source

  root = tmp_path / "coco"
  (root / "val2014").mkdir(parents=True)
  (root / "annotations").mkdir()
  images = []
  for i, image_id in enumerate((42, 7)):
    name = f"COCO_val2014_{image_id:012d}.jpg"
    images.append({"id": image_id, "file_name": name, "width": 8, "height": 8})
    if i == 0:
      PIL.Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(root / "val2014" / name)
  caps = {"images": images, "annotations": [{"id": 1, "image_id": 42, "caption": "a grey square"},
                                            {"id": 2, "image_id": 7, "caption": "nothing"}]}
  (root / "annotations" / "captions_val2014.json").write_text(json.dumps(caps))
  config = _config(source="coco", coco_dir=str(root), split="val", tfds_dir=str(tmp_path / "tfds"))
  source = open_source(config)
  items, rejected = source.items()
  assert rejected == [] and [(i.image, i.captions) for i in items] == [
      ("COCO_val2014_000000000007.jpg", ("nothing",)), ("COCO_val2014_000000000042.jpg",
                                                        ("a grey square",))]
  assert np.asarray(source.load(items[1].image)).mean() == pytest.approx(200, abs=2)
  with pytest.raises(ImageError, match="missing image"):
    source.load(items[0].image)  # listed in the annotations, absent on disk
  with pytest.raises(ImageError, match="missing image"):
    source.load("COCO_val2014_000000000099.jpg")


def test_scenes_source_serves_the_world(tmp_path):
  from c3l_jax import scenes
  from c3l_jax.data.sources import open_source

  config = _config(source="scenes", scenes_images=5, tfds_dir=str(tmp_path / "tfds"))
  source = open_source(config)
  items, _ = source.items(limit=3)
  world = scenes.generate_world(5, 0)
  assert [i.image for i in items] == [s.file_name for s in world[:3]]
  assert scenes.Scene.from_json(items[2].annotation) == world[2]
  np.testing.assert_array_equal(np.asarray(source.load(items[2].image)),
                                np.asarray(scenes.render(world[2])))


class _CountingElements:
  """A tfds-like split of `n` images that counts element reads (each carries its image bytes) and
  stores the listing index (`file_names()`, `image_ids()`) as a prepared dataset does."""

  def __init__(self, n):
    self.n, self.reads = n, []

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    self.reads.append(i)
    return {"image_bytes": b"\x89PNG...", "image_id": 100 + i, "file_name": f"im{i:03d}.png",
            "captions": [f"caption {i}"], "objects": ["circle"], "annotation": ""}

  def file_names(self):
    return [f"im{i:03d}.png" for i in range(self.n)]

  def image_ids(self):
    return [100 + i for i in range(self.n)]


def test_listing_reads_no_image_and_two_processes_list_each_image_once(tmp_path, monkeypatch):
  """initial / final on two simulated processes: each lists (reading no element, so no image bytes)
  only the images of its own shards; together they cover every image (initial) / every sample
  (final) exactly once, in the shards a one-process run gives them."""
  from c3l_jax import registry, runtime
  from c3l_jax.data.sources import open_source
  from c3l_jax.pipeline import final, initial

  elements = _CountingElements(11)
  monkeypatch.setitem(registry.SOURCES, "counting",
                      registry.Source("counting", lambda config, split: elements))
  config = _config(source="counting")
  config.generation.shard_size = 3  # initial: 4 shards of images; final: 3 shards of 9 samples
  config.generation.per_image = 1
  config.generation.num_final = 9
  config.data.max_images = 10  # the listing stops at 10: im010 is never used
  config.stages = "initial,final"  # (no train stage: final generates with the base checkpoint)

  source = open_source(config)
  assert source.count(config.data.max_images) == 10
  items, _ = source.items(config.data.max_images, [9, 2, 2, 40], ground_truth=False)
  assert [(i.image, i.image_id) for i in items] == [("im002.png", "102"), ("im009.png", "109")]
  assert elements.reads == []  # listed from the stored index: no element (no image bytes) read
  items, _ = source.items(3)  # ground truth: exactly the listed elements are read
  assert items[1].captions == ("caption 1",) and elements.reads == [0, 1, 2]
  elements.reads.clear()

  chunks = {}

  class Generated(Exception):
    pass

  def run_generation(config, workdir, stage, c, *args, num_shards, **kwargs):
    chunks[(stage, runtime.get().index, runtime.get().count)] = (c, num_shards)
    raise Generated  # what each process would generate is all this test looks at

  monkeypatch.setattr(initial, "run_generation", run_generation)
  for count in (1, 2):
    for index in range(count):
      monkeypatch.setattr(runtime, "get", lambda index=index, count=count: runtime.Runtime(index, count))
      for stage in (initial, final):
        with pytest.raises(Generated):
          stage.run(config, str(tmp_path))
  assert elements.reads == []

  def images(stage, index, count):
    c, num_shards = chunks[(stage, index, count)]
    return num_shards, {shard: [(job.id, job.item.image) for job in jobs] for shard, jobs in c.items()}

  for stage, shards_total in (("initial", 4), ("final", 3)):
    n, one = images(stage, 0, 1)
    (n0, p0), (n1, p1) = images(stage, 0, 2), images(stage, 1, 2)
    assert n == n0 == n1 == shards_total
    assert sorted(p0) == list(range(0, shards_total, 2)) and sorted(p1) == list(range(1, shards_total, 2))
    assert {**p0, **p1} == one  # the same jobs in the same shards as one process
  _, one = images("initial", 0, 1)
  assert [image for shard in sorted(one) for _, image in one[shard]] == [
      f"im{i:03d}.png" for i in range(10)]  # every listed image exactly once
  _, one = images("final", 0, 1)
  assert [(job_id, image) for shard in sorted(one) for job_id, image in one[shard]] == [
      (f"final_{k:07d}", f"im{k % 10:03d}.png") for k in range(9)]


def test_roc_auc_by_hand():
  from c3l_jax.scenes.quality import roc_auc

  assert roc_auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
  assert roc_auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
  # positives {0.5, 0.3}, negatives {0.5, 0.1}: pairs (0.5>0.1)=1, (0.5=0.5)=1/2, (0.3>0.1)=1,
  # (0.3<0.5)=0 -> 2.5 / 4.
  assert roc_auc([0.5, 0.3, 0.5, 0.1], [True, True, False, False]) == 0.625
  assert roc_auc([0.5, 0.3], [True, True]) is None


def test_dataset_quality_on_a_hand_made_scene():
  from c3l_jax import scenes
  from c3l_jax.scenes.quality import dataset_quality

  scene = scenes.Scene(image_id=0, file_name="s.png", background="black", theme="none", objects=[
      scenes.SceneObject("circle", "red", "large", 0.2, 0.2),
      scenes.SceneObject("square", "blue", "small", 0.8, 0.8)])
  rows = [
      {"image": "s.png", "question": "What colour is the circle?", "answer": "red", "i2c": 2.0},
      {"image": "s.png", "question": "What colour is the square?", "answer": "green", "i2c": 1.5},
      {"image": "s.png", "question": "What colour is the star?", "answer": "yellow", "i2c": 0.4},
      {"image": "s.png", "question": "How many sides does a triangle have?", "answer": "three",
       "i2c": 0.1},
  ]
  q = dataset_quality(rows, lambda image: scene)
  verdicts = [scenes.check(scene, r["question"], r["answer"]) for r in rows]
  assert [v.image_dependent for v in verdicts][:2] == [True, True] and not verdicts[3].image_dependent
  assert verdicts[2].hallucinated == ["star"]
  dependent = [v.image_dependent for v in verdicts]
  assert q["relevance"] == pytest.approx(sum(dependent) / 4)
  assert q["hallucination"] == 0.25
  assert q["avg_question_words"] == pytest.approx((5 + 5 + 5 + 7) / 4)
  assert q["mean_i2c"] == pytest.approx(1.0)
  assert 0 <= q["accuracy"] <= 0.5  # the green square is wrong; the star cannot be right


def test_ablation_rows_derive_their_configs():
  from c3l_jax.pipeline import ablation
  from configs import scenes_ablation

  config = scenes_ablation.get_config()
  assert config.stages == "initial,filter,score,ablation"
  rows = {name: ablation.derive(config, row.overrides) for name, row in ablation.all_rows(config).items()}
  assert list(rows) == ["filtering", "+CLM", "+CRM", "+CRM+CLM", "filtering direct", "+CRM+CLM direct",
                        "+CRM+CLM len-norm"]
  assert rows["+CLM"].select.method == "random" and rows["+CLM"].train.contrastive_weight > 0
  assert rows["+CRM"].select.method == "i2c" and rows["+CRM"].train.contrastive_weight == 0.0
  assert rows["+CRM+CLM"].to_dict() == config.to_dict()  # the full method changes nothing
  assert ablation.ROWS["filtering"].stages == ("final", "export")  # no generator training
  assert rows["+CRM+CLM direct"].generation.final_mode == "direct"  # the default is two_step
  assert rows["filtering direct"].generation.final_mode == "direct"
  assert ablation.all_rows(config)["filtering direct"].stages == ("final", "export")  # the base generator
  assert ablation.all_rows(config)["+CRM+CLM direct"].links["train"] == "crm_clm/train"
  assert rows["+CRM+CLM len-norm"].scoring.length_norm and not config.scoring.length_norm
  assert all(r.is_locked for r in rows.values()) and config.select.method == "i2c"
  # Seed k moves every seed_keys field by k and nothing else.
  seeded = ablation.seeded(config, 2)
  assert (seeded.seed, seeded.data.scenes_seed) == (config.seed + 2, config.data.scenes_seed + 2)
  seeded.unlock()
  seeded.seed, seeded.data.scenes_seed = config.seed, config.data.scenes_seed
  assert seeded.to_dict() == config.to_dict()


def test_scenes_vqa_writes_its_answers_and_they_recount_to_its_accuracy(tmp_path, monkeypatch):
  """`scenes_vqa` on two hand-made scenes with hand-written questions and answers whose rightness is
  known by hand (3 of 6 right): the answers file holds every question, answer and verdict, and both
  the file and the metrics give 3/6 and the per-kind counts."""
  from c3l_jax import scenes
  from c3l_jax.scenes import quality

  a = scenes.Scene(image_id=0, file_name="a.png", background="black", theme="none", objects=[
      scenes.SceneObject("circle", "red", "large", 0.2, 0.2),
      scenes.SceneObject("square", "blue", "small", 0.8, 0.8)])
  b = scenes.Scene(image_id=1, file_name="b.png", background="white", theme="none", objects=[
      scenes.SceneObject("star", "yellow", "large", 0.5, 0.5)])
  asked = [  # (scene, question, reference, the model's answer, right by hand, kind)
      (a, "What colour is the circle?", "red", "red", True, "colour"),
      (a, "What colour is the square?", "blue", "green", False, "colour"),
      (a, "How many circles are there?", "one", "two", False, "count"),
      (a, "Where is the square?", "on the right", "on the right", True, "position"),
      (b, "Is there a circle?", "no", "yes", False, "existence"),
      (b, "What colour is the star?", "yellow", "yellow", True, "colour"),
  ]
  questions = [{"image": s.file_name, "question": q, "reference": r, "scene": s}
               for s, q, r, _, _, _ in asked]
  monkeypatch.setattr(quality, "vqa_questions", lambda items, seed: questions)
  inf = types.SimpleNamespace(
      source=types.SimpleNamespace(items=lambda limit: ([], []), load=lambda image: image),
      builder=types.SimpleNamespace(encode_prompt=lambda text, image: ([1, 2], np.zeros(3))),
      generate=lambda prompts, pixels, keys, max_new: ([x[3] for x in asked], 0))
  path = str(tmp_path / "scenes_vqa_answers.jsonl")
  metrics = quality.scenes_vqa(inf, answers_path=path)
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  assert metrics["answers"] == path and metrics["questions"] == len(rows) == 6
  assert [(r["question"], r["answer"], r["kind"]) for r in rows] == [(x[1], x[3], x[5]) for x in asked]
  assert [r["correct"] for r in rows] == [x[4] for x in asked]  # the checker agrees with the hand
  assert metrics["accuracy"] == sum(r["correct"] is True for r in rows) / len(rows) == 3 / 6
  assert metrics["by_kind"] == {"colour": 2 / 3, "count": 0.0, "existence": 0.0, "position": 1.0}
  assert [r["hallucinated"] for r in rows][4] == ["circle"] and metrics["hallucination"] == 1 / 6


def test_ablation_takes_the_readings_as_rows():
  from c3l_jax.pipeline import ConfigError, ablation, check_config
  from configs import scenes_ablation

  config = scenes_ablation.get_config()
  config.unlock()
  config.ablation.variants = ("as_generated,anchor_generated,anchor_neutral,negatives,"
                              "generation.qa_per_prompt=3+generation.initial_temperature=0.7,"
                              "scoring.length_norm=true")
  config.lock()
  check_config(config)
  rows = ablation.variant_rows(config)
  derived = {name: ablation.derive(config, row.overrides) for name, row in rows.items()}
  assert derived["+CRM+CLM as_generated"].train.inputs == "as_generated"
  assert derived["+CRM+CLM anchor_generated"].train.anchor == "generated"
  assert derived["+CRM+CLM anchor_neutral"].train.anchor_instruction == "neutral"
  assert derived["+CRM+CLM negatives"].train.contrastive_denominator == "negatives"
  for name in ("as_generated", "anchor_generated", "anchor_neutral", "negatives"):
    row = rows[f"+CRM+CLM {name}"]  # trains again on C3L's selection, from the shared initial data
    assert row.stages == ("train", "final", "export")
    assert row.links == {"initial": "initial", "filter": "filter", "score": "score",
                         "select": "crm_clm/select"}
    changed = {k for k, v in derived[f"+CRM+CLM {name}"].train.items() if config.train[k] != v}
    assert len(changed) == 1  # one reading per row, nothing else
  paper = rows["+CRM+CLM generation.qa_per_prompt=3+generation.initial_temperature=0.7"]
  assert paper.stages == ablation.GENERATOR_STAGES and paper.links == {}  # its own initial data
  assert paper.overrides == {"generation.qa_per_prompt": 3, "generation.initial_temperature": 0.7}
  norm = rows["+CRM+CLM scoring.length_norm=true"]
  assert norm.overrides == {"scoring.length_norm": True} and norm.stages[0] == "score"
  assert len({r.dirname for r in rows.values()}) == len(rows)
  for bad in ("train.nope=1", "train.steps=many", "train=1", "anchor"):
    config.unlock()
    config.ablation.variants = bad
    config.lock()
    with pytest.raises(ConfigError, match="ablation.variants"):
      check_config(config)


# -------------------------------------------- the generation stages' shards, without a model

class _Picture:
  def __init__(self, name: str, tokens: int):
    self.name, self.tokens = name, tokens


class _StubInference:
  """What `initial.generate_jobs` uses of `common.Inference`: a word tokenizer, an image source and a
  generator whose texts are a function of the prompt and its PRNG key. `wide*` images take 50 prompt
  tokens (the caption / VIGC prompt is over a 64-token context), `chatty*` images get a 30-word caption
  (two_step's step-2 prompt is over it), `bad*` images do not load."""

  max_len = 64

  def __init__(self, config, checkpoint=None, sampling=None):
    self.config = config
    self.builder = types.SimpleNamespace(encode_prompt=self._encode)
    self.source = types.SimpleNamespace(load=self._load)

  @staticmethod
  def _load(image):
    if image.startswith("bad"):
      raise ImageError("missing image")
    return _Picture(image, 50 if image.startswith("wide") else 4)

  @staticmethod
  def _encode(text, picture):
    return [1] * len(text.split()) + ([9] * picture.tokens if picture else []), picture

  def generate(self, prompts, pixels, keys, max_new_tokens, expected=None):
    import jax
    seeds = np.asarray(jax.random.key_data(keys)).reshape(len(prompts), -1)[:, -1] % 1000
    if pixels is not None and max_new_tokens == self.config.generation.caption_max_new_tokens \
        and self.config.generation.mode == "two_step":
      texts = [("word " * 30 if p.name.startswith("chatty") else "a red circle ") + str(s)
               for p, s in zip(pixels, seeds)]
    else:
      texts = [f"Question: what is {s}? Answer: it is {len(p)}" for p, s in zip(prompts, seeds)]
    return texts, 3 * len(prompts)


def _gen_config(mode):
  return types.SimpleNamespace(seed=0, strict=False, generation=types.SimpleNamespace(
      mode=mode, max_new_tokens=16, caption_max_new_tokens=16))


def _jobs(names, per_image=2, salt=0):
  from c3l_jax.data.sources import ImageItem
  from c3l_jax.pipeline import initial
  items = [ImageItem(image=n, image_id=n.split(".")[0]) for n in names]
  return initial.draw_jobs(items, per_image, {"conversation": 0.5, "complex_reasoning": 0.5},
                           np.random.default_rng(salt))


@pytest.mark.parametrize("mode", ["two_step", "direct"])
def test_generation_quarantines_sequences_over_the_context_and_counts_add_up(mode):
  from c3l_jax.pipeline import initial
  names = ["ok0.png", "bad.png", "wide.png", "chatty.png", "ok1.png"]
  jobs = _jobs(names)
  rows, rejected, counts = initial.generate_jobs(_StubInference(_gen_config(mode)), jobs, mode,
                                                 "initial", 0)
  over = {"two_step": ["wide.png", "chatty.png"], "direct": ["wide.png"]}[mode]
  assert [r["id"] for r in rows] == [j.id for j in jobs if j.item.image not in ["bad.png"] + over]
  assert all(r["question"].startswith("what is") for r in rows)
  assert [r["raw"]["image"] for r in rejected] == ["bad.png"] + [
      j.item.image for j in jobs if j.item.image in over]  # the image once, then each sample
  assert rejected[0]["reason"] == "missing image"
  for r in rejected[1:]:
    assert r["id"] == r["raw"]["id"] and "over the model's context of 64" in r["reason"], r
    assert r["reason"].startswith("caption prompt: ") == (mode == "two_step"
                                                           and r["raw"]["image"] == "wide.png")
  assert counts["images"] == 4 and counts["images_rejected"] == 1
  assert counts["samples"] == 8 and counts["samples_rejected"] == 2 * len(over)
  assert counts["samples"] == len(rows) + counts["samples_rejected"]
  assert counts["tokens"] == 3 * (len(rows) + (4 - 1 if mode == "two_step" else 0))  # + captions


class _MultiQAInference(_StubInference):
  """Answers `Question k: ... Answer k: ...` pairs, 0-3 of them by the row's PRNG key (0: nothing
  parsable), and records the prompts' texts."""

  def __init__(self, config):
    super().__init__(config)
    self.texts = []
    self.builder = types.SimpleNamespace(encode_prompt=self._record)

  def _record(self, text, picture):
    self.texts.append(text)
    return self._encode(text, picture)

  def generate(self, prompts, pixels, keys, max_new_tokens, expected=None):
    import jax
    if self.config.generation.mode == "two_step" and pixels is not None:  # the caption step
      return ["a red circle"] * len(prompts), 0
    seeds = np.asarray(jax.random.key_data(keys)).reshape(len(prompts), -1).sum(-1) // 7
    return [" ".join(f"Question {k}: what is {k}? Answer {k}: it is {k}." for k in range(s % 4))
            or "no pairs" for s in seeds], 0


@pytest.mark.parametrize("mode", ["two_step", "direct"])
def test_qa_per_prompt_asks_for_n_pairs_and_keeps_every_one(mode):
  from c3l_jax.pipeline import initial
  inf = _MultiQAInference(_gen_config(mode))
  jobs = _jobs(["ok0.png", "ok1.png", "ok2.png"], per_image=3)
  rows, rejected, counts = initial.generate_jobs(inf, jobs, mode, "initial", 0, qa_per_prompt=3)
  assert not rejected
  asked = [t for t in inf.texts if "Write 3 different question-answer pairs" in t]
  assert len(asked) == len(jobs)  # every QA prompt (not the caption prompts) asks for three
  by_job = {j.id: [r for r in rows if r["id"].rsplit("_", 1)[0] == j.id] for j in jobs}
  expected_pairs = []
  for job in jobs:
    got = by_job[job.id]
    n = sum(1 for _ in ins.parse_qa_pairs(got[0]["output"]))  # counted again from the raw answer
    n_hand = got[0]["output"].count("Answer ")  # and by hand: one "Answer k:" per pair
    assert n == n_hand
    assert [r["id"] for r in got] == [f"{job.id}_{k}" for k in range(max(n, 1))]
    assert [(r["question"], r["answer"]) for r in got] == (
        [(f"what is {k}?", f"it is {k}.") for k in range(n)] or [("", "")])
    assert all(r["prompt"] in asked for r in got)
    expected_pairs.append(max(n, 1))
  assert max(map(len, by_job.values())) > 1 and 0 in [  # several pairs, and none
      ins.parse_qa_pairs(v[0]["output"]).__len__() for v in by_job.values()]
  assert counts["samples"] + counts["extra_pairs"] == len(rows) == sum(expected_pairs)
  one, _, ones = initial.generate_jobs(_MultiQAInference(_gen_config(mode)), jobs, mode, "initial", 0)
  assert [r["id"] for r in one] == [j.id for j in jobs] and ones["extra_pairs"] == 0


def test_initial_sampling_overrides_the_generation_settings():
  from c3l_jax.pipeline import common, initial
  gen = types.SimpleNamespace(temperature=0.0, top_p=1.0, top_k=0, initial_temperature=-1.0,
                              initial_top_p=-1.0)
  config = types.SimpleNamespace(generation=gen)
  assert initial.initial_sampling(config) == {"temperature": 0.0, "top_p": 1.0}  # today's: greedy
  gen.initial_temperature, gen.initial_top_p = 0.7, 0.9
  assert initial.initial_sampling(config) == {"temperature": 0.7, "top_p": 0.9}
  inf = types.SimpleNamespace(config=types.SimpleNamespace(generation=vars(gen)),
                              sampling=initial.initial_sampling(config),
                              builder=types.SimpleNamespace(eos_ids=(2,), stop_sequences=(), pad_id=0))
  cfg = common.Inference.sampling_config(inf, 8)
  assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens) == (0.7, 0.9, 0, 8)


def test_processes_take_disjoint_shards_that_cover_all():
  from c3l_jax import runtime
  for count in (1, 2, 3):
    taken = [runtime.Runtime(index, count).my_shards(range(7)) for index in range(count)]
    assert sorted(i for t in taken for i in t) == list(range(7))  # each shard exactly once
    assert taken[0] == list(range(0, 7, count))


def test_two_processes_write_the_shards_one_process_writes(tmp_path, monkeypatch, caplog):
  """`run_generation` on two simulated hosts (threads, each with its runtime; a barrier is a
  threading.Barrier) in one workdir: process 1 takes the odd shards, process 0 the even ones and
  gathers; every file equals a one-process run's."""
  import logging
  import threading

  from c3l_jax import runtime
  from c3l_jax.pipeline import common, initial

  host = threading.local()
  barrier = threading.Barrier(2)

  class ThreadRuntime(runtime.Runtime):
    def barrier(self, name):
      barrier.wait()

    def check(self, point=""):
      pass

  monkeypatch.setattr(runtime, "get", lambda: host.rt)
  monkeypatch.setattr(common, "Inference", _StubInference)
  generated = []
  real = initial.generate_jobs
  monkeypatch.setattr(initial, "generate_jobs", lambda inf, jobs, mode, stage, shard, **kw: (
      generated.append((host.rt.index, shard)), real(inf, jobs, mode, stage, shard, **kw))[1])

  names = ["ok0.png", "bad.png", "wide.png", "chatty.png", "ok1.png", "ok2.png", "bad2.png"]
  chunks = [_jobs(names[i:i + 2], salt=i) for i in range(0, len(names), 2)]
  upfront = [{"raw": "{", "reason": "malformed JSON", "line": 3}]
  config = _gen_config("two_step")

  def run(workdir, count, index, out):
    host.rt = ThreadRuntime(index, count) if count > 1 else runtime.Runtime()
    out[index] = initial.run_generation(config, str(workdir), "initial", chunks, "two_step", None,
                                        upfront, records=len(names) + 1)

  single, double = {}, {}
  run(tmp_path / "one", 1, 0, single)
  generated.clear()
  threads = [threading.Thread(target=run, args=(tmp_path / "two", 2, i, double)) for i in (1, 0)]
  with caplog.at_level(logging.INFO):
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  assert sorted(generated) == [(0, 0), (0, 2), (1, 1), (1, 3)]
  one, two = tmp_path / "one" / "initial", tmp_path / "two" / "initial"
  assert sorted(os.listdir(one)) == sorted(os.listdir(two))
  for name in os.listdir(one):
    assert (one / name).read_bytes() == (two / name).read_bytes(), name
  assert double[0] == double[1] == single[0]
  m = single[0]
  assert m["read"] == m["images"] + m["rejected"] == len(names) + 1
  assert (m["images"], m["rejected"]) == (5, 3)  # bad.png, bad2.png, the malformed line
  assert m["samples"] == 2 * m["images"] == m["written"] + m["samples_rejected"]
  assert m["samples_rejected"] == 4  # wide.png's and chatty.png's
  assert len((one / "rejected.jsonl").read_text().splitlines()) == m["rejected"] + m["samples_rejected"]
  # Each process logs its shards.
  done = sorted(r.getMessage() for r in caplog.records if "shard" in r.getMessage())
  assert [d.split(" (")[0] for d in done] == [f"initial: shard {i} done" for i in range(4)]


def test_a_stage_reads_only_a_finished_input_never_data_records_instead(tmp_path):
  """`common.input_stage`: the previous stage, when it runs in this job or started in this workdir, must
  have finished (else BadInput); `data.records` is the input only when it neither ran nor started."""
  from configs import common as config_common
  from c3l_jax.data.records import BadInput
  from c3l_jax.pipeline import common

  config = config_common.get_base_config()
  config.data.records = str(tmp_path / "records.jsonl")
  work = tmp_path / "w"
  work.mkdir()
  config.stages = "score"
  assert common.input_stage(config, str(work), ("filter",)) is None  # filter not run: data.records
  config.stages = "filter,score"
  with pytest.raises(BadInput, match=r"WORKDIR/filter, is not finished"):
    common.input_stage(config, str(work), ("filter",))  # in this job, not done: never data.records
  config.stages = "score"
  (work / "filter").mkdir()  # started here earlier (a killed run), not finished
  with pytest.raises(BadInput, match="filter/DONE.json is missing"):
    common.input_stage(config, str(work), ("filter",))
  (work / "filter" / "DONE.json").write_text("{}")
  assert common.input_stage(config, str(work), ("filter",)) == "filter"
  config.data.records = ""
  with pytest.raises(BadInput, match="config.data.records is not set"):
    common.input_stage(config, str(tmp_path / "empty"), ("filter",))


def test_ablation_fine_tunes_the_student(tmp_path, monkeypatch):
  """With `ablation.student`, every downstream run (the rows' fine-tunes and the reference eval) starts
  from the student, and the reference row is named after it; a student that is not a model directory is
  a config error."""
  from c3l_jax import pipeline
  from c3l_jax.pipeline import ablation
  from configs import scenes_ablation

  config = scenes_ablation.get_config()
  assert config.ablation.student == "checkpoints/scenes_student"  # the shipped student (captions only)
  pipeline.check_config(config)  # no ConfigError: it exists (relative to the repository, as the demo runs)
  config = ablation.derive(config, {"ablation.student": "", "ablation.student_data": ""})
  assert ablation.reference_row(config) == "base model"
  assert ablation.reference_row(ablation.derive(config, {"ablation.student_data": "scenes"})) == \
      "base model + own data"
  seen = []
  monkeypatch.setattr(pipeline, "run_stages",
                      lambda cfg, workdir, stages: seen.append((cfg, tuple(stages))) or {"eval": {}})
  student = ablation.derive(config, {"ablation.student": "/models/student"})
  ablation._downstream(student, str(tmp_path / "row"), [{"id": "a", "image": "x", "question": "q",
                                                          "answer": "y"}], "row")
  ablation._downstream(student, str(tmp_path / "base"), [], "base")
  assert [stages for _, stages in seen] == [("train", "eval"), ("eval",)]
  assert all(cfg.model.checkpoint == "/models/student" for cfg, _ in seen)
  assert ablation.reference_row(student) == "student"
  seen.clear()
  ablation._downstream(config, str(tmp_path / "row2"), [{"id": "a", "image": "x", "question": "q",
                                                         "answer": "y"}], "row")
  assert seen[0][0].model.checkpoint == config.model.checkpoint
  with pytest.raises(pipeline.ConfigError, match="ablation.student"):
    pipeline.check_config(student)  # its stages include `ablation`


def test_ablation_mixes_the_students_own_data_at_its_share():
  """`mix`: a row's N generated records plus round(N s / (1 - s)) of the student's own, counted by hand
  for three shares; the own part is the same for a seed (and a prefix of a larger one's), another
  order for another seed; a mix the data cannot fill is bad input."""
  from c3l_jax.data.records import BadInput
  from c3l_jax.pipeline import ablation

  generated = [{"id": f"gen{i}"} for i in range(12)]
  own = [{"id": f"own{i}"} for i in range(40)]
  for share, mine in ((0.5, 12), (0.2, 3), (0.75, 36)):  # 12 * 0.5/0.5, 12 * 0.2/0.8, 12 * 0.75/0.25
    records = ablation.mix(generated, own, share, seed=3)
    assert records[:12] == generated and len(records) == 12 + mine
    assert sum(r["id"].startswith("own") for r in records) == mine
    assert mine / len(records) == pytest.approx(share)
    assert len({r["id"] for r in records}) == len(records)  # drawn without repeats
  part = ablation.mix(generated, own, 0.5, seed=3)[12:]
  assert ablation.mix(generated, own, 0.5, seed=3)[12:] == part  # deterministic per seed
  assert ablation.mix(generated[:5], own, 0.5, seed=3)[5:] == part[:5]  # nested: a prefix
  assert ablation.mix(generated, own, 0.5, seed=4)[12:] != part  # another seed, another part
  assert ablation.student_part(own, 12, 3) == part  # the reference row trains on the same records
  with pytest.raises(BadInput, match="holds 40 records, the mix needs 48"):
    ablation.mix(generated, own, 0.8, seed=3)


def test_ablation_student_data_config_errors(tmp_path):
  """`ablation.student_data` / `student_data_share`: each bad value is a one-line ConfigError."""
  from c3l_jax.pipeline import ConfigError, ablation, check_config
  from configs import scenes_ablation

  config = scenes_ablation.get_config()
  assert (config.ablation.student_data, config.ablation.student_data_share) == ("scenes", 0.5)
  assert config.ablation.student_steps > 0  # the student is instruction-tuned on its data first
  check_config(config)
  few = tmp_path / "few.jsonl"
  few.write_text("".join(json.dumps({"id": str(i), "image": "scene_000000.png", "question": "q?",
                                     "answer": "a"}) + "\n" for i in range(3)))
  enough = ablation.derive(config, {"ablation.student_data": str(few), "generation.num_final": 3})
  check_config(enough)  # 3 generated records need 3 of the student's at 0.5
  for overrides, message in (
      ({"ablation.student_data_share": 1.0},
       r"student_data_share=1.0 is out of range \(must be in \[0.0, 1.0\)\)"),
      ({"ablation.student_data_share": -0.1}, "student_data_share=-0.1 is out of range"),
      ({"ablation.student_data_share": 0.0}, "student_data_share=0.0 must be > 0"),
      ({"ablation.student_data": str(tmp_path / "none.jsonl")}, "is neither a records file nor a source"),
      ({"ablation.student_data": "records"}, "that source builds no instruction data"),
      ({"ablation.student_data": str(few)}, "holds 3 valid records; .* needs 300"),
      ({"ablation.student_data": str(few), "generation.num_final": 3, "ablation.student_data_share": 0.7},
       "needs 7"),  # 3 * 0.7 / 0.3
      ({"data.source": "records", "data.records": str(few)}, "needs config.data.source='scenes'")):
    with pytest.raises(ConfigError, match=message):
      check_config(ablation.derive(config, overrides))
  with pytest.raises(ConfigError, match="student_steps=1000 needs config.ablation.student_data"):
    check_config(ablation.derive(config, {"ablation.student_data": ""}))
  with pytest.raises(ConfigError, match="student_steps=-1 is out of range"):
    check_config(ablation.derive(config, {"ablation.student_steps": -1}))
  check_config(ablation.derive(config, {"ablation.student_data": "", "ablation.student_data_share": 0.0,
                                        "ablation.student_steps": 0}))  # today's protocol


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="memory maps are counted on Linux")
def test_ablation_frees_compiled_code_before_the_map_limit(monkeypatch):
  """The 3-seed ablation crashed in its third seed ("LLVM compilation error: Cannot allocate memory"): the
  jit caches kept every row's compiled programs mapped until the process reached vm.max_map_count. Past
  half the limit, `release` clears the caches and the maps of the freed programs go."""
  import jax
  import jax.numpy as jnp

  from c3l_jax.pipeline import ablation

  f = jax.jit(lambda x: jnp.sin(x) * 2 + 1)
  for n in range(1, 41):  # 40 programs
    f(jnp.ones(n)).block_until_ready()
  assert f._cache_size() == 40
  maps = ablation._memory_maps()
  monkeypatch.setattr(ablation, "_map_limit", lambda: 2 * maps + 1000)  # well below half: kept
  assert not ablation.release("kept") and f._cache_size() == 40
  monkeypatch.setattr(ablation, "_map_limit", lambda: 2 * maps - 2)  # just over half: cleared
  assert ablation.release("cleared") and f._cache_size() == 0
  assert ablation._memory_maps() < maps - 100  # 40 small CPU programs held ~300 maps
  monkeypatch.setattr(ablation, "_map_limit", lambda: None)  # no limit (not Linux): never cleared
  f(jnp.ones(3))
  assert not ablation.release("no limit") and f._cache_size() == 1


class _KeyValueStore:
  """The coordination service's key-value store, as the runtime uses it (one dict for every process)."""

  def __init__(self):
    self.data, self.lock = {}, threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      assert allow_overwrite or key not in self.data
      self.data[key] = value

  def key_value_try_get(self, key):
    with self.lock:
      if key not in self.data:
        raise KeyError(f"NOT_FOUND: {key}")
      return self.data[key]

  def key_value_dir_get(self, prefix):
    with self.lock:
      return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]


def test_watchdog_names_the_process_that_stopped_beating():
  """Three processes' watchdogs on one store; process 2 never beats (SIGKILLed before its first
  heartbeat), process 1 leaves on purpose (`stop`: `done`): process 0's watchdog reports process 2, and
  only it."""
  store = _KeyValueStore()
  lost = queue.Queue()
  rts = [runtime.Runtime(i, 3, store) for i in range(3)]
  dogs = [runtime.Watchdog(rts[i], 0.5, lambda j, how, i=i: lost.put((i, j, how)), interval_s=0.02)
          for i in range(2)]
  for dog in dogs:
    dog.start()
  dogs[1].stop()
  seen, process, how = lost.get(timeout=30)
  assert (seen, process) == (0, 2) and "no heartbeat" in how
  assert store.data["c3l/alive/1"] == "done" and "c3l/alive/2" not in store.data
  dogs[0].stop()
  assert lost.empty()
  assert runtime.watchdog_limit_s(100) == 40 and runtime.watchdog_limit_s(15) == 6
