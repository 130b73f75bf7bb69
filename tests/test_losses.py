"""Losses against direct, independently written numpy implementations of the paper's equations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from c3l_jax import losses

# Jitted once: eager dispatch compiles every primitive separately, which dominates the test time.
contrastive = jax.jit(losses.contrastive_loss)
contrastive_grads = jax.jit(jax.grad(losses.contrastive_loss, argnums=(0, 3)))
cgvlm = jax.jit(losses.cgvlm_alignment_loss)
token_ce = jax.jit(losses.token_cross_entropy)
pooled = nnx.jit(losses.pooled_representation)


def np_log_softmax(x, axis=-1):
  x = np.asarray(x, np.float64)
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


# ------------------------------------------------------------------------------------- token CE


def np_token_ce(logits, targets, weights):
  total, n = 0.0, 0
  for b in range(logits.shape[0]):
    for t in range(logits.shape[1]):
      if weights[b, t]:
        total -= np_log_softmax(logits[b, t])[targets[b, t]]
        n += 1
  return total / max(n, 1), n


def test_token_cross_entropy_counts_only_targets():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 6, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, (3, 6))
  # row 0: 2 prompt tokens, 3 targets, 1 padding; row 1: all targets; row 2: prompt + padding only.
  weights = np.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], np.float32)
  targets[0, 5] = -100  # an out-of-range id at a padding position is ignored
  want, n_want = np_token_ce(logits, targets, weights)
  loss, n = token_ce(logits, targets, weights)
  assert int(n) == n_want == 9 and loss.dtype == jnp.float32
  assert float(loss) == pytest.approx(want, rel=1e-5)
  changed = logits.copy()
  changed[0, 0] = rng.standard_normal(11) * 50  # a prompt position...
  changed[0, 5] += 100.0  # ...a padding position...
  changed[2] = -changed[2]  # ...and an all-masked row change nothing
  assert float(token_ce(changed, targets, weights)[0]) == pytest.approx(want, rel=1e-5)
  changed[0, 2, 0] += 5.0  # a target position does
  assert float(token_ce(changed, targets, weights)[0]) != pytest.approx(want, rel=1e-5)
  # No target at all: 0, not NaN.
  assert float(token_ce(logits, targets, np.zeros_like(weights))[0]) == 0.0


def test_token_cross_entropy_bf16_logits_computed_in_float32():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.standard_normal((2, 4, 300)) * 4, jnp.bfloat16)
  targets = rng.integers(0, 300, (2, 4))
  weights = np.array([[0, 1, 1, 1], [1, 1, 0, 0]])
  want, _ = np_token_ce(np.asarray(logits.astype(jnp.float32)), targets, weights)
  loss, _ = token_ce(logits, targets, weights)
  assert loss.dtype == jnp.float32 and float(loss) == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------------- eq. 2 and 3


def np_eq3(h_s, valid, pos, h_y, tau, group_valid):
  """Eq. 3 written out: per group, -log(exp(cos(s+, y)/tau) / sum_{valid s} exp(cos(s, y)/tau))."""
  h_s, h_y = np.asarray(h_s, np.float64), np.asarray(h_y, np.float64)
  total, count = 0.0, 0
  for g in range(h_s.shape[0]):
    members = [i for i in range(h_s.shape[1]) if valid[g, i]]
    if not group_valid[g] or len(members) < 2 or pos[g] not in members:
      continue
    sims = []
    for i in members:
      a, b = h_s[g, i], h_y[g]
      sims.append(np.dot(a, b) / (math.sqrt(np.dot(a, a)) * math.sqrt(np.dot(b, b))) / tau)
    m = max(sims)
    log_denominator = m + math.log(sum(math.exp(x - m) for x in sims))
    total += log_denominator - sims[members.index(pos[g])]
    count += 1
  return total / count if count else 0.0


def contrastive_case(seed=1):
  rng = np.random.default_rng(seed)
  g, n, d = 6, 4, 8
  h_s = rng.standard_normal((g, n, d)).astype(np.float32)
  h_y = rng.standard_normal((g, d)).astype(np.float32)
  valid = np.ones((g, n), bool)
  valid[1, 2:] = False  # padded samples
  valid[2, 1:] = False  # a group with one valid sample: excluded
  valid[5, 1] = False  # its positive is padding: excluded
  group_valid = np.array([True, True, True, False, True, True])  # group 3 invalid
  pos = np.array([2, 1, 0, 3, 0, 1])
  return h_s, valid, pos, h_y, 0.1, group_valid


def test_contrastive_loss_equals_numpy_eq3_with_masking():
  h_s, valid, pos, h_y, tau, group_valid = contrastive_case()
  want = np_eq3(h_s, valid, pos, h_y, tau, group_valid)
  assert want > 0
  got = losses.contrastive_loss(h_s, valid, pos, h_y, tau, group_valid)
  assert got.dtype == jnp.float32 and float(got) == pytest.approx(want, rel=1e-5)
  jitted = contrastive(h_s, valid, pos, h_y, tau, group_valid)
  assert float(jitted) == pytest.approx(want, rel=1e-5)
  # Only groups 0, 1 and 4 count: the mean is over 3 groups, not 6.
  only = np.zeros(6, bool)
  only[[0, 1, 4]] = True
  assert float(got) == pytest.approx(np_eq3(h_s, valid, pos, h_y, tau, only), rel=1e-5)
  # bf16 inputs are computed in float32.
  h_s16, h_y16 = jnp.asarray(h_s, jnp.bfloat16), jnp.asarray(h_y, jnp.bfloat16)
  want16 = np_eq3(np.asarray(h_s16.astype(jnp.float32)), valid, pos,
                  np.asarray(h_y16.astype(jnp.float32)), tau, group_valid)
  got16 = contrastive(h_s16, valid, pos, h_y16, tau, group_valid)
  assert got16.dtype == jnp.float32 and float(got16) == pytest.approx(want16, rel=1e-5)


def test_contrastive_denominator_negatives_is_eq3_as_printed_by_hand():
  # Three samples in the plane, the anchor along x: cosines are 1 (the positive, at index 1), 0 and -1.
  h_s = np.array([[[0.0, 2.0], [3.0, 0.0], [-0.5, 0.0]]], np.float32)
  h_y = np.array([[1.0, 0.0]], np.float32)
  valid, pos, group_valid = np.ones((1, 3), bool), np.array([1]), np.array([True])
  tau = 0.5  # sims / τ: 2, 0, -2
  negatives = losses.contrastive_loss(h_s, valid, pos, h_y, tau, group_valid, "negatives")
  assert float(negatives) == pytest.approx(-2.0 + math.log(math.exp(0.0) + math.exp(-2.0)), rel=1e-5)
  assert float(negatives) < 0  # eq. 3 as printed is not bounded below by 0
  everything = losses.contrastive_loss(h_s, valid, pos, h_y, tau, group_valid, "all")
  assert float(everything) == pytest.approx(
      -2.0 + math.log(math.exp(2.0) + math.exp(0.0) + math.exp(-2.0)), rel=1e-5)
  with pytest.raises(ValueError, match="denominator"):
    losses.contrastive_loss(h_s, valid, pos, h_y, tau, group_valid, "positives")


def test_contrastive_loss_gradients_and_padding():
  h_s, valid, pos, h_y, tau, group_valid = contrastive_case()
  want = np_eq3(h_s, valid, pos, h_y, tau, group_valid)
  changed = h_s.copy()
  changed[1, 3] = 1e3  # padding samples do not matter...
  changed[2, 1:] = -7.0
  changed[3] = 5.0  # ...nor an invalid group's samples
  assert float(contrastive(changed, valid, pos, h_y, tau, group_valid)) == pytest.approx(want, rel=1e-5)
  grad_s, grad_y = contrastive_grads(h_s, valid, pos, h_y, tau, group_valid)
  assert np.all(np.isfinite(grad_s)) and np.all(np.isfinite(grad_y))
  for g in (0, 1, 4):  # counted groups pull on their anchor and on every valid sample
    assert np.abs(grad_y[g]).max() > 0
    assert all(np.abs(grad_s[g, i]).max() > 0 for i in range(4) if valid[g, i])
  for g in (2, 3, 5):  # excluded groups get nothing
    assert np.all(grad_y[g] == 0) and np.all(grad_s[g] == 0)
  assert np.all(grad_s[1, 2:] == 0)  # padding samples get no gradient
  # The gradient matches a finite difference of the numpy reference.
  step = np.zeros_like(h_y)
  step[0, 0] = 1e-3
  fd = (np_eq3(h_s, valid, pos, h_y + step, tau, group_valid)
        - np_eq3(h_s, valid, pos, h_y - step, tau, group_valid)) / 2e-3
  assert float(grad_y[0, 0]) == pytest.approx(fd, rel=1e-2, abs=1e-4)
  # Equal similarities: L_c = log |valid samples| (the positive is in the denominator).
  same = np.broadcast_to(h_y[:, None, :], h_s.shape).copy()
  assert float(contrastive(same, valid, pos, h_y, tau, group_valid)) == pytest.approx(
      (math.log(4) + math.log(2) + math.log(4)) / 3, rel=1e-5)


def test_contrastive_loss_no_valid_group_is_zero_with_finite_grads():
  h_s, valid, pos, h_y, tau, _ = contrastive_case()
  none = np.zeros(6, bool)
  assert float(contrastive(h_s, valid, pos, h_y, tau, none)) == 0.0
  grads = contrastive_grads(h_s, valid, pos, h_y, tau, none)
  assert all(np.all(np.isfinite(x)) and np.all(x == 0) for x in grads)
  # Zero (all-padding) representations: finite loss and gradients.
  zeros = np.zeros_like(h_s)
  for gv in (none, np.ones(6, bool)):
    assert np.isfinite(float(contrastive(zeros, valid, pos, np.zeros_like(h_y), tau, gv)))
    grads = contrastive_grads(zeros, valid, pos, np.zeros_like(h_y), tau, gv)
    assert all(np.all(np.isfinite(x)) for x in grads)


def test_pooled_representation_ignores_padding():
  head = losses.ProjectionHead(6, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3, 5, 6)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
  head.proj.bias[...] = jnp.asarray(rng.standard_normal(6).astype(np.float32))  # nnx inits it to 0
  w, b = np.asarray(head.proj.kernel[...]), np.asarray(head.proj.bias[...])
  y = np.maximum(x @ w + b, 0)
  want = np.stack([y[0, :3].mean(0), y[1].mean(0), np.zeros(6)])
  got = np.asarray(pooled(head, x, mask))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  x[0, 3:] = 99.0  # padded positions change nothing
  x[2] = -5.0
  np.testing.assert_allclose(np.asarray(pooled(head, x, mask)), got, atol=1e-6)
  # Leading batch dims ([G, N, T, D]) and bool masks work the same.
  got4 = pooled(head, np.stack([x, x]), np.stack([mask, mask]).astype(bool))
  assert got4.shape == (2, 3, 6)
  np.testing.assert_allclose(np.asarray(got4[1]), got, atol=1e-6)


def test_projection_head_dtype_and_axes():
  head = losses.ProjectionHead(4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert head.proj.kernel[...].dtype == jnp.bfloat16 and head.proj.bias[...].shape == (4,)
  specs = nnx.get_partition_spec(nnx.state(head))
  assert tuple(specs["proj"]["kernel"].get_value()) == ("embed", "mlp")
  out = pooled(head, jnp.ones((2, 3, 4), jnp.float32), jnp.ones((2, 3)))
  assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))


def test_select_groups():
  i2c = [0.2, 0.9, 0.9, 0.1, 0.5, 0.7, 0.3, 0.4, 0.4]
  images = ["img9", "img9", "img9", "img5", "img0", "img0", "img9", "img9", "img9"]
  out = losses.select_groups(i2c, images, max_negatives=3)
  # img9: 1 and 2 tie at 0.9 -> the earlier (1) is the positive; negatives by score, ties by order:
  # 2 (0.9), 7 (0.4), 8 (0.4), then 6 (0.3) and 0 (0.2) are cut by max_negatives=3.
  # img5 has one sample: left out. Groups come in order of first appearance, not key order.
  assert out == [(1, [1, 2, 7, 8]), (5, [5, 4])]
  assert losses.select_groups(i2c, images, max_negatives=10)[0] == (1, [1, 2, 7, 8, 6, 0])
  assert losses.select_groups(i2c, images, max_negatives=1) == [(1, [1, 2]), (5, [5, 4])]
  assert losses.select_groups([0.1], ["a"], max_negatives=4) == []
  with pytest.raises(ValueError, match="non-finite"):
    losses.select_groups([0.1, float("nan")], ["a", "a"], max_negatives=4)
  with pytest.raises(ValueError, match="max_negatives"):
    losses.select_groups([0.1, 0.2], ["a", "a"], max_negatives=0)
  with pytest.raises(ValueError):
    losses.select_groups([0.1, 0.2], ["a"], max_negatives=2)


# ---------------------------------------------------------------------------------------- CG-VLM


def np_cgvlm(pf, pmask, tokens, tmask, temp):
  b = pf.shape[0]
  pf, tokens = np.asarray(pf, np.float64), np.asarray(tokens, np.float64)
  v = [np.mean([p for p, m in zip(pf[i], pmask[i]) if m], axis=0) for i in range(b)]
  sim = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      cos = [v[i] @ e / (np.linalg.norm(v[i]) * np.linalg.norm(e)) for e, m in zip(tokens[j], tmask[j]) if m]
      sim[i, j] = np.mean(cos)
  logits = sim / temp
  i2t = -np.mean([np_log_softmax(logits[i])[i] for i in range(b)])
  t2i = -np.mean([np_log_softmax(logits[:, j])[j] for j in range(b)])
  return (i2t + t2i) / 2


def cgvlm_case():
  rng = np.random.default_rng(3)
  pf = rng.standard_normal((4, 6, 8)).astype(np.float32)
  pmask = np.array([[1] * 6, [1, 1, 1, 1, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]])
  tokens = rng.standard_normal((4, 5, 8)).astype(np.float32)
  tmask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
  return pf, pmask, tokens, tmask


def test_cgvlm_alignment_equals_numpy_and_rewards_alignment():
  pf, pmask, tokens, tmask = cgvlm_case()
  temp = losses.CGVLMTemperature()
  log_t = temp.log_temperature[...]
  assert float(log_t) == pytest.approx(math.log(0.07)) and float(temp.temperature()) == pytest.approx(0.07)
  want = np_cgvlm(pf, pmask, tokens, tmask, 0.07)
  got = cgvlm(pf, pmask, tokens, tmask, log_t)
  assert float(got) == pytest.approx(want, rel=1e-5)
  full = np.ones_like(pmask)
  assert float(cgvlm(pf, None, tokens, tmask, log_t)) == pytest.approx(
      np_cgvlm(pf, full, tokens, tmask, 0.07), rel=1e-5)
  # Padded patches and tokens change nothing.
  pf2, tokens2 = pf.copy(), tokens.copy()
  pf2[1, 4:] = 50.0
  tokens2[0, 3:] = -9.0
  assert float(cgvlm(pf2, pmask, tokens2, tmask, log_t)) == pytest.approx(want, rel=1e-5)
  # Moving each caption's tokens toward its own image's pooled features lowers the loss.
  v = np.stack([pf[i][pmask[i] > 0].mean(0) for i in range(4)])
  prev = float(got)
  for alpha in (0.5, 2.0, 8.0):
    aligned = tokens + alpha * v[:, None, :]
    cur = float(cgvlm(pf, pmask, aligned, tmask, log_t))
    assert cur < prev
    prev = cur


def test_cgvlm_temperature_gradient_and_clipping():
  pf, pmask, tokens, tmask = cgvlm_case()
  temp = losses.CGVLMTemperature()
  loss_fn = lambda m: cgvlm(pf, pmask, tokens, tmask, m.log_temperature[...])
  g = nnx.grad(loss_fn)(temp).log_temperature[...]
  assert np.isfinite(float(g)) and float(g) != 0.0
  eps = 1e-3
  fd = (np_cgvlm(pf, pmask, tokens, tmask, math.exp(math.log(0.07) + eps))
        - np_cgvlm(pf, pmask, tokens, tmask, math.exp(math.log(0.07) - eps))) / (2 * eps)
  assert float(g) == pytest.approx(fd, rel=1e-2)
  # The temperature is clipped to [0.01, 1]; out of range it has no gradient.
  assert float(losses.cgvlm_temperature(math.log(1e-4))) == pytest.approx(0.01)
  assert float(losses.cgvlm_temperature(math.log(10.0))) == pytest.approx(1.0)
  low = cgvlm(pf, pmask, tokens, tmask, math.log(1e-4))
  assert float(low) == pytest.approx(np_cgvlm(pf, pmask, tokens, tmask, 0.01), rel=1e-5)
  g_low = jax.jit(jax.grad(lambda t: cgvlm(pf, pmask, tokens, tmask, t)))(jnp.log(1e-4))
  assert float(g_low) == 0.0
