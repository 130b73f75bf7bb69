"""Does the shipped scenes generator see? It is loaded from `checkpoints/scenes_tiny` and measured here on
held-out scenes against the grounding thresholds (`c3l_jax.scenes.grounding.THRESHOLDS`), not read from its
training_metrics.json. Also: the student, the grounded recipe's parts (stage-0 targets, balanced
existence questions, the cached image tokens) and the thresholds' arithmetic on hand-made reports."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from c3l_jax import scenes, sharding
from c3l_jax.scenes import grounded, grounding, vision
from c3l_jax.scenes import processor as sm
from c3l_jax.scenes.world import Scene, SceneObject

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "checkpoints", "scenes_tiny")
STUDENT = os.path.join(REPO, "checkpoints", "scenes_student")
# Held out: the grounded recipe trains on scenes 0..num_scenes-1 of world seed 1000 and checks itself on
# ids from grounded.eval_start_id (100000); these are neither.
HELDOUT = dict(num_images=40, seed=1000, start_id=200_000)


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def test_heldout_scenes_are_not_training_scenes():
  from configs import scenes_pretrain

  p = scenes_pretrain.get_config().pretrain
  assert p.world_seed == HELDOUT["seed"]
  assert p.num_scenes <= p.grounded.eval_start_id < HELDOUT["start_id"]
  assert p.grounded.eval_start_id + max(p.eval_scenes, p.grounded.eval_quick_scenes) <= HELDOUT["start_id"]


# Scenes of a world no training run, selection or tuning used (the recipe trains and chose its settings on
# world 1000, the demo and the ablation use worlds 0-2).
FRESH = dict(num_images=40, seed=7, start_id=500_000)
# What the shipped generator must keep on FRESH, with a margin of 4-6 questions per measure below what it
# measured there (docs/scenes.md: on FRESH VQA 83.8 %, colour 71.4 %, shape 61.4 %, the other kinds
# 83-100 %, POPE 100 % at a 50 % yes-ratio, captions 77.5 %, generic 88.8 % / 55.0 %). These are floors
# against regressions, below the testbed's design targets (`grounding.THRESHOLDS`), which the shipped
# generator meets on its own held-out sets but not, on shape and captions, on a world it never saw.
SHIPPED_FLOORS = {"vqa_accuracy": 0.75, "vqa_kind_accuracy": 0.50, "pope_accuracy": 0.90,
                  "pope_yes_ratio": (0.40, 0.60), "caption_correct": 0.65, "vigc_generic": 0.70,
                  "caption_qa_generic": 0.40}


def test_shipped_generator_keeps_its_grounding_on_a_fresh_world(mesh):
  """40 scenes of a world nothing was selected on: 240 VQA questions (40 per kind), POPE 80 per split,
  40 captions, 80 VIGC conversation / complex_reasoning outputs, 40 two-step QA. Greedy, through the
  pipeline's loading path; every measure above its floor (and the language prior still there)."""
  from configs import scenes_pretrain

  assert FRESH["seed"] != scenes_pretrain.get_config().pretrain.world_seed
  world = scenes.generate_world(**FRESH)
  report = grounding.measure(SHIPPED, world, mesh)
  print(json.dumps(report, indent=1))
  assert report["vqa"]["n"] == 6 * len(world)
  assert grounding.failures(report, SHIPPED_FLOORS) == []


def test_grounding_failures_names_each_threshold():
  report = {"vqa": {"accuracy": 0.5, "by_kind": {"colour": 0.9, "position": 0.2}},
            "pope": {"random": {"accuracy": 0.9, "yes_ratio": 0.9}},
            "caption": {"correct": 0.9}, "vigc": {"generic": 0.1}, "caption_qa": {"generic": 0.5}}
  bad = grounding.failures(report)
  assert len(bad) == 4 and any("position" in b for b in bad) and any("yes ratio" in b for b in bad)
  assert any(b.startswith("vqa accuracy") for b in bad) and any(b.startswith("vigc") for b in bad)
  good = {"vqa": {"accuracy": 0.85, "by_kind": {"colour": 0.7}},
          "pope": {"adversarial": {"accuracy": 0.85, "yes_ratio": 0.4}},
          "caption": {"correct": 0.8}, "vigc": {"generic": 0.3}, "caption_qa": {"generic": 0.3}}
  assert grounding.failures(good) == []
  assert grounding.failures(good, {**grounding.THRESHOLDS, "vqa_accuracy": 0.9}) == ["vqa accuracy 0.85 < 0.9"]


def test_pope_questions_are_balanced_and_split_by_strategy():
  world = scenes.generate_world(30, 1000, start_id=20000)
  splits = grounding.pope_questions(world, 0)
  assert set(splits) == set(grounding.POPE_SPLITS)
  for rows in splits.values():
    assert abs(np.mean([e for _, _, e in rows]) - 0.5) < 0.05
    for i, shape, exists in rows:
      assert (shape in scenes.object_names(world[i])) == exists


def test_existence_training_questions_are_balanced_and_true():
  world = scenes.generate_world(200, 1000)
  rng = np.random.default_rng(0)
  yes = []
  for s in world:
    q, a = grounded.existence_qa(s, rng, 0.5)
    yes.append(a.lower().startswith("yes"))
    assert scenes.check(s, q.replace(" Answer the question using a single word or phrase.", ""),
                        a).correct is True, (q, a)
  assert 0.4 <= np.mean(yes) <= 0.65


def test_relation_training_questions_are_balanced_and_true():
  """`grounded.relation_qa`: every question is a relation question the checker judges correct, about
  half are "yes" (the relation kind of `grounded_qa` is ~2/3 "no"), and a scene with one object has none."""
  world = scenes.generate_world(600, 1000)
  rng = np.random.default_rng(0)
  yes = []
  for s in world:
    qa = grounded.relation_qa(s, rng, 0.5)
    if len(s.objects) == 1:
      assert qa is None
    if qa is None:
      continue
    q, a = qa
    verdict = scenes.check(s, q.replace(" " + sm.SHORT_ANSWER_SUFFIX, ""), a)
    assert verdict.kind == "relation" and verdict.correct is True, (q, a)
    yes.append(a.lower().startswith("yes"))
  assert len(yes) > 400 and 0.43 <= np.mean(yes) <= 0.57


def test_vision_targets_of_a_hand_made_scene():
  """Two red stars (cells 0 and 8), one blue circle (cell 4): the per-cell and the binding labels."""
  objs = [SceneObject("star", "red", "small", 1 / 6, 1 / 6), SceneObject("circle", "blue", "large", 0.5, 0.5),
          SceneObject("star", "red", "large", 5 / 6, 5 / 6)]  # x, y: centres of cells 0, 4, 8
  scene = Scene(image_id=0, file_name="x.png", background="black", objects=objs)
  local, glob = vision.scene_targets(scene, 3)
  shapes, colours = scenes.SHAPES, scenes.COLOURS
  assert local[0, 0] == shapes.index("star") + 1 and local[4, 0] == shapes.index("circle") + 1
  assert local[1, 0] == 0 and local[4, 1] == colours.index("blue") + 1 and local[8, 2] == 2
  assert list(local[5, 3:]) == [1, 2]  # row, column of cell 5
  names = [n for n, _ in vision.GLOBAL_HEADS]
  value = dict(zip(names, glob))
  assert value["n_star"] == 2 and value["n_circle"] == 1 and value["n_red"] == 2 and value["n_objects"] == 3
  assert value["circle_colour"] == colours.index("blue") + 1 and value["circle_cell"] == 4 + 1
  assert value["star_colour"] == len(colours) + 1 and value["star_cell"] == 9 + 1  # several
  assert value["square_colour"] == 0 and value["square_cell"] == 0  # none
  assert value["blue_shape"] == shapes.index("circle") + 1 and value["red_shape"] == len(shapes) + 1
  assert value["green_shape"] == 0
  sizes = dict(vision.GLOBAL_HEADS)
  assert all(0 <= v < sizes[n] for n, v in value.items())
  # The optional background head: one more global label, the background's index; the rest unchanged.
  local_b, glob_b = vision.scene_targets(scene, 3, background=True)
  assert [n for n, _ in vision.global_heads(True)] == names + ["background"]
  assert glob_b[-1] == scenes.BACKGROUNDS.index("black") and list(glob_b[:-1]) == list(glob)
  assert (local_b == local).all()


def test_student_captions_without_instruction_data(mesh):
  """The student: stage 0 and the captioning decoder of the generator's run, no VQA / instruction data;
  it captions held-out scenes."""
  if not os.path.exists(STUDENT):
    pytest.skip("no shipped student")
  metrics = json.load(open(os.path.join(STUDENT, "training_metrics.json")))
  assert "generator_mix" not in metrics and metrics["student_captions"]["steps"] > 0
  world = scenes.generate_world(**HELDOUT)
  report = grounding.measure(STUDENT, world, mesh, parts=("caption",))
  assert report["caption"]["correct"] >= 0.5, report


def test_grounded_recipe_end_to_end(tmp_path, mesh):
  """`pretrain.run` with `recipe="grounded"`, a minute architecture and a few steps of each phase: the
  generator and the student are exported as model directories that load like converted checkpoints; the
  student's metrics have no instruction stage. And the loss the decoder trains on (cached image tokens
  written over the `<image>` run, `grounded._decoder_loss`) equals the pipeline's own CE loss through the
  vision tower (`train.ce_loss` with pixels) on the exported model, for every batch kind."""
  from configs import scenes_pretrain
  from flax import nnx

  from c3l_jax import train as trainer_lib
  from c3l_jax.data.prompts import PromptBuilder, load_processor
  from c3l_jax.scenes import pretrain

  config = scenes_pretrain.get_config()
  out, student = tmp_path / "model", tmp_path / "student"
  with config.unlocked():
    config.pretrain.update(
        recipe="grounded", out=str(out), num_scenes=16, eval_scenes=0, vision_hidden=16, vision_layers=2,
        vision_heads=2, text_hidden=32, text_layers=1, text_heads=2, text_intermediate=64,
        max_position_embeddings=256)
    config.pretrain.grounded.update(
        student_out=str(student), vision_steps=2, vision_batch_size=8, vision_eval_scenes=4,
        student_steps=2, steps=6, batch_size=4, text_every=3, p_detail=0.3, p_image=0.3,
        eval_quick_scenes=0, probe_weight=1.0, probe_layer=0, offset_probe_weight=1.0, offset_probe_layer=0,
        referent_probe_weight=1.0, referent_probe_layer=0, answer_probe_weight=1.0, answer_probe_layer=0,
        w_background=1.0)
  metrics = pretrain.run(config, str(tmp_path / "w"))
  assert metrics["student_captions"]["steps"] == 2 and metrics["generator_mix"]["steps"] == 6
  assert sum(metrics["generator_mix"]["steps_by_batch_kind"].values()) == 6
  assert metrics["generator_mix"]["steps_by_batch_kind"]["text"] == 2
  student_metrics = json.load(open(student / "training_metrics.json"))
  assert "generator_mix" not in student_metrics and student_metrics["student_captions"]["steps"] == 2

  model = sharding.load_model(str(out), mesh)
  builder = PromptBuilder(load_processor(str(out)), model.cfg.image_token_id, model.cfg.image_seq_length)
  world = scenes.generate_world(16, 1000)
  pixels = np.asarray(builder.processor.image_processor(
      images=[scenes.render(s) for s in world], return_tensors="np")["pixel_values"], np.float32)
  feats = grounded.image_tokens(model, pixels, chunk=8)
  maker = grounded.Examples(builder, world, config.pretrain.grounded)
  # The referent probe's labels follow the phrase rule whatever `probe_rule` is (here "word"), and the
  # offset probe's come from them.
  phrase, word = grounded.PhraseCells(builder.tokenizer, "phrase"), grounded.PhraseCells(builder.tokenizer, "word")
  ex = maker.make("caption", 3, np.random.default_rng(0))
  ids = ex["prompt"] + ex["target"]
  assert config.pretrain.grounded.probe_rule == "word" and ex["probe_labels"] == word(ids, world[3])
  assert ex["referent_labels"] == phrase(ids, world[3]) != ex["probe_labels"]
  assert ex["offset_labels"] == grounded.offset_labels(ex["referent_labels"])
  make = grounded.mix_batches(maker, config.pretrain.grounded, 0, builder.pad_id, len(world))
  graphdef, params, rest = nnx.split(model.language_model, nnx.Param, ...)
  kinds = set()
  for step in range(12):
    kind, batch = make(step)
    kinds.add(kind)
    ours, _ = grounded._decoder_loss({"lm": params}, graphdef, rest, batch, feats, model.cfg.image_token_id,
                                     probes=())
    ref_batch = {k: v for k, v in batch.items() if k != "scene"}
    if kind != "text":
      ref_batch["pixels"] = pixels[batch["scene"]]
    ref = trainer_lib.ce_loss(model, ref_batch)
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)
  assert kinds == {"ground", "image", "detail", "text"}


def test_vqa_kind_weights_choose_the_kind():
  """`grounded.vqa_kind_weights`: weight only on position -> every VQA example is a position question
  (the checker's kind), answered correctly."""
  from configs import scenes_pretrain

  g = scenes_pretrain.get_config().pretrain.grounded
  with g.unlocked():
    g.vqa_kind_weights = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0)
  world = scenes.generate_world(40, 1000)
  rng = np.random.default_rng(0)
  for s in world:
    q, a = sm.vqa_qa(s, rng, 0.5, scenes.QA_KINDS[int(np.argmax(g.vqa_kind_weights))])
    q = q.replace(" Answer the question using a single word or phrase.", "")
    v = scenes.check(s, q, a)
    assert v.kind == "position" and v.correct is True, (q, a)


def test_caption_qa_generic_share_is_its_own_setting():
  """`grounded.p_generic_caption_qa` sets the generic share of the two-step (QA-from-caption) samples and
  `p_generic` that of the VIGC samples: at 1 / 0 every QA-from-caption target is generic and every VIGC
  one image-dependent, and the reverse (the checker's verdict on the target)."""
  from configs import scenes_pretrain
  from c3l_jax.data import instructions as ins

  class TextBuilder:  # token ids = the texts themselves
    eos_ids = ()

    def encode_prompt(self, text, image):
      return [text], None

    def encode_answer(self, text):
      return [text]

  world = scenes.generate_world(12, 1000)
  g = scenes_pretrain.get_config().pretrain.grounded
  for p_vigc, p_two_step in ((0.0, 1.0), (1.0, 0.0)):
    with g.unlocked():
      g.p_generic, g.p_generic_caption_qa = p_vigc, p_two_step
      # the probes' labels need a real tokenizer; the targets do not depend on them
      g.probe_weight = g.offset_probe_weight = g.referent_probe_weight = g.answer_probe_weight = 0.0
    maker = grounded.Examples(TextBuilder(), world, g)
    rng = np.random.default_rng(0)
    for task, p in (("caption_qa", p_two_step), ("vigc", p_vigc)):
      for i in range(len(world)):
        qa = ins.parse_qa(maker.make(task, i, rng)["target"][0])
        assert qa is not None
        assert scenes.check(world[i], *qa).image_dependent == (p == 0.0), (task, qa)


def test_curriculum_limits_the_objects_of_ground_batches():
  """`grounded.curriculum = ((1, 6), (2, 12))`: `ground` batches draw one-object scenes before step 6,
  scenes of at most two objects before step 12, then any scene; other batch kinds any scene throughout."""
  from configs import scenes_pretrain

  class IdBuilder:  # a token per word; the ids do not matter here
    eos_ids = (3,)

    def encode_prompt(self, text, image):
      return [4] * (len(text.split()) + (9 if image is not None else 0)), None

    def encode_answer(self, text):
      return [5] * len(text.split())

  world = scenes.generate_world(300, 1000)
  g = scenes_pretrain.get_config().pretrain.grounded
  with g.unlocked():
    g.curriculum = ((1, 6), (2, 12))
    g.probe_weight = g.offset_probe_weight = g.referent_probe_weight = 0.0  # labels need a real tokenizer
    g.batch_size = 16
    g.seq_ground = g.seq_image = g.seq_detail = g.seq_text = 400
  make = grounded.mix_batches(grounded.Examples(IdBuilder(), world, g), g, 0, 0, len(world))
  most, early = {"ground": 0, "other": 0}, set()
  for step in range(40):
    kind, batch = make(step)
    n = max(len(world[i].objects) for i in batch["scene"])
    if kind == "ground":
      assert n <= (1 if step < 6 else 2 if step < 12 else 5), (step, n)
      early.add(0 if step < 6 else 1 if step < 12 else 2)
      if step >= 12:
        most["ground"] = max(most["ground"], n)
    elif kind != "text":
      most["other"] = max(most["other"], n)
  assert most["ground"] > 2 and most["other"] > 2 and early == {0, 1, 2}


def test_grounding_probe_labels_and_loss_by_hand():
  """The grounding probe of the grounded recipe: `PhraseCells` labels the head noun of each noun phrase
  with the cell class of what the phrase refers to (0 nothing, cell + 1 one object, 10 several), counted
  here by hand on a made-up scene; `grounding_probe_loss` is the mean softmax CE (and accuracy) of the
  probe over exactly the labelled tokens, recomputed in numpy."""
  from c3l_jax.data.prompts import load_processor

  obj = lambda shape, colour, size, row, col: SceneObject(shape, colour, size, (col + 0.5) / 3, (row + 0.5) / 3)
  scene = Scene(0, "x.png", "gray", [obj("star", "red", "small", 0, 1), obj("circle", "blue", "large", 2, 2),
                                     obj("circle", "red", "small", 1, 0)])
  tok = load_processor(SHIPPED).tokenizer
  label = grounded.PhraseCells(tok)
  ids = lambda text: tok.convert_tokens_to_ids(text.split())
  cases = {  # phrase -> the label at its last word (the head noun), by hand
      "where is the star ?": 1 + 1, "the circle": 10, "the large circle": 8 + 1, "the red circle": 3 + 1,
      "the small red circle": 3 + 1, "the blue star": 0, "any squares": 0, "two circles": 10,
      "the red object": 10, "the blue object": 8 + 1, "how many objects": 10}
  for text, cls in cases.items():
    got = label(ids(text), scene)
    noun = len(text.split()) - (2 if text.endswith("?") else 1)
    assert got[noun] == cls, (text, got)
    assert all(l == -1 for i, l in enumerate(got) if i != noun), (text, got)
  assert label(ids("where is the star ?"), None) == [-1] * 5  # text only: nothing to ground
  # The "word" rule: every shape / colour word, by itself.
  word = grounded.PhraseCells(tok, "word")
  assert word(ids("the large red circle"), scene) == [-1, -1, 10, 10]  # two red objects, two circles
  assert word(ids("the blue stars"), scene) == [-1, 8 + 1, 1 + 1]
  assert word(ids("the red object"), scene) == [-1, 10, -1]
  # The offset probe: at each phrase naming one object after another one, where the earlier object lies
  # relative to it, (row difference + 2) * 5 + column difference + 2. Cells: red star (0, 1), blue circle
  # (2, 2), red circle (1, 0).
  text = "is the red star above the large circle ? no , the red circle is below the star ."
  offsets = grounded.offset_labels(label(ids(text), scene))
  by_hand = {"circle": [(0 - 2 + 2) * 5 + (1 - 2 + 2),   # star (0, 1) from the large circle (2, 2)
                        (2 - 1 + 2) * 5 + (2 - 0 + 2)],  # large circle from the red circle (1, 0)
             "star": [(1 - 0 + 2) * 5 + (0 - 1 + 2)]}     # red circle from the star; the first star: none
  words = text.split()
  assert [o for w, o in zip(words, offsets) if w in ("circle", "star")][1:] == \
      [by_hand["circle"][0], by_hand["circle"][1], by_hand["star"][0]]
  assert offsets[words.index("star")] == -1 and sum(o >= 0 for o in offsets) == 3
  # "the circle" names two objects: no label there, and it does not count as the earlier object.
  assert grounded.offset_labels(label(ids("the star and the circle and the blue circle"), scene)) == \
      [-1] * 8 + [(0 - 2 + 2) * 5 + (1 - 2 + 2)]

  rng = np.random.default_rng(0)
  b, k, t, dh = 3, 2, 6, 4
  labels = np.full((b, t), -1, np.int32)
  labels[0, 3], labels[0, 5], labels[1, 1], labels[1, 2] = 2, 10, 0, 9
  kv_v = rng.normal(size=(b, k, t, dh)).astype(np.float32)
  probe = {"w": rng.normal(size=(k * dh, 11)).astype(np.float32), "b": rng.normal(size=11).astype(np.float32)}
  loss, acc = grounded.grounding_probe_loss(kv_v, labels, probe)
  ces, hits = [], []
  for row, pos in zip(*np.nonzero(labels >= 0)):
    logits = kv_v[row, :, pos, :].reshape(-1) @ probe["w"] + probe["b"]
    logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    ces.append(-logp[labels[row, pos]])
    hits.append(logits.argmax() == labels[row, pos])
  assert len(ces) == 4
  np.testing.assert_allclose(float(loss), np.mean(ces), rtol=1e-5)
  np.testing.assert_allclose(float(acc), np.mean(hits), rtol=1e-6)


def test_answer_probe_labels_and_background_questions_by_hand():
  """The answer probe's labels (`grounded.answer_labels`): only at the prompt's last token, the cell
  class (cell + 1, row-major) of the one object a wh-question asks about, resolved by size, colour and
  position words; no label when the question names several objects or none, or is not a wh-question.
  Cells counted by hand on a made-up scene. And `background_qa` asks for the background's colour, which
  the checker judges right."""
  obj = lambda shape, colour, size, row, col: SceneObject(shape, colour, size, (col + 0.5) / 3, (row + 0.5) / 3)
  scene = Scene(0, "x.png", "black", [obj("cross", "blue", "large", 0, 1), obj("cross", "green", "small", 2, 0),
                                      obj("star", "red", "small", 1, 2)])
  suffix = " Answer the question using a single word or phrase."
  cases = {"What colour is the small cross?": 7,  # row 2, col 0
           "Which colour does the cross in the top middle have?" + suffix: 2,  # row 0, col 1
           "What shape is the red object?": 6,  # row 1, col 2
           "Where is the star?" + suffix: 6,
           "What colour is the large cross?": 2,
           "What colour is the cross?": None,  # two crosses
           "What colour is the circle?": None,  # none
           "How many crosses are there?": None,
           "Is there a star in the image?": None}
  for question, cell in cases.items():
    labels = grounded.answer_labels(12, 7, scene, question)
    assert labels[:6] == [-1] * 6 and labels[7:] == [-1] * 5, question
    assert labels[6] == (-1 if cell is None else cell), question
  assert grounded.answer_labels(12, 7, scene, "What colour is the small cross?", labelled=False) == [-1] * 12
  assert grounded.answer_labels(12, 7, None, "What colour is the small cross?") == [-1] * 12

  rng = np.random.default_rng(0)
  for p_short in (0.0, 1.0):
    q, a = grounded.background_qa(scene, rng, p_short)
    v = scenes.check(scene, q.replace(suffix, ""), a)
    assert "background" in q and v.kind == "colour" and v.correct is True, (q, a)
    assert scenes.check(scene, q.replace(suffix, ""), a.lower().replace("black", "white")).correct is False
