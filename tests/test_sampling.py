"""Batched KV-cache generation: against full forwards, transformers' generate, padding and sampling."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from c3l_jax import sampling, sharding
from hf_reference import IMAGE_TOKEN, convert_cli, image_seq_length, make_hf_llava


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("gen")
  hf = make_hf_llava(str(root / "hf"), logit_scale=4.0)
  assert convert_cli(str(root / "hf"), str(root / "ours")).returncode == 0
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  return hf, sharding.load_model(str(root / "ours"), mesh)


def _prompts(hf, lengths, seed=0):
  rng = np.random.default_rng(seed)
  n_img = image_seq_length(hf)
  prompts = [[1, *rng.integers(3, IMAGE_TOKEN - 1, 2), *[IMAGE_TOKEN] * n_img,
              *rng.integers(3, IMAGE_TOKEN - 1, n)] for n in lengths]
  size = hf.config.vision_config.image_size
  pixels = rng.standard_normal((len(lengths), 3, size, size)).astype(np.float32)
  return prompts, pixels


def _full_forward_greedy(model, prompt, pixels, steps):
  """Reference decode without a cache: argmax of a full forward over the growing sequence."""
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda st, t, p: nnx.merge(graphdef, st)(t, p))
  seq = list(prompt)
  for _ in range(steps):
    logits = fwd(state, np.asarray([seq], np.int32), pixels[None])
    seq.append(int(np.argmax(logits[0, -1])))
  return seq[len(prompt):]


def test_cached_greedy_equals_full_forward_argmax(models):
  hf, model = models
  prompts, pixels = _prompts(hf, [5])
  tokens, mask = sampling.pad_prompts(prompts, 16, 0)
  out, lengths = sampling.generate(model, tokens, mask, pixels, sampling.SamplingConfig(max_new_tokens=10))
  assert lengths.tolist() == [10]
  assert out[0].tolist() == _full_forward_greedy(model, prompts[0], pixels[0], 10)


def test_greedy_matches_transformers_generate_with_left_padding(models):
  hf, model = models
  prompts, pixels = _prompts(hf, [3, 9, 1, 6])
  tokens, mask = sampling.pad_prompts(prompts, 8, 0)
  out, _ = sampling.generate(model, tokens, mask, pixels, sampling.SamplingConfig(max_new_tokens=12))
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.as_tensor(tokens).long(), pixel_values=torch.as_tensor(pixels),
                      attention_mask=torch.as_tensor(mask).long(), max_new_tokens=12,
                      min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
  np.testing.assert_array_equal(out, ref[:, tokens.shape[1]:].numpy())


def test_row_result_independent_of_batch_and_bucket(models):
  hf, model = models
  prompts, pixels = _prompts(hf, [4, 11, 2])
  cfg = sampling.SamplingConfig(max_new_tokens=8)
  batched, _ = sampling.generate(model, *sampling.pad_prompts(prompts, 8, 0), pixels, cfg)
  for i, p in enumerate(prompts):
    alone, _ = sampling.generate(model, *sampling.pad_prompts([p], 32, 0), pixels[i:i + 1], cfg)
    assert alone[0].tolist() == batched[i].tolist()


def test_per_row_eos_and_stop_sequences(models):
  hf, model = models
  prompts, pixels = _prompts(hf, [4, 7])
  tokens, mask = sampling.pad_prompts(prompts, 8, 0)
  free, _ = sampling.generate(model, tokens, mask, pixels, sampling.SamplingConfig(max_new_tokens=10))
  eos = int(free[0, 3])  # row 0 emits this at step 3 (maybe earlier too)
  first = int(np.flatnonzero(free[0] == eos)[0])
  out, lengths = sampling.generate(model, tokens, mask, pixels,
                                   sampling.SamplingConfig(max_new_tokens=10, eos_ids=(eos,), pad_id=0))
  assert lengths[0] == first and out[0, first] == eos and np.all(out[0, first + 1:] == 0)
  assert out[0, :first].tolist() == free[0, :first].tolist()
  row1_first = np.flatnonzero(free[1] == eos)
  expect1 = int(row1_first[0]) if len(row1_first) else 10
  assert lengths[1] == expect1 and out[1, :expect1].tolist() == free[1, :expect1].tolist()
  # A two-token stop sequence ends row 1 right after it appears, keeping the sequence itself.
  seq = (int(free[1, 4]), int(free[1, 5]))
  out, _ = sampling.generate(model, tokens, mask, pixels,
                             sampling.SamplingConfig(max_new_tokens=10, stop_sequences=(seq,), pad_id=0))
  end = next(i for i in range(1, 10) if (int(free[1, i - 1]), int(free[1, i])) == seq)
  assert out[1, :end + 1].tolist() == free[1, :end + 1].tolist() and np.all(out[1, end + 1:] == 0)


def test_sampling_reproducible_and_batch_independent(models):
  hf, model = models
  prompts, pixels = _prompts(hf, [4, 6, 5])
  tokens, mask = sampling.pad_prompts(prompts, 8, 0)
  cfg = sampling.SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)
  keys = jax.random.split(jax.random.key(7), 3)
  a, _ = sampling.generate(model, tokens, mask, pixels, cfg, keys)
  b, _ = sampling.generate(model, tokens, mask, pixels, cfg, keys)
  np.testing.assert_array_equal(a, b)
  other, _ = sampling.generate(model, tokens, mask, pixels, cfg, jax.random.split(jax.random.key(8), 3))
  assert not np.array_equal(a, other)
  alone, _ = sampling.generate(model, *sampling.pad_prompts(prompts[1:2], 8, 0), pixels[1:2], cfg, keys[1:2])
  np.testing.assert_array_equal(alone[0], a[1])
  with pytest.raises(ValueError, match="keys"):
    sampling.generate(model, tokens, mask, pixels, cfg)


def test_top_k_and_top_p_filtering():
  logits = jax.numpy.log(jax.numpy.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = lambda **kw: np.asarray(sampling.sample_logits(logits, keys, sampling.SamplingConfig(temperature=1.0, **kw)))
  assert set(draw(top_k=2).tolist()) == {0, 1}
  assert set(draw(top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8: two tokens
  assert set(draw(top_p=0.4).tolist()) == {0}
  counts = np.bincount(draw(), minlength=4) / 2000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.04)
  greedy = sampling.sample_logits(logits[:1], keys[:1], sampling.SamplingConfig())
  assert int(greedy[0]) == 0


def test_sharded_generation_equals_single_device(models, tmp_path):
  hf, model = models
  prompts, pixels = _prompts(hf, [3, 8, 5, 1])
  tokens, mask = sampling.pad_prompts(prompts, 8, 0)
  cfg = sampling.SamplingConfig(max_new_tokens=6)
  want, _ = sampling.generate(model, tokens, mask, pixels, cfg)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  graphdef, state = nnx.split(model)
  shardings = sharding.state_shardings(state, mesh)
  sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
  batch = sharding.shard_batch((tokens, mask, pixels), mesh)
  got, _ = sampling.generate(sharded, *batch, cfg)
  np.testing.assert_array_equal(got, want)


def test_continuous_batching_equals_each_prompt_alone(models):
  """Five prompts through 2 slots: rows end at different steps (budgets of 3..11 new tokens, an EOS),
  newcomers are prefilled into freed slots, and every row equals that prompt generated alone (the static
  batch of one) with the same key, sampled and greedy."""
  hf, model = models
  prompts, pixels = _prompts(hf, [3, 12, 1, 7, 5], seed=1)
  limits = [11, 3, 6, 4, 9]
  keys = jax.random.split(jax.random.key(3), 5)
  for cfg in (sampling.SamplingConfig(max_new_tokens=11, temperature=1.0, top_k=20),
              sampling.SamplingConfig(max_new_tokens=11)):
    free, _ = sampling.generate(model, *sampling.pad_prompts(prompts[:1], 8, 0), pixels[:1], cfg, keys[:1])
    cfg = dataclasses.replace(cfg, eos_ids=(int(free[0, 7]),))  # row 0 stops at step 7 or before
    out, lengths, occ = sampling.generate_many(model, prompts, pixels, cfg, keys, slots=2, bucket=8,
                                               limits=limits)
    assert occ.prefills >= 2 and occ.slots == 2  # the later prompts went into freed slots
    for i, p in enumerate(prompts):
      alone, n = sampling.generate(model, *sampling.pad_prompts([p], 8, 0), pixels[i:i + 1], cfg,
                                   keys[i:i + 1])
      want = alone[0].copy()
      want[limits[i]:] = 0  # the static call runs to max_new_tokens; the budget cuts the row here
      assert out[i].tolist() == want.tolist(), i
      assert lengths[i] == min(n[0], limits[i])
    assert occ.useful == sum(min(int(n) + 1, lim) for n, lim in zip(lengths, limits))


def test_continuous_greedy_matches_transformers_generate(models):
  hf, model = models
  prompts, pixels = _prompts(hf, [3, 9, 1, 6, 4], seed=2)
  out, _, occ = sampling.generate_many(model, prompts, pixels, sampling.SamplingConfig(max_new_tokens=6),
                                       slots=2, bucket=8, limits=[6, 2, 5, 3, 6])
  for i, (p, lim) in enumerate(zip(prompts, [6, 2, 5, 3, 6])):
    with torch.no_grad():
      ref = hf.generate(input_ids=torch.as_tensor([p]), pixel_values=torch.as_tensor(pixels[i:i + 1]),
                        max_new_tokens=lim, min_new_tokens=lim, do_sample=False, eos_token_id=None,
                        pad_token_id=0)
    assert out[i, :lim].tolist() == ref[0, len(p):].tolist() and np.all(out[i, lim:] == 0)
  assert occ.decode_steps < 6 + 2 + 5 + 3 + 6  # slots overlapped (a single slot would take 22 steps)



def test_longest_first_admission_shortens_the_tail_and_keeps_outputs(models):
  """Budgets 2, 2, 2, 9 through 2 slots: in the given order the 9-token row starts after two short
  rounds and runs on alone; admitted first (`longest_first`), it overlaps every short row. The rows'
  tokens do not depend on the order."""
  hf, model = models
  prompts, pixels = _prompts(hf, [3, 9, 1, 6], seed=4)
  limits = [2, 2, 2, 9]
  cfg = sampling.SamplingConfig(max_new_tokens=9)
  given, _, occ_given = sampling.generate_many(model, prompts, pixels, cfg, slots=2, bucket=8,
                                               limits=limits)
  order = sampling.longest_first(limits)
  assert order == [3, 0, 1, 2]
  longest, _, occ_longest = sampling.generate_many(model, prompts, pixels, cfg, slots=2, bucket=8,
                                                   limits=limits, order=order)
  np.testing.assert_array_equal(longest, given)
  assert occ_longest.decode_steps < occ_given.decode_steps
  assert occ_longest.useful == occ_given.useful == sum(limits)
  with pytest.raises(ValueError, match="permutation"):
    sampling.generate_many(model, prompts, pixels, cfg, slots=2, bucket=8, order=[0, 0, 1, 2])
