"""Losses against direct numpy implementations of the paper's equations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from c3l_jax import losses


def np_log_softmax(x, axis=-1):
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def test_token_cross_entropy_counts_only_targets():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  weights = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)  # prompt / padding are 0
  want = -(np_log_softmax(logits)[np.arange(2)[:, None], np.arange(5), targets] * weights).sum() / 5
  loss, n = losses.token_cross_entropy(logits, targets, weights)
  assert float(n) == 5 and float(loss) == pytest.approx(want, rel=1e-6)
  logits[0, 0] += 100.0  # a masked position changes nothing
  assert float(losses.token_cross_entropy(logits, targets, weights)[0]) == pytest.approx(want, rel=1e-6)


def np_eq3(h_s, valid, pos, h_y, tau, group_valid):
  """Eq. 3 written out: per group, -log(exp(cos(s+, y)/tau) / sum_s exp(cos(s, y)/tau))."""
  total, count = 0.0, 0
  for g in range(h_s.shape[0]):
    members = [i for i in range(h_s.shape[1]) if valid[g, i]]
    if not group_valid[g] or len(members) < 2:
      continue
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    sims = {i: cos(h_s[g, i], h_y[g]) / tau for i in members}
    denominator = np.log(sum(np.exp(v) for v in sims.values()))
    total += denominator - sims[pos[g]]
    count += 1
  return total / max(count, 1)


def test_contrastive_loss_equals_numpy_eq3_with_masking():
  rng = np.random.default_rng(1)
  g, n, d = 5, 4, 8
  h_s = rng.standard_normal((g, n, d)).astype(np.float32)
  h_y = rng.standard_normal((g, d)).astype(np.float32)
  valid = np.ones((g, n), bool)
  valid[1, 2:] = False  # padded samples
  valid[2, 1:] = False  # a group with one valid sample: excluded
  group_valid = np.array([True, True, True, False, True])  # an invalid group
  pos = np.array([2, 1, 0, 3, 0])
  tau = 0.1
  want = np_eq3(h_s, valid, pos, h_y, tau, group_valid)
  got = losses.contrastive_loss(h_s, valid, pos, h_y, tau, group_valid)
  assert float(got) == pytest.approx(want, rel=1e-5)
  h_s_changed = h_s.copy()
  h_s_changed[1, 3] = 1e3  # padding values do not matter...
  assert float(losses.contrastive_loss(h_s_changed, valid, pos, h_y, tau, group_valid)) == pytest.approx(want, rel=1e-5)
  grad_s, grad_y = jax.grad(losses.contrastive_loss, argnums=(0, 3))(h_s, valid, pos, h_y, tau, group_valid)
  assert np.all(np.isfinite(grad_y)) and np.abs(grad_y[0]).max() > 0
  assert np.all(grad_s[1, 2:] == 0) and np.all(grad_s[3] == 0)  # ...and get no gradient
  # Zero (all-padding) representations and no valid group: loss 0, finite gradients.
  zeros = np.zeros_like(h_s)
  none = np.zeros(g, bool)
  assert float(losses.contrastive_loss(zeros, valid, pos, h_y, tau, none)) == 0.0
  grads = jax.grad(losses.contrastive_loss, argnums=(0, 3))(zeros, valid, pos, h_y, tau, group_valid)
  assert all(np.all(np.isfinite(x)) for x in grads)


def test_pooled_representation_ignores_padding():
  head = losses.ProjectionHead(6, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  x = rng.standard_normal((3, 5, 6)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
  w, b = np.asarray(head.proj.kernel[...]), np.asarray(head.proj.bias[...])
  y = np.maximum(x @ w + b, 0)
  want = np.stack([y[0, :3].mean(0), y[1].mean(0), np.zeros(6)])
  got = np.asarray(losses.pooled_representation(head, x, mask))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  x[0, 3:] = 99.0
  np.testing.assert_allclose(np.asarray(losses.pooled_representation(head, x, mask)), got, atol=1e-6)


def test_select_groups():
  i2c = [0.2, 0.9, 0.9, 0.1, 0.5, 0.7, 0.3, 0.4]
  images = ["a", "a", "a", "b", "c", "c", "a", "a"]
  out = losses.select_groups(i2c, images, max_negatives=2)
  # a: 1 and 2 tie at 0.9 -> the earlier (1) is positive; negatives by score: 2, 7 (0.4) ; b excluded.
  assert out == [(1, [1, 2, 7]), (5, [5, 4])]


def np_cgvlm(pf, tokens, tmask, temp):
  v = pf.mean(1)
  b = pf.shape[0]
  sim = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      cos = [v[i] @ e / (np.linalg.norm(v[i]) * np.linalg.norm(e)) for e, m in zip(tokens[j], tmask[j]) if m]
      sim[i, j] = np.mean(cos)
  logits = sim / temp
  i2t = -np.diag(np_log_softmax(logits, 1)).mean()
  t2i = -np.diag(np_log_softmax(logits.T, 1)).mean()
  return (i2t + t2i) / 2


def test_cgvlm_alignment_equals_numpy_and_rewards_alignment():
  rng = np.random.default_rng(3)
  pf = rng.standard_normal((4, 6, 8)).astype(np.float32)
  tokens = rng.standard_normal((4, 5, 8)).astype(np.float32)
  tmask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
  temp = losses.CGVLMTemperature()
  want = np_cgvlm(pf, tokens, tmask, 0.07)
  got = losses.cgvlm_alignment_loss(pf, None, tokens, tmask, temp())
  assert float(got) == pytest.approx(want, rel=1e-4)
  aligned = tokens + 3.0 * pf.mean(1, keepdims=True)  # captions move toward their own image
  assert float(losses.cgvlm_alignment_loss(pf, None, aligned, tmask, temp())) < float(got)
  g = jax.grad(lambda t: losses.cgvlm_alignment_loss(pf, None, tokens, tmask, jnp.exp(t)))(jnp.log(0.07))
  assert np.isfinite(float(g))
