"""Table-5 selection baselines: ROUGE-L, Self-Instruct filtering, random and VIGC iterative generation
(the model replaced by scripted fakes), against hand-computed values."""

from __future__ import annotations

import pytest

from c3l_jax.pipeline import baselines, select
from configs import llava15


def _config(**select_fields):
  config = llava15.get_config("tiny")
  with config.unlocked():
    for k, v in select_fields.items():
      config.select[k] = v
  return config


@pytest.mark.parametrize("target,prediction,want", [
    ("the cat sat on the mat", "the cat lay on a mat", 2 / 3),  # LCS the cat on mat: P = R = 4/6
    ("a b c d", "a c", 2 / 3),  # LCS 2: P = 1, R = 1/2, F = 2/3
    ("What color, is it?", "what color is it", 1.0),  # case and punctuation do not count
    ("red circle", "blue square", 0.0), ("", "anything", 0.0),
])
def test_rouge_l_hand_computed(target, prediction, want):
  assert baselines.rouge_l(target, prediction) == pytest.approx(want)


def test_lcs_length_classic():
  assert baselines.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
  assert baselines.lcs_length([], list("abc")) == 0


ROWS = [  # image, question, answer
    ("img1", "What color is the circle in the image?", "red"),  # 0 kept
    ("img1", "What color is the circle in this image?", "blue"),  # 1 ROUGE-L 7/8 to row 0
    ("img1", "How many?", "two"),  # 2 too short
    ("img1", "Describe the objects in detail please", "Describe the objects in detail please"),  # 3
    ("img2", "What color is the circle in the image?", "red"),  # 4 kept (other image)
    ("img2", "Where is the square located exactly?", "The square is:"),  # 5 ends with ':'
    ("img3", "Is there a star here?", "yes"),  # 6 same question, other answer (7): both dropped
    ("img3", "Is there a star here?", "no"),  # 7
    ("img3", "?Is there a star here", "yes"),  # 8 punctuation first
    ("img2", "What color is the circle in the image?", "red"),  # 9 exact duplicate of 4
]


def _rows():
  return [{"id": f"r{i}", "image": im, "question": q, "answer": a, "i2c": float(i)}
          for i, (im, q, a) in enumerate(ROWS)]


def test_self_instruct_filter_reasons():
  reasons = baselines.self_instruct_filter(_rows())
  assert reasons[0] == "" and reasons[4] == ""
  assert "ROUGE-L 0.88" in reasons[1]
  assert "2 words" in reasons[2]
  assert reasons[3] == "answer equals the question"
  assert "ends with ':'" in reasons[5]
  assert reasons[6] == reasons[7] == "the same question has different answers"
  assert reasons[8] == "question starts with punctuation"
  assert reasons[9] == "duplicate"


def test_self_instruct_roles_and_top_fraction():
  rows = select.METHODS["self_instruct"](_rows(), _config(method="self_instruct", top_fraction=0.2))
  roles = [r["role"] for r in rows]
  # img1: the survivor r0 is the positive, its 3 filtered samples negatives; img2: r4 + r5, r9;
  # img3 has no survivor: unused.
  assert roles == ["positive", "negative", "negative", "negative", "positive", "negative", "unused",
                   "unused", "unused", "negative"]
  top = [r["id"] for r in rows if r["top_fraction"]]
  assert sorted(top) == ["r0", "r4"]  # budget ceil(0.2 * 10) = 2, drawn among the 2 survivors
  assert rows[2]["select_reason"].startswith("question has 2 words") and rows[0]["select_reason"] == ""


def test_random_selection_is_seeded_and_well_formed():
  rows = _rows() + [{"id": "x", "image": "img4", "question": "q q q q", "answer": "a", "i2c": 0.0}]
  config = _config(method="random", top_fraction=0.3)
  with config.unlocked():
    config.train.max_negatives = 2
  a = select.METHODS["random"](rows, config)
  assert a == select.METHODS["random"](rows, config)
  for image in ("img1", "img2", "img3"):
    roles = [r["role"] for r in a if r["image"] == image]
    assert roles.count("positive") == 1 and roles.count("negative") == min(2, len(roles) - 1)
  assert a[-1]["role"] == "unused"  # a lone sample has nothing to contrast with
  assert sum(r["top_fraction"] for r in a) == 4  # ceil(0.3 * 11)
  with config.unlocked():
    config.seed = 1
  b = select.METHODS["random"](rows, config)
  assert [r["role"] for r in a] != [r["role"] for r in b] or \
      [r["top_fraction"] for r in a] != [r["top_fraction"] for r in b]


@pytest.mark.parametrize("text,want", [
    ("A red circle. It is big.", "A red circle."), ("There are 3.5 apples here! Yes", "There are 3.5 apples here!"),
    ("no end", "no end"), ("  spaced \n out.  next", "spaced out."), ("", ""),
])
def test_first_sentence(text, want):
  assert baselines.first_sentence(text) == want


class _Builder:
  """Prompts are token lists: the question's word count, then one id per answer word."""

  pad_id = 0

  def encode_prompt(self, question, image):
    return [100 + len(question.split())], f"px-{image}"

  def encode_answer(self, text):
    return [len(w) for w in text.split()]

  def encode_qa(self, question, answer, image):
    class Enc:
      prompt_image, prompt_text, pixel_values = [7, 127], [7], f"px-{image}"
    Enc.answer = self.encode_answer(answer)
    return Enc


class _FakeInference:
  """Scripted continuations: per job (by its question length) the texts of rounds 0, 1, 2, ..."""

  def __init__(self, script, config=None):
    self.builder, self.script, self.calls = _Builder(), script, []
    self.config = config or _config()
    self.max_len = 10_000

  def generate(self, prompts, pixels, keys, max_new):
    self.calls.append([list(p) for p in prompts])
    out = []
    for p in prompts:
      rounds = self.script[p[0]]
      done = len(p) - 1  # answer words fed back so far
      words_so_far = 0
      r = 0
      while words_so_far < done:
        words_so_far += len(baselines.first_sentence(rounds[r]).split())
        r += 1
      out.append(rounds[r] if r < len(rounds) else "")
    return out, 0


def test_vigc_iterative_generation_keeps_first_sentences():
  inf = _FakeInference({
      103: ["A red circle. Also a star.", "It is big. Really.", ""],  # "is it red?" (3 words)
      102: ["Two. Maybe three.", "", "never reached"],  # "how many?" (2 words)
  })
  answers = baselines.iterative_answers(inf, [("is it red?", "im1"), ("how many?", "im2")],
                                        max_rounds=4)
  assert answers == ["A red circle. It is big.", "Two."]
  # Round 2 re-prompts job 0 with the question and its first sentence (3 words: ids 1, 3, 7).
  assert inf.calls[1] == [[103, 1, 3, 7], [102, 4]]
  assert inf.calls[2] == [[103, 1, 3, 7, 2, 2, 4]]  # job 1 finished after an empty round
  capped = baselines.iterative_answers(_FakeInference({103: ["One. x", "Two. y", "Three."]}),
                                       [("is it red?", "im")], max_rounds=2)
  assert capped == ["One. Two."]


def test_vigc_roles(monkeypatch):
  from c3l_jax import scoring
  from c3l_jax.pipeline import common

  class Source:
    def load(self, image):
      if image == "bad":
        from c3l_jax.data.images import ImageError
        raise ImageError("missing image bad")
      return image

  config = _config(method="vigc", top_fraction=0.1)
  with config.unlocked():
    config.train.max_negatives = 1
  fake = _FakeInference({105: ["Red circle.", ""], 104: ["", ""]}, config)
  fake.source = Source()
  fake.sampling_config = lambda n: None
  fake.model = type("M", (), {"cfg": type("C", (), {"image_token_id": 127})})()
  fake.mesh = None

  class Scorer:
    def __init__(self, *args):
      pass

    def score(self, items, pixels):
      assert [it.answer for it in items] == [[3, 7]] and set(pixels) == {"a"}
      return [{"i2c": 9.0, "logp_image": -1.0, "logp_text": -2.0, "n_tokens": 2}]

  monkeypatch.setattr(common, "Inference", lambda config: fake)
  monkeypatch.setattr(scoring, "Scorer", Scorer)
  rows = [{"id": "a0", "image": "a", "question": "what colour is the circle?", "answer": "blue",
           "i2c": 0.1},
          {"id": "a1", "image": "a", "question": "x y z", "answer": "w", "i2c": 0.2},
          {"id": "b0", "image": "b", "question": "how many are there?", "answer": "one", "i2c": 0.3},
          {"id": "c0", "image": "bad", "question": "q", "answer": "a", "i2c": 0.0}]
  out = select.METHODS["vigc"](rows, config)
  # Image a's first question got an iterative answer (a new, scored row: the positive, in the top
  # fraction); a's first direct sample is its negative (max_negatives 1). Image b's iteration wrote
  # nothing and image "bad" does not load: no positive, all unused.
  assert [(r["id"], r["role"], r["top_fraction"]) for r in out] == [
      ("a0", "negative", False), ("a1", "unused", False), ("b0", "unused", False),
      ("c0", "unused", False), ("a0_vigc", "positive", True)]
  new = out[-1]
  assert (new["question"], new["answer"], new["generator"], new["i2c"]) == (
      "what colour is the circle?", "Red circle.", "vigc_iterative", 9.0)
