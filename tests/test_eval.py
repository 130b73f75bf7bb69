"""POPE construction / parsing / metrics, multiple-choice scoring (CircularEval), the Table-1 table and the
eval config checks: host-side logic against hand-computed values (no model)."""

from __future__ import annotations

import base64
import io
import json

import PIL.Image
import pytest

from c3l_jax import pipeline
from c3l_jax.data.records import BadInput
from c3l_jax.eval import llava_bench, multiple_choice as mc, pope, table
from configs import llava15

# A hand-made annotation set: 7 object names; im4 has only 2 objects (not eligible with k = 3).
ANNOTATIONS = [
    {"image": "im1.jpg", "objects": ["a", "b", "c"]},
    {"image": "im2.jpg", "objects": ["a", "b", "d"]},
    {"image": "im3.jpg", "objects": ["a", "c", "e"]},
    {"image": "im4.jpg", "objects": ["b", "f"]},
    {"image": "im5.jpg", "objects": ["a", "b", "c", "g"]},
]
DRAWN = [a for a in ANNOTATIONS if a["image"] != "im4.jpg"]


def _pairs(questions, image):
  """[(positive, negative), ...] of one image, in question order."""
  qs = [q for q in questions if q["image"] == image]
  assert [q["label"] for q in qs] == ["yes", "no"] * (len(qs) // 2)
  return [(qs[i]["object"], qs[i + 1]["object"]) for i in range(0, len(qs), 2)]


def test_pope_statistics_hand_computed():
  freq, co = pope.object_statistics(DRAWN)
  assert freq == {"a": 4, "b": 3, "c": 3, "d": 1, "e": 1, "g": 1}
  assert co["a"] == ["b", "c", "d", "e", "g"]  # b: 3 images, c: 3, then the 1s by name
  assert co["b"] == ["a", "c", "d", "g"]
  assert co["c"] == ["a", "b", "e", "g"]
  assert co["d"] == ["a", "b"]


def test_pope_adversarial_negatives_are_top_cooccurring():
  qs = pope.build_split(DRAWN, "adversarial", k=3, seed=0, universe="abcdefg")
  # im1 {a, b, c}: a's ranking b, c (present) -> d; b's: a, c (present), d (used) -> g; c's: a, b -> e.
  assert _pairs(qs, "im1.jpg") == [("a", "d"), ("b", "g"), ("c", "e")]
  # im2 {a, b, d}: a -> c; b's ranking a, c (used), d (present) -> g; d's ranking a, b is exhausted:
  # random among the names neither present nor used, e or f.
  pairs = _pairs(qs, "im2.jpg")
  assert pairs[:2] == [("a", "c"), ("b", "g")] and pairs[2][0] == "d" and pairs[2][1] in ("e", "f")
  popular = pope.build_split(DRAWN, "popular", k=3, seed=0, universe="abcdefg")
  # popularity a 4, b 3, c 3, d/e/g 1 (by name): im1 gets d, e, g in turn.
  assert _pairs(popular, "im1.jpg") == [("a", "d"), ("b", "e"), ("c", "g")]
  # im5 {a, b, c, g}: d, e, then the ranking is used up (g present): the one name left, f.
  assert _pairs(popular, "im5.jpg") == [("a", "d"), ("b", "e"), ("c", "f")]


def test_pope_split_counts_and_no_present_negative():
  splits = pope.build_splits(ANNOTATIONS, num_images=0, k=3, seed=1)
  assert set(splits) == {"random", "popular", "adversarial"}
  present = {a["image"]: set(a["objects"]) for a in ANNOTATIONS}
  for split, qs in splits.items():
    assert len(qs) == 4 * 6  # 4 eligible images (im4 has 2 objects), 3 yes + 3 no each
    assert sorted({q["image"] for q in qs}) == ["im1.jpg", "im2.jpg", "im3.jpg", "im5.jpg"]
    assert [q["question_id"] for q in qs] == list(range(24))
    for q in qs:
      assert q["category"] == split
      assert (q["object"] in present[q["image"]]) == (q["label"] == "yes")
      assert q["text"] == pope.question_text(q["object"])
    for image in present:
      objs = [q["object"] for q in qs if q["image"] == image]
      assert len(objs) == len(set(objs))  # no object asked twice about one image
  # 2 of the 4 eligible images drawn, the same ones in every split, reproducibly.
  small = pope.build_splits(ANNOTATIONS, num_images=2, k=3, seed=1)
  images = {s: [q["image"] for q in qs][::6] for s, qs in small.items()}
  assert all(len(qs) == 12 for qs in small.values()) and len(set(map(tuple, images.values()))) == 1
  assert pope.build_splits(ANNOTATIONS, num_images=2, k=3, seed=1) == small
  # The scenes world has 5 categories: k is lowered to 2.
  assert pope.effective_k(3, ["circle", "square", "triangle", "star", "cross"]) == 2
  assert pope.effective_k(3, [f"o{i}" for i in range(80)]) == 3
  with pytest.raises(ValueError, match="no image has >= 4"):
    pope.build_splits(ANNOTATIONS, k=4)


def test_pope_question_text_articles():
  assert pope.question_text("dog") == "Is there a dog in the image?"
  assert pope.question_text("oven") == "Is there an oven in the image?"
  assert pope.question_text("apple") == "Is there an apple in the image?"
  assert pope.question_text("dining table") == "Is there a dining table in the image?"


@pytest.mark.parametrize("text,want", [
    ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("No, there is no cat.", "no"),
    ("Yes, there is a dog in the image.", "yes"), ("There is no dog in the image.", "no"),
    ("The dog is not visible", "no"), ("no, it is not", "no"),
    ("Not at all", "yes"),  # only "No", "no" and "not" count
    ("NO", "yes"), ("None", "yes"), ("I don't think so", "yes"), ("", "yes"),
    ("Yes. No.", "yes"),  # only the first sentence
    ("No\nthere is none", "yes"),  # split on spaces only: "No\nthere" is one word
])
def test_pope_yes_no_parser_reference_edge_cases(text, want):
  assert pope.parse_yes_no(text) == want


def test_pope_metrics_hand_computed():
  m = pope.metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
  assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
  assert m["accuracy"] == pytest.approx(0.6)
  assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
  assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(0.6)
  m = pope.metrics(["no"] * 4, ["yes", "no", "no", "yes"])  # no "yes": the reference divides by 0
  assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.5, 0, 0, 0, 0)
  s = pope.summarize({"random": {**m, "f1": 0.9}, "popular": {**m, "f1": 0.6},
                      "adversarial": {**m, "f1": 0.3}})
  assert s["mean_f1"] == pytest.approx(0.6) and s["mean_accuracy"] == pytest.approx(0.5)


def test_pope_reads_official_question_files(tmp_path):
  for split in pope.SPLITS:
    with open(tmp_path / f"coco_pope_{split}.json", "w") as f:
      f.write(json.dumps({"question_id": 1, "image": "COCO_val2014_000000000042.jpg",
                          "text": "Is there an oven in the image?", "label": "no"}) + "\n")
  with open(tmp_path / "coco_pope_adversarial.json", "a") as f:
    f.write('{"question_id": 2, "image": "a.jpg"\n')
    f.write(json.dumps({"question_id": 3, "image": "a.jpg", "text": "Is there a cat?", "label": "maybe"}) + "\n")
    f.write(json.dumps({"question_id": 4, "image": "a.jpg", "label": "yes"}) + "\n")
  got, rejected = pope.read_question_files(str(tmp_path))
  assert got["popular"] == [{"question_id": 1, "image": "COCO_val2014_000000000042.jpg",
                             "text": "Is there an oven in the image?", "label": "no",
                             "category": "popular"}]
  assert len(got["adversarial"]) == 1 and rejected["random"] == rejected["popular"] == []
  assert [(r["line"], r["reason"].split(":")[0]) for r in rejected["adversarial"]] == [
      (2, "malformed JSON"), (3, "label must be yes or no, got 'maybe'"), (4, "missing field 'text'")]
  with pytest.raises(BadInput, match=r"coco_pope_adversarial.json:2: malformed JSON"):
    pope.read_question_files(str(tmp_path), strict=True)
  (tmp_path / "coco_pope_random.json").unlink()
  with pytest.raises(BadInput, match="random"):
    pope.read_question_files(str(tmp_path))


def test_pope_annotations_quarantine_bad_lines(tmp_path):
  path = tmp_path / "gt.jsonl"
  path.write_bytes(b'{"image": "a.jpg", "objects": ["dog", "cat"]}\n'
                   b'{"image": "b.jpg", "objects": "dog"}\n'
                   b'\xff{"image": "c.jpg"}\n'
                   b'["d.jpg"]\n'
                   b'{"objects": ["car"]}\n')
  annotations, rejected = pope.read_annotations(str(path))
  assert [a["image"] for a in annotations] == ["a.jpg"]
  assert [(r["line"], r["reason"]) for r in rejected] == [
      (2, "'objects' must be a list of object names"), (3, "line is not valid UTF-8"),
      (4, "a record must be a JSON object, got list"), (5, "missing field 'image'")]
  with pytest.raises(BadInput, match="file not found"):
    pope.read_annotations(str(tmp_path / "none.jsonl"))


ITEM = mc.MCItem(id="q1", question="What is red?", options=("sky", "circle", "grass", "sea"), answer=1,
                 task="Instance Attributes")


def test_rotations_move_the_answer():
  assert mc.rotated(ITEM, 0) == (("sky", "circle", "grass", "sea"), 1)
  assert mc.rotated(ITEM, 1) == (("circle", "grass", "sea", "sky"), 0)
  assert mc.rotated(ITEM, 2) == (("grass", "sea", "sky", "circle"), 3)
  assert mc.rotated(ITEM, 3) == (("sea", "sky", "circle", "grass"), 2)
  assert mc.choice_prompt(ITEM, mc.rotated(ITEM, 1)[0]) == (
      "What is red?\nA. circle\nB. grass\nC. sea\nD. sky\n"
      "Answer with the option's letter from the given choices directly.")


def test_circular_eval_one_failed_rotation_counts_wrong():
  from c3l_jax.pipeline.eval import _mc_metrics, _mc_row

  # Right answers per rotation are B, A, D, C; the last rotation is answered "A" (wrong).
  failed = _mc_row(ITEM, outputs=["B", "A.", "The answer is D", "A"])
  assert failed["predictions"] == [1, 0, 3, 0] and failed["targets"] == [1, 0, 3, 2]
  ok = _mc_row(mc.MCItem("q2", "?", ("x", "y"), 0, "Scene"), outputs=["A", "(B) x"])
  metrics = _mc_metrics([failed, ok], circular=True, mode="generate", n_rejected=0)
  assert metrics["overall"] == 50.0 and metrics["n"] == 2
  assert metrics["per_task"] == {"Instance Attributes": 0.0, "Scene": 100.0}
  # Without CircularEval (SEED) only the first pass counts: both right.
  assert _mc_metrics([failed, ok], circular=False, mode="generate", n_rejected=0)["overall"] == 100.0
  # Likelihood scores are order-free: every rotation sees the same best option.
  row = _mc_row(ITEM, scores=[-1.0, -0.5, -2.0, float("-inf")])
  assert row["predictions"] == row["targets"] and row["scores"][3] is None
  assert mc.circular_correct(row["predictions"], row["targets"])
  wrong = _mc_row(ITEM, scores=[-0.1, -0.5, -2.0, -3.0])
  assert not mc.circular_correct(wrong["predictions"], wrong["targets"])


@pytest.mark.parametrize("text,want", [
    ("B", 1), ("The answer is B.", 1), ("(C) grass", 2), ("D: sea", 3),
    ("A dog", 0),  # a lone "A" is the letter, as MMBench's can_infer
    ("B or C", None),  # two letters and no option text
    ("it is the circle", 1),  # no letter: the one option text it contains
    ("sky and sea", None), ("", None),
])
def test_parse_choice_as_mmbench_can_infer(text, want):
  assert mc.parse_choice(text, ITEM.options) == want


def _png_b64(colour) -> str:
  buf = io.BytesIO()
  PIL.Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode()


def test_load_official_files(tmp_path):
  seed = {"questions": [
      {"answer": "C", "choice_a": "1", "choice_b": "2", "choice_c": "3", "choice_d": "4",
       "data_id": "1_2.jpg", "data_type": "image", "question": "How many?", "question_id": "101",
       "question_type_id": 5},
      {"answer": "B", "choice_a": "x", "choice_b": "y", "choice_c": "z", "choice_d": "w",
       "data_id": "94328.webm", "data_type": "video", "question": "What action?",
       "question_id": "v1", "question_type_id": 10},
      {"answer": "a", "choice_a": "p", "choice_b": "q", "choice_c": "r", "choice_d": "s",
       "data_id": "3_4.jpg", "data_type": "image", "question": "Where?", "question_id": "102",
       "question_type_id": 4}],
      "question_type": {"Instance Location": 4, "Instances Counting": 5, "Action Recognition": 10}}
  good = seed["questions"][0]
  seed["questions"] += [
      "not a question",
      {k: v for k, v in good.items() if k != "choice_d"},
      {**good, "question_id": "103", "answer": "E"},
      {**good, "question_id": "101"},
      {**good, "question_id": "104", "question_type_id": "dimension five"}]
  (tmp_path / "SEED-Bench.json").write_text(json.dumps(seed))
  items, rejected = mc.load_seed_bench(str(tmp_path / "SEED-Bench.json"), "/imgs")
  assert [(i.id, i.answer, i.task, i.image) for i in items] == [
      ("101", 2, "Instances Counting", "/imgs/1_2.jpg"), ("102", 0, "Instance Location", "/imgs/3_4.jpg")]
  assert [(r["index"], r["reason"]) for r in rejected] == [
      (3, "a question must be a JSON object, got str"), (4, "missing field 'choice_d'"),
      (5, "answer 'E' is not one of A-D"), (6, "duplicate question_id '101'"),
      (7, "question_type_id must be a dimension number, got 'dimension five'")]
  with pytest.raises(BadInput, match=r"SEED-Bench.json \(index 3\): a question must be"):
    mc.load_seed_bench(str(tmp_path / "SEED-Bench.json"), "/imgs", strict=True)
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(BadInput, match="not a JSON file"):
    mc.load_seed_bench(str(tmp_path / "bad.json"), "/imgs")
  red = _png_b64("red")
  rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"],
          ["7", "Which colour?", "Look closely.", "red", "blue", "green", "nan", "A", "attribute", red],
          ["8", "Same image?", "nan", "yes", "no", "", "", "B", "reasoning", "7"],
          ["9", "One option?", "nan", "yes", "", "", "", "A", "reasoning", red],
          ["10", "Which colour?", "nan", "red", "blue", "", "", "C", "attribute", red],
          ["11", "Which colour?", "nan", "red", "blue", "", "", "A", "attribute", "not*base64"],
          ["12", "Which colour?", "nan", "red", "blue", "", "", "A", "attribute", "99"],
          ["7", "Again?", "nan", "red", "blue", "", "", "A", "attribute", red],
          ["", "No index?", "nan", "red", "blue", "", "", "A", "attribute", red]]
  (tmp_path / "mmb.tsv").write_text("\n".join("\t".join(r) for r in rows) + "\n")
  items, rejected = mc.load_mmbench(str(tmp_path / "mmb.tsv"))
  assert [(r["line"], r["raw"]["index"], r["reason"].split(" (")[0]) for r in rejected] == [
      (4, "9", "1 options"), (5, "10", "answer 'C' is outside its 2 options"),
      (6, "11", "image is not valid base64"), (7, "12", "no image"), (8, "7", "duplicate index '7'"),
      (9, "", "no index or no question")]
  assert all("image" not in r["raw"] for r in rejected)  # the base64 is not copied into the quarantine
  with pytest.raises(BadInput, match=r"mmb.tsv:4: 1 options"):
    mc.load_mmbench(str(tmp_path / "mmb.tsv"), strict=True)
  assert [(i.id, i.options, i.answer, i.task, i.hint) for i in items] == [
      ("7", ("red", "blue", "green"), 0, "attribute", "Look closely."),
      ("8", ("yes", "no"), 1, "reasoning", "")]
  assert items[1].image_bytes == items[0].image_bytes == base64.b64decode(red)
  assert mc.question_text(items[0]) == "Look closely.\nWhich colour?"


def test_llava_bench_answer_file_format(tmp_path):
  (tmp_path / "questions.jsonl").write_text(
      json.dumps({"image": "001.jpg", "text": "What is this?", "category": "conv", "question_id": 0}) + "\n")
  with open(tmp_path / "questions.jsonl", "a") as f:
    f.write('{"image": "002.jpg", "text": "Where?"}\n{"question_id": 2, "image": "003.jpg"\n')
  (q,), rejected = llava_bench.read_questions(str(tmp_path))
  assert [(r["line"], r["reason"].split(":")[0]) for r in rejected] == [
      (2, "missing field 'question_id'"), (3, "malformed JSON")]
  assert q["image_path"] == str(tmp_path / "images" / "001.jpg")
  rec = llava_bench.answer_record(q, "A cat.", "my-model")
  assert set(rec) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
  assert (rec["question_id"], rec["prompt"], rec["text"], rec["model_id"]) == (0, "What is this?",
                                                                             "A cat.", "my-model")
  assert rec == llava_bench.answer_record(q, "A cat.", "my-model")  # deterministic answer_id


def test_table_row_and_details():
  metrics = {"pope": {"mean_f1": 0.7604, **{s: {"accuracy": 0.8, "precision": 0.9, "recall": 0.7,
                                                 "f1": 0.76, "yes_ratio": 0.4, "n": 30}
                                              for s in pope.SPLITS}},
             "seed": {"overall": 56.09, "n": 3, "per_task": {"Scene Understanding": 56.09},
                      "mode": "loglik"}}
  assert table.table_row(metrics) == {"SEED": "56.1", "LLaVA^W": "-", "MMB": "-", "POPE": "76.0"}
  text = table.format_table("llava-c3l", metrics, {"instances": 5000, "avg_question_words": 23.4,
                                                   "avg_answer_words": 12.8})
  lines = text.splitlines()
  assert lines[0].split() == ["Method", "SEED", "LLaVA^W", "MMB", "POPE"]
  assert lines[1].split() == ["llava-c3l", "56.1", "-", "-", "76.0"]
  assert "adversarial" in text and "5000" in text and "23.4" in text


def test_eval_config_checks():
  config = llava15.get_config("tiny")
  assert config.eval.benchmarks == "pope" and config.eval.mc_mode == "loglik"
  for field, value, needle in (("benchmarks", "pope,gqa", "'gqa'"), ("mc_mode", "vote", "mc_mode"),
                               ("pope_objects", 0, "pope_objects"), ("max_new_tokens", 0, "max_new")):
    bad = llava15.get_config("tiny")
    with bad.unlocked():
      bad.eval[field] = value
    with pytest.raises(pipeline.ConfigError, match=needle):
      pipeline.check_config(bad)
  ok = llava15.get_config("tiny")
  with ok.unlocked():
    ok.select.method = "vigc"
    ok.eval.benchmarks = "seed, mmbench,pope"
  pipeline.check_config(ok)
  # vigc generates in the select stage, so select needs a model then (and only then).
  assert pipeline.needs_model(("select",), ok) == ("select",)
  assert any("model.checkpoint" in p for p in pipeline.environment_problems(ok, ("select",)))
  with ok.unlocked():
    ok.select.method = "self_instruct"
  assert pipeline.environment_problems(ok, ("select",)) == []
  # eval alone is checked against eval.checkpoint when one is given.
  with ok.unlocked():
    ok.eval.checkpoint = "/nonexistent/model"
  assert any("/nonexistent/model" in p for p in pipeline.environment_problems(ok, ("eval",)))


def test_selection_composition_on_hand_made_rows():
  """Eq. 1's sum favours long answers; the length-normalised ranking does not. Five rows, top 40 % = 2."""
  from c3l_jax.eval.selection import selection_composition

  rows = [  # (type, S(I2C), answer tokens); per-token S(I2C) = 0.10, 0.125, 0.5, 0.6, 0.05
      {"instruction_type": "detailed_description", "i2c": 3.0, "n_tokens": 30, "answer": "a b c d"},
      {"instruction_type": "detailed_description", "i2c": 2.5, "n_tokens": 20, "answer": "a b c"},
      {"instruction_type": "conversation", "i2c": 1.0, "n_tokens": 2, "answer": "red"},
      {"instruction_type": "complex_reasoning", "i2c": 1.2, "n_tokens": 2, "answer": "two"},
      {"instruction_type": "conversation", "i2c": 0.1, "n_tokens": 2, "answer": "yes"},
      {"instruction_type": "conversation", "i2c": None, "n_tokens": 2, "answer": "unscored"},
  ]
  verdicts = [{"image_dependent": True, "correct": False, "hallucinated": True},
              {"image_dependent": True, "correct": None, "hallucinated": False},
              {"image_dependent": True, "correct": True, "hallucinated": False},
              {"image_dependent": True, "correct": True, "hallucinated": False},
              {"image_dependent": False, "correct": None, "hallucinated": False},
              {"image_dependent": False, "correct": None, "hallucinated": False}]
  comp = selection_composition(rows, 0.4, verdicts)
  assert comp["all"]["n"] == 5  # the unscored row cannot be ranked
  assert comp["all"]["instruction_types"] == {"complex_reasoning": 0.2, "conversation": 0.4,
                                              "detailed_description": 0.4}
  top = comp["top_sum"]  # rows 0 and 1
  assert top["n"] == 2 and top["instruction_types"] == {"detailed_description": 1.0}
  assert top["avg_answer_words"] == 3.5 and top["avg_answer_tokens"] == 25.0
  assert (top["image_dependent"], top["correct"], top["hallucinated"]) == (1.0, 0.0, 0.5)
  norm = comp["top_length_norm"]  # rows 3 and 2
  assert norm["instruction_types"] == {"complex_reasoning": 0.5, "conversation": 0.5}
  assert (norm["avg_answer_tokens"], norm["correct"], norm["hallucinated"]) == (2.0, 1.0, 0.0)
  assert comp["all"]["correct"] == 2 / 3 and comp["all"]["image_dependent"] == 0.8
