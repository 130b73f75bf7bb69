"""S(I2C) (eq. 1): parity with a torch + transformers reference, prefix sharing, sharding, options."""

from __future__ import annotations

import jax
import numpy as np
import PIL.Image
import pytest

from c3l_jax import scoring, sharding
from c3l_jax.data.prompts import PromptBuilder, load_processor
from hf_reference import convert_cli, make_hf_llava, make_tiny_processor, torch_i2c

QAS = [  # (image, question, answer)
    ("grey", "what color is the circle?", "the circle is red"),
    ("grey", "how many objects are there?", "three"),
    ("rgba", "describe the image", "a small blue square is on the left of a large green triangle"),
    ("odd", "where is the dog?", "next to the car"),
    ("grey", "is there a cat?", "no"),
    ("odd", "what shape is at the top?", "a yellow triangle"),
    ("rgba", "what is below the sky?", "the ground and a tree"),
]


def _images():
  rng = np.random.default_rng(0)
  return {
      "grey": PIL.Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L"),
      "rgba": PIL.Image.fromarray(rng.integers(0, 255, (32, 48, 4), dtype=np.uint8), mode="RGBA"),
      "odd": PIL.Image.fromarray(rng.integers(0, 255, (37, 23, 3), dtype=np.uint8)),
  }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("score")
  hf = make_hf_llava(str(root / "hf"), logit_scale=8.0)
  make_tiny_processor(str(root / "hf"))
  assert convert_cli(str(root / "hf"), str(root / "ours")).returncode == 0
  builder = PromptBuilder(load_processor(str(root / "ours")))
  images = _images()
  items, pixels = [], {}
  for key, q, a in QAS:
    enc = builder.encode_qa(q, a, images[key])
    pixels[key] = enc.pixel_values
    items.append(scoring.ScoreInput(key, enc.prompt_image, enc.prompt_text, enc.answer))
  return hf, str(root / "ours"), builder, items, pixels


def _scorer(path, builder, mesh, hf, **kw):
  model = sharding.load_model(path, mesh)
  return scoring.Scorer(model, mesh, scoring.ScoringConfig(**kw), hf.config.image_token_index,
                        builder.pad_id)


def _one_device():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def test_prompts_follow_the_chat_template(setup):
  hf, _, builder, items, pixels = setup
  assert builder.prompt("hi", True) == "USER: <image>\nhi ASSISTANT:"
  assert builder.prompt("hi", False) == "USER: hi ASSISTANT:"
  item = items[0]
  n_img = sum(t == hf.config.image_token_index for t in item.prompt_image)
  assert n_img == 4 and hf.config.image_token_index not in item.prompt_text
  run = [i for i, t in enumerate(item.prompt_image) if t == hf.config.image_token_index]
  assert run == list(range(run[0], run[0] + 4))  # one contiguous, expanded <image> run
  assert all(p.shape == (3, 28, 28) for p in pixels.values())


@pytest.mark.parametrize("mode", ["eq1", "full_kl"])
@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_i2c_matches_torch_reference(setup, mode, prefix_sharing):
  hf, path, builder, items, pixels = setup
  got = _scorer(path, builder, _one_device(), hf, mode=mode, prefix_sharing=prefix_sharing,
                batch_rows=4).score(items, pixels)
  for g, it in zip(got, items):
    want = torch_i2c(hf, it.prompt_image, it.prompt_text, it.answer, pixels[it.image_key], mode)
    assert g["n_tokens"] == want["n_tokens"] == len(it.answer)
    for k in ("i2c", "logp_image", "logp_text"):
      assert abs(g[k] - want[k]) <= 1e-3 + 1e-3 * abs(want[k]), (k, g, want)
  # Not vacuous: the image changes the answer's likelihood, so S(I2C) is clearly non-zero somewhere.
  assert max(abs(g["i2c"]) for g in got) > 1e-2


def test_prefix_sharing_equals_naive_and_length_norm(setup):
  hf, path, builder, items, pixels = setup
  mesh = _one_device()
  shared = _scorer(path, builder, mesh, hf, batch_rows=8).score(items, pixels)
  naive = _scorer(path, builder, mesh, hf, prefix_sharing=False, batch_rows=3).score(items, pixels)
  normed = _scorer(path, builder, mesh, hf, length_norm=True).score(items, pixels)
  for s, n, m in zip(shared, naive, normed):
    for k in ("i2c", "logp_image", "logp_text"):
      assert abs(s[k] - n[k]) < 1e-4
    assert m["i2c"] == pytest.approx(s["i2c"] / s["n_tokens"], abs=1e-6)


def test_sharded_scoring_equals_single_device(setup):
  hf, path, builder, items, pixels = setup
  single = _scorer(path, builder, _one_device(), hf).score(items, pixels)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = _scorer(path, builder, mesh, hf, batch_rows=4).score(items, pixels)
  for a, b in zip(single, sharded):
    for k in ("i2c", "logp_image", "logp_text"):
      assert abs(a[k] - b[k]) < 1e-4


def test_empty_answer_and_bad_mode_are_rejected(setup):
  hf, path, builder, items, pixels = setup
  with pytest.raises(ValueError, match="mode"):
    scoring.ScoringConfig(mode="kl")
  bad = scoring.ScoreInput("grey", items[0].prompt_image, items[0].prompt_text, [])
  with pytest.raises(ValueError, match="empty answer"):
    _scorer(path, builder, _one_device(), hf).score([bad], pixels)


def test_unexpanded_image_token_is_expanded(setup):
  """Older llava-hf processors (no patch_size) leave one <image> token; the builder expands it."""
  hf, path, builder, items, pixels = setup
  image_id = hf.config.image_token_index
  processor = load_processor(path)

  class LegacyProcessor:  # returns the prompt with a single, unexpanded <image> token
    tokenizer = processor.tokenizer
    apply_chat_template = processor.apply_chat_template

    def __call__(self, images, text, return_tensors):
      out = processor(images=images, text=text, return_tensors=return_tensors)
      ids = out["input_ids"][0].tolist()
      first = ids.index(image_id)
      out["input_ids"] = np.asarray([[t for i, t in enumerate(ids) if t != image_id or i == first]])
      return out

  image = _images()["odd"]
  want, _ = PromptBuilder(processor, image_id, 4).encode_prompt("where is the dog?", image)
  got, _ = PromptBuilder(LegacyProcessor(), image_id, 4).encode_prompt("where is the dog?", image)
  assert got == want and got.count(image_id) == 4
  with pytest.raises(ValueError, match="image tokens"):
    PromptBuilder(processor, image_id, 9).encode_prompt("hi", image)


def test_scoring_with_splash_attention_matches_torch(setup):
  """`model.attention=splash` (Pallas, interpret mode on CPU): the prefix pass and the text-only pass
  hand the kernel segment ids, the suffix pass (against the prefix cache) stays on XLA; S(I2C) equals
  the torch reference."""
  from c3l_jax.models import attention as A

  hf, path, builder, items, pixels = setup
  mesh = _one_device()
  original, calls = A._splash, []

  def interpret(q, k, v, seg, _):
    calls.append(q.shape[1])
    return original(q, k, v, seg, True)

  try:
    A._splash = interpret
    model = sharding.load_model(path, mesh, attention="splash")
    got = scoring.Scorer(model, mesh, scoring.ScoringConfig(batch_rows=4),
                         hf.config.image_token_index, builder.pad_id).score(items, pixels)
  finally:
    A._splash = original
  assert calls  # the kernel ran (traced once per compiled shape)
  for g, it in zip(got, items):
    want = torch_i2c(hf, it.prompt_image, it.prompt_text, it.answer, pixels[it.image_key], "eq1")
    for k in ("i2c", "logp_image", "logp_text"):
      assert abs(g[k] - want[k]) <= 1e-3 + 1e-3 * abs(want[k]), (k, g, want)


def test_bucket_lengths_by_hand():
  from c3l_jax.data.batching import bucket

  # Below 128 the step is the minimum (8); from 128 on it is an eighth of the power of two below n.
  assert [bucket(n, 8) for n in (1, 8, 9, 49, 56, 57)] == [8, 8, 16, 56, 56, 64]
  assert [bucket(n, 8) for n in (129, 230, 256, 257, 1000)] == [144, 240, 256, 288, 1024]
  assert bucket(120, 16) == 128 and bucket(17, 16) == 32


def test_answer_index_by_hand():
  """Two data shards of two rows (width 10): item 0 = row 0 cols 3-4, item 1 = padding, item 2 =
  row 2 cols 6-8, item 3 = row 3 col 1. Shard 1's rows 2, 3 are its local rows 0, 1."""
  pos, item = scoring._answer_index([(0, 3, 2), (1, 0, 0), (2, 6, 3), (3, 1, 1)], 4, 10, 2, 4)
  np.testing.assert_array_equal(pos, [[3, 4, 3, 3], [6, 7, 8, 11]])
  np.testing.assert_array_equal(item, [[0, 0, 4, 4], [2, 2, 2, 3]])
