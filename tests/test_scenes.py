"""The synthetic scenes world: determinism, rendering, co-occurrence, text, vocabulary, checker, tfds."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from c3l_jax import scenes as S

# A fixed scene: cells (row, col), row 0 = top. No cross in it.
#   large red circle   (0,0) | .                 | large green triangle (0,2)
#   .                        | small blue square (1,1) | .
#   small red circle   (2,0) | .                 | small yellow star (2,2)
SCENE = S.Scene(
    image_id=7, file_name="scene_000007.png", background="black",
    objects=[
        S.SceneObject("circle", "red", "large", 0.17, 0.16),
        S.SceneObject("triangle", "green", "large", 0.84, 0.17),
        S.SceneObject("square", "blue", "small", 0.5, 0.52),
        S.SceneObject("circle", "red", "small", 0.15, 0.85),
        S.SceneObject("star", "yellow", "small", 0.83, 0.82),
    ])

DEP, GEN = True, False
# (question, answer, image_dependent, correct, hallucinated)
CASES = [
    # colour
    ("What colour is the star?", "yellow", DEP, True, []),
    ("What color is the star?", "The star is red.", DEP, False, []),
    ("what is the colour of the triangle", "It's green", DEP, True, []),
    ("The star, what colour is it?", "Yellow.", DEP, True, []),
    ("What colour are the circles?", "They are both red.", DEP, True, []),
    ("What colour is the cross?", "purple", DEP, False, ["cross"]),
    ("What colour is the cross?", "There is no cross in the image.", DEP, True, []),
    ("What colour is the small circle?", "red", DEP, True, []),
    # shape
    ("What shape is in the top left?", "A circle.", DEP, True, []),
    ("What shape is in the top left corner?", "a square", DEP, False, []),
    ("What is the blue object?", "It's a square.", DEP, True, []),
    ("Which shape is green?", "triangle", DEP, True, []),
    ("What is in the center of the image?", "a hexagon", DEP, False, ["hexagon"]),
    ("What is to the left of the square?", "A red circle.", DEP, True, []),
    ("What is to the left of the square?", "a star", DEP, False, []),
    # count
    ("How many circles are there?", "two", DEP, True, []),
    ("How many circles are there?", "2", DEP, True, []),
    ("How many circles are there?", "There are three circles.", DEP, False, []),
    ("circles, how many?", "Two.", DEP, True, []),
    ("How many crosses are there?", "zero", DEP, True, []),
    ("How many crosses are there?", "There are no crosses.", DEP, True, []),
    ("How many crosses are there?", "one", DEP, False, ["cross"]),
    ("How many red objects are in the picture?", "There are 2 red objects.", DEP, True, []),
    ("How many objects are in the image?", "five", DEP, True, []),
    ("How many shapes can you see?", "There are four shapes.", DEP, False, []),
    # existence
    ("Is there a cross?", "No", DEP, True, []),
    ("Is there a cross?", "There is no cross.", DEP, True, []),
    ("Is there a cross?", "Yes", DEP, False, ["cross"]),
    ("Is there a cross in the image?", "Yes, there is a purple cross.", DEP, False, ["cross"]),
    ("Are there any crosses in this image?", "Nope, none.", DEP, True, []),
    ("Is there a star in the picture?", "yes", DEP, True, []),
    ("Is there a star?", "I don't see any star.", DEP, False, []),
    ("Are there any triangles?", "Yes, there is one.", DEP, True, []),
    ("Is there a blue circle?", "no", DEP, True, []),
    ("Do you see a heart?", "Yes.", DEP, False, ["heart"]),
    ("Are there two circles?", "yes", DEP, True, []),
    ("Are there three circles?", "Yes", DEP, False, []),
    ("Is there a circle above the square?", "yes", DEP, True, []),
    # position
    ("Where is the star?", "In the bottom right corner.", DEP, True, []),
    ("Where is the star?", "It is at the bottom.", DEP, True, []),
    ("Where is the star?", "on the left", DEP, False, []),
    ("Where is the star?", "The star is in the top left.", DEP, False, []),
    ("where is the triangle", "top right", DEP, True, []),
    ("Where is the square?", "To the left of the star.", DEP, True, []),
    ("Where is the cross?", "On the right.", DEP, False, ["cross"]),
    ("Is the star on the left?", "no", DEP, True, []),
    ("Is the square in the middle?", "Yes, the square is in the center.", DEP, True, []),
    ("Where is the star?", "bottom-right", DEP, True, []),
    ("Where is the star?", "It is located in the lower right.", DEP, True, []),
    ("Where is the star?", "Below the triangle.", DEP, True, []),
    ("Where is the star?", "Above the triangle.", DEP, False, []),
    # relation
    ("Is the triangle to the right of the square?", "yes", DEP, True, []),
    ("Is the square left of the triangle", "Yes.", DEP, True, []),
    ("Is the large circle below the star?", "no", DEP, True, []),
    ("Is the large circle below the star?", "Yes, it is.", DEP, False, []),
    ("Is the star to the right of the square?", "The star is to the right of the square.", DEP, True, []),
    ("Is the star above the square?", "No, it is not above the square.", DEP, True, []),
    # yes/no about attributes; presupposition of an absent object
    ("Is the star red?", "No, it is yellow.", DEP, True, []),
    ("Is the star red?", "No, it is blue.", DEP, False, []),
    ("Is the cross red?", "yes", DEP, False, ["cross"]),
    ("Is the cross red?", "no", DEP, True, []),
    ("Is the large circle small?", "yes", DEP, False, []),
    ("Is the red object a circle?", "Yes.", DEP, True, []),
    ("Is there a cross?", "no cross", DEP, True, []),
    ("Is there a star?", "No, but there is a cross.", DEP, False, ["cross"]),
    ("What is at the top right?", "A red triangle.", DEP, False, []),
    ("What colour is the background?", "black", DEP, True, []),
    ("Is the circle bigger than the square?", "yes", DEP, None, []),  # comparisons are not judged
    # description
    ("Describe the image.", "There are two red circles, a blue square, a green triangle and a yellow star.",
     DEP, True, []),
    ("Describe the image.", "There is a red circle and a purple cross.", DEP, False, ["cross"]),
    ("What do you see?", "A yellow star in the bottom right and a blue square in the middle.", DEP, True, []),
    ("Describe the image.", "A red circle on a white background.", DEP, False, []),
    # property of a scene object
    ("How many sides does the green shape have?", "three", DEP, True, []),
    ("How many sides does the blue object have?", "3", DEP, False, []),
    # generic: holds for any image (mentions of absent shapes are not hallucinations)
    ("How many sides does a triangle have?", "three", GEN, True, []),
    ("How many points does a star have?", "A star has five points.", GEN, True, []),
    ("How many arms does a cross have?", "four", GEN, True, []),
    ("Does a circle have corners?", "No, a circle has no corners.", GEN, True, []),
    ("What shape has four sides?", "a square", GEN, True, []),
    ("What shape has four sides?", "a triangle", GEN, False, []),
    ("What colour is the sky?", "blue", GEN, True, []),
    ("What colour is grass?", "It is red.", GEN, False, []),
    ("What colour do you get when you mix red and yellow?", "You get orange.", GEN, True, []),
    ("What is the opposite of left?", "right", GEN, True, []),
    ("What is two plus three?", "five", GEN, True, []),
    ("Is red a colour?", "yes", GEN, True, []),
    ("Is a cross a colour?", "Yes.", GEN, False, []),
]


@pytest.mark.parametrize("question,answer,dep,correct,hall", CASES, ids=[f"{q}|{a}" for q, a, *_ in CASES])
def test_checker_hand_written(question, answer, dep, correct, hall):
  v = S.check(SCENE, question, answer)
  assert (v.image_dependent, v.correct, v.hallucinated) == (dep, correct, hall), v


def test_checker_cell_geometry_of_the_fixed_scene():
  assert [o.cell for o in SCENE.objects] == [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2)]
  assert S.object_names(SCENE) == ["circle", "square", "star", "triangle"]


def test_determinism_and_prefix_stability():
  a, b = S.generate_world(20, seed=3), S.generate_world(20, seed=3)
  assert [s.to_json() for s in a] == [s.to_json() for s in b]
  assert [S.render_png(s) for s in a[:5]] == [S.render_png(s) for s in b[:5]]
  assert S.generate_world(5, seed=3, start_id=15)[0].to_json() == a[15].to_json()
  assert S.generate_world(20, seed=4)[0].to_json() != a[0].to_json() or \
      S.generate_world(20, seed=4)[1].to_json() != a[1].to_json()
  r1, r2 = np.random.default_rng(0), np.random.default_rng(0)
  assert [S.grounded_qa(s, r1) for s in a] == [S.grounded_qa(s, r2) for s in a]
  assert [S.captions(s, r1) for s in a] == [S.captions(s, r2) for s in a]


def test_scene_json_roundtrip_and_invariants():
  for s in S.generate_world(200, seed=0):
    assert S.Scene.from_json(s.to_json()) == s
    assert 1 <= len(s.objects) <= 5 and s.file_name == f"scene_{s.image_id:06d}.png"
    assert len({o.cell for o in s.objects}) == len(s.objects)  # one object per cell
    for o in s.objects:
      assert o.shape in S.SHAPES and o.colour in S.COLOURS and o.size in S.SIZES
      half = S.SIZE_FRACTION[o.size] / 2  # the object lies inside its cell
      assert o.col / 3 <= o.x - half and o.x + half <= (o.col + 1) / 3
      assert o.row / 3 <= o.y - half and o.y + half <= (o.row + 1) / 3


def test_render_draws_each_object_in_its_colour():
  img = np.asarray(S.render(SCENE))
  assert img.shape == (S.IMAGE_SIZE, S.IMAGE_SIZE, 3)
  for o in SCENE.objects:
    y, x = int(o.y * S.IMAGE_SIZE), int(o.x * S.IMAGE_SIZE)
    assert tuple(img[y, x]) == S.RGB[o.colour], o
  assert tuple(img[0, 32]) == S.RGB["black"]
  assert S.render(SCENE, 96).size == (96, 96)
  png = PIL.Image.open(io.BytesIO(S.render_png(SCENE)))
  assert png.format == "PNG" and png.mode == "RGB"


def test_shapes_are_distinct_when_rendered():
  """Same colour, size and place: each pair of shapes differs in many pixels (a ViT can tell them)."""
  masks = {}
  for shape in S.SHAPES:
    s = S.Scene(0, "x.png", "black", [S.SceneObject(shape, "white", "small", 0.5, 0.5)])
    masks[shape] = np.asarray(S.render(s)).mean(-1) > 128
  for a in S.SHAPES:
    for b in S.SHAPES:
      if a < b:
        assert (masks[a] != masks[b]).sum() >= 15, (a, b)


def test_cooccurrence_reflects_the_themes():
  world = S.generate_world(1500, seed=0)
  stats = S.cooccurrence(world)
  assert stats["num_images"] == 1500
  assert stats["frequency"]["circle"] == sum("circle" in S.object_names(s) for s in world)
  pairs = stats["pairs"]
  assert all(pairs[a][b] == pairs[b][a] for a in S.SHAPES for b in S.SHAPES if a != b)
  cond = stats["conditional"]
  # Themed pairs co-occur more than unthemed ones.
  assert cond["star"]["circle"] > cond["star"]["triangle"] + 0.1
  assert cond["square"]["triangle"] > cond["square"]["star"] + 0.1
  # Typical colours are over-represented (a language prior to learn).
  stars = [o for s in world for o in s.objects if o.shape == "star"]
  assert sum(o.colour == "yellow" for o in stars) / len(stars) > 0.45
  # POPE negatives: adversarial = most co-occurring absent category.
  scene = S.Scene(0, "x.png", "black", [S.SceneObject("star", "yellow", "small", 0.5, 0.5)])
  adv = S.negative_objects(scene, stats, "adversarial", k=4)
  assert adv[0] == "circle" and "star" not in adv and len(adv) == 4
  pop = S.negative_objects(scene, stats, "popular", k=2)
  assert pop[0] == max((s for s in S.SHAPES if s != "star"), key=lambda s: stats["frequency"][s])
  rnd = S.negative_objects(scene, stats, "random", k=4, rng=np.random.default_rng(0))
  assert sorted(rnd) == sorted(s for s in S.SHAPES if s != "star")


def _generated_texts(n_scenes: int = 150):
  out = []
  for scene in S.generate_world(n_scenes, seed=5):
    rng = np.random.default_rng(scene.image_id)
    for kind in S.QA_KINDS:
      for _ in range(2):
        out.append(("grounded", scene, *S.grounded_qa(scene, rng, kind)))
    out.append(("grounded", scene, *S.grounded_qa(scene, rng)))
    for _ in range(3):
      out.append(("generic", scene, *S.generic_qa(rng)))
    for c in S.captions(scene, rng):
      out.append(("caption", scene, "Describe the image.", c))
    out.append(("caption", scene, "Describe the image.", S.detailed_description(scene)))
  return out


def test_checker_accepts_every_generated_qa():
  """The generators and the checker agree: all generated QA are correct, none hallucinate."""
  kinds = set()
  for typ, scene, q, a in _generated_texts():
    v = S.check(scene, q, a)
    kinds.add(v.kind)
    assert v.correct is True and v.hallucinated == [], (q, a, v, scene)
    assert v.image_dependent == (typ != "generic"), (q, a, v)
  assert {"colour", "shape", "count", "position", "relation", "existence", "generic"} <= kinds


def test_checker_rejects_answers_swapped_between_scenes():
  """An answer from another scene is often wrong here: the checker is not trivially accepting."""
  world = S.generate_world(200, seed=9)
  wrong = total = 0
  for s1, s2 in zip(world, world[1:]):
    rng = np.random.default_rng(s1.image_id)
    for kind in ("colour", "count", "shape", "position"):
      q, a = S.grounded_qa(s2, rng, kind)
      v = S.check(s1, q, a)
      total += 1
      wrong += v.correct is False
  assert wrong / total > 0.5


def test_grounded_qa_kinds_and_existence_negatives():
  rng = np.random.default_rng(0)
  world = S.generate_world(60, seed=1)
  answers = [S.grounded_qa(s, rng, "existence")[1].lower() for s in world]
  assert any(a.startswith("no") for a in answers) and any(a.startswith("yes") for a in answers)
  with pytest.raises(ValueError):
    S.grounded_qa(world[0], rng, "nope")


def test_vocabulary_covers_every_generated_text():
  vocab = set(S.vocabulary())
  assert {"Question:", "Answer:", ".", ",", "?"} <= vocab and len(vocab) < 400
  for _, _, q, a in _generated_texts(80):
    for text in (q, a, f"Question: {q} Answer: {a}"):
      missing = set(S.tokenize_words(text)) - vocab
      assert not missing, (text, missing)


def test_checker_never_fails_on_garbage():
  """Corrupted generator output and random word salad: always a well-formed Verdict."""
  vocab = S.vocabulary()
  rng = np.random.default_rng(0)
  world = S.generate_world(20, seed=1)
  for i in range(1500):
    scene = world[i % 20]
    q, a = S.grounded_qa(scene, rng)
    qt, at = S.tokenize_words(q), S.tokenize_words(a)
    for toks in (qt, at):
      for _ in range(int(rng.integers(0, 4))):
        if toks and rng.random() < 0.5:
          del toks[int(rng.integers(len(toks)))]
        else:
          toks.insert(int(rng.integers(len(toks) + 1)), vocab[int(rng.integers(len(vocab)))])
    if i % 2:
      qt = list(rng.choice(vocab, size=int(rng.integers(0, 12))))
      at = list(rng.choice(vocab, size=int(rng.integers(0, 12))))
    v = S.check(scene, " ".join(qt), " ".join(at))
    assert isinstance(v.image_dependent, bool) and v.correct in (True, False, None)
    assert set(v.hallucinated) <= set(S.SHAPES + S.FOREIGN_SHAPES) - set(S.object_names(scene))


def test_parse_qa_text():
  assert S.parse_qa_text("Question: What colour is the star? Answer: red.") == ("What colour is the star?", "red.")
  assert S.parse_qa_text("question: how many circles ? answer: two") == ("how many circles ?", "two")
  assert S.parse_qa_text("What colour is the star?") is None


def test_tokenize_detokenize():
  toks = S.tokenize_words("Question: What colour is the star? Answer: It is red.")
  assert toks == ["Question:", "what", "colour", "is", "the", "star", "?", "Answer:", "it", "is", "red", "."]
  assert S.detokenize_words(S.tokenize_words("There are two circles, a star.")) == "There are two circles, a star."


def test_tfds_builds_and_reads_without_tensorflow(tmp_path):
  """In a fresh interpreter: TF is absent, the builder prepares, and elements come back as python types."""
  code = f"""
import sys
try:
  import tensorflow
  raise SystemExit('tensorflow is installed')
except ImportError:
  pass
from c3l_jax import scenes
from c3l_jax.scenes import dataset as scenes_tfds
import tensorflow_datasets as tfds
train = scenes_tfds.load_split({str(tmp_path)!r}, 'train', 6, 2, num_val=3)
val = scenes_tfds.load_split({str(tmp_path)!r}, 'val', 6, 2, num_val=3)
assert 'tensorflow' not in sys.modules
assert (len(train), len(val)) == (6, 3)
assert [e['image_id'] for e in train] == list(range(6)) and [e['image_id'] for e in val] == [6, 7, 8]
world = scenes.generate_world(9, 2)
for e in list(train) + list(val):
  assert sorted(e) == ['annotation', 'captions', 'file_name', 'image_bytes', 'image_id', 'objects'], sorted(e)
  assert type(e['image_bytes']) is bytes and type(e['image_id']) is int and type(e['file_name']) is str
  assert type(e['annotation']) is str and all(type(c) is str for c in e['captions'] + e['objects'])
  scene = world[e['image_id']]
  assert e['image_bytes'] == scenes.render_png(scene) and e['file_name'] == scene.file_name
  assert scenes.Scene.from_json(e['annotation']) == scene and e['objects'] == scenes.object_names(scene)
  assert len(e['captions']) == 3
assert train[-1]['image_id'] == 5 and [x['image_id'] for x in train[1:3]] == [1, 2]
b = scenes_tfds.builder({str(tmp_path)!r}, 6, 2, num_val=3)
src = b.as_data_source('val')
assert len(src) == 3
src2 = tfds.data_source('scenes_world/' + b.builder_config.name, data_dir={str(tmp_path)!r}, split='train')
assert len(src2) == 6
assert (tmp_path := __import__('pathlib').Path({str(tmp_path)!r})).exists()
assert list(tmp_path.rglob('*.array_record*'))
print('OK')
"""
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                     cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
  assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]


def test_the_students_own_data_is_ground_truth_on_training_scenes():
  """The ablation's student data (`ablation.student_data=scenes`, seed 1 of configs/scenes_ablation.py):
  per training scene of the seed's world a short VQA, a description and yes / no object questions, none
  on a held-out (eval) scene; each scene's yes / no questions are half "Yes", half "No" (as many as it
  has present or absent shapes, whichever is fewer), each recounted from the scene's objects by hand;
  the checker passes every short VQA answer and description."""
  from c3l_jax import registry
  from c3l_jax.pipeline import ablation
  from c3l_jax.scenes import dataset
  from configs import scenes_ablation

  config = ablation.seeded(scenes_ablation.get_config(), 1)
  n, world_seed = config.data.scenes_images, config.data.scenes_seed
  assert world_seed == 1
  records = registry.SOURCES["scenes"].instruction_data(config)
  world = S.generate_world(n, world_seed)  # the training split: scenes 0 .. n-1 of the seed's world
  held_out = {S.file_name_for(i) for i in range(n, n + dataset.default_num_val(n))}  # the eval's `val`
  assert len({r["id"] for r in records}) == len(records)
  assert {r["image"] for r in records} == {s.file_name for s in world} and not held_out & {
      r["image"] for r in records}
  by_kind = {k: [r for r in records if r["kind"] == k] for k in ("vqa", "yes_no", "description")}
  assert len(records) == sum(map(len, by_kind.values()))
  assert len(by_kind["vqa"]) == len(by_kind["description"]) == n
  suffix = "\nAnswer the question using a single word or phrase."
  answers: dict[int, list[bool]] = {}
  for r in by_kind["yes_no"]:
    scene = world[r["scene"]]
    assert r["image"] == scene.file_name and r["question"].endswith("?" + suffix)
    named = [w for w in S.tokenize_words(r["question"][:-len(suffix)]) if w in S.SHAPES]
    assert len(named) == 1, r
    truth = any(o.shape == named[0] for o in scene.objects)
    assert r["answer"] == ("Yes" if truth else "No"), r
    answers.setdefault(r["scene"], []).append(truth)
  for i, scene in enumerate(world):  # balanced in every scene: min(present, absent) of each answer
    present = len({o.shape for o in scene.objects})
    pairs = min(present, len(S.SHAPES) - present)
    assert sorted(answers.get(i, [])) == [False] * pairs + [True] * pairs, i
  assert sum(map(sum, answers.values())) == len(by_kind["yes_no"]) / 2 > n / 2
  for r in by_kind["vqa"] + by_kind["description"]:
    scene = world[r["scene"]]
    question = r["question"][:-len(suffix)] if r["kind"] == "vqa" else r["question"]
    assert (r["kind"] == "vqa") == r["question"].endswith(suffix)
    assert S.check(scene, question, r["answer"]).correct is True, r
  assert max(len(r["answer"].split()) for r in by_kind["vqa"]) <= 5  # a word or phrase
  # Another seed is another world: its records are of other scenes.
  other = registry.SOURCES["scenes"].instruction_data(ablation.seeded(scenes_ablation.get_config(), 2))
  assert [r["answer"] for r in other if r["kind"] == "description"] != \
      [r["answer"] for r in by_kind["description"]]
