"""Attention implementations (`c3l_jax.models.attention`) against a float64 numpy reference, and the
decoder with each one against transformers through the existing parity path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from c3l_jax.models import attention as A


def _inputs(b=2, t=128, h=4, kv=2, d=16, pad=37, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, t, h, d)).astype(np.float32)
  k = rng.standard_normal((b, kv, t, d)).astype(np.float32)
  v = rng.standard_normal((b, kv, t, d)).astype(np.float32)
  valid = np.ones((b, t), bool)
  valid[1, :pad] = False  # row 1 left-padded
  slots = np.arange(t)
  mask = (slots[None, None, :] <= slots[None, :, None]) & valid[:, None, :]
  return q, k, v, valid, mask


def _numpy_attention(q, k, v, mask):
  """Independent reference: every query head against its group's keys, float64, explicit softmax."""
  b, t, h, d = q.shape
  kv = k.shape[1]
  out = np.zeros((b, t, h, d))
  for bi in range(b):
    for hi in range(h):
      kk, vv = k[bi, hi // (h // kv)].astype(np.float64), v[bi, hi // (h // kv)].astype(np.float64)
      for ti in range(t):
        keys = np.flatnonzero(mask[bi, ti])
        if not len(keys):
          continue
        s = kk[keys] @ q[bi, ti, hi].astype(np.float64) / np.sqrt(d)
        p = np.exp(s - s.max())
        out[bi, ti, hi] = (p / p.sum()) @ vv[keys]
  return out


@pytest.mark.parametrize("kv_block", [1024, 32, 48])
def test_xla_blocked_equals_reference(kv_block):
  """One block (the plain formula) and several (online softmax, incl. a padded last block and blocks
  a padded row cannot see) give the same values."""
  q, k, v, valid, mask = _inputs()
  want = _numpy_attention(q, k, v, mask)
  got = np.asarray(A.attention(q, k, v, mask, impl="xla", kv_block=kv_block))
  np.testing.assert_allclose(got[valid], want[valid], atol=2e-6)


def test_xla_bf16_within_bf16_tolerance():
  q, k, v, valid, mask = _inputs()
  want = _numpy_attention(q, k, v, mask)
  for block in (1024, 32):  # jitted: XLA:CPU runs bf16 dots with f32 accumulation only when compiled
    fn = jax.jit(lambda q, k, v, m, block=block: A.attention(q, k, v, m, kv_block=block))
    got = fn(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), mask)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32)[valid], want[valid], atol=3e-2)


def test_splash_kernel_in_interpret_mode():
  """The Pallas splash kernel (TPU), run in interpret mode on CPU: causal mask + segment ids (padding
  its own segment) equal the boolean mask's attention on every real token, GQA included."""
  q, k, v, valid, mask = _inputs()
  got = np.asarray(A.attention(q, k, v, mask, impl="splash", segment_ids=valid.astype(np.int32),
                               interpret=True))
  np.testing.assert_allclose(got[valid], _numpy_attention(q, k, v, mask)[valid], atol=2e-6)


def test_cudnn_branch_arguments(monkeypatch):
  """The `cudnn` branch's layout (keys / values to `[B, S, K, D]`, the mask broadcast over heads), GQA
  and a left-padded row included, with jax's XLA implementation of the same call standing in for the
  kernel (which has no CPU mode; `bench/gpu.py`'s check compares the kernel itself on a GPU)."""
  real = jax.nn.dot_product_attention
  calls = []

  def stand_in(*args, implementation=None, **kwargs):
    calls.append(implementation)
    return real(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  q, k, v, valid, mask = _inputs()
  got = np.asarray(A.attention(q, k, v, mask, impl="cudnn"))
  assert calls == ["cudnn"]
  np.testing.assert_allclose(got[valid], _numpy_attention(q, k, v, mask)[valid], atol=2e-6)


def test_decode_and_unstructured_masks_take_xla():
  """One query token, or a mask without segment ids, never reaches a fused kernel (which would fail on
  CPU): splash falls back to the XLA path and gives its values."""
  q, k, v, valid, mask = _inputs()
  want = np.asarray(A.attention(q, k, v, mask))
  np.testing.assert_array_equal(np.asarray(A.attention(q, k, v, mask, impl="splash")), want)
  np.testing.assert_allclose(np.asarray(A.attention(q[:, -1:], k, v, mask[:, -1:], impl="cudnn")),
                             want[:, -1:], atol=1e-6)


def test_auto_resolution():
  assert A.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert A.resolve("auto", jnp.bfloat16, "tpu") == "splash"
  assert A.resolve("auto", jnp.float32, "gpu") == "xla"  # the fused kernels are bf16 / fp16
  assert A.resolve("auto", jnp.bfloat16, "cpu") == "xla"
  assert A.resolve("splash", jnp.float32, "cpu") == "splash"
  with pytest.raises(ValueError, match="unknown attention implementation"):
    A.resolve("flash", jnp.float32)


def test_decoder_with_splash_matches_transformers(tmp_path):
  """A converted LLaVA whose decoder runs splash (interpret mode) gives transformers' logits."""
  from c3l_jax import sharding
  from hf_reference import convert_cli, llava_inputs, make_hf_llava, torch_logits

  hf = make_hf_llava(str(tmp_path / "hf"))
  assert convert_cli(str(tmp_path / "hf"), str(tmp_path / "ours")).returncode == 0
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tokens, pixels, mask = llava_inputs(hf, batch=2, left_pad=3)
  want = torch_logits(hf, tokens, pixels, mask)
  original = A._splash
  try:
    A._splash = lambda q, k, v, seg, interpret: original(q, k, v, seg, True)  # CPU: interpret mode
    model = sharding.load_model(str(tmp_path / "ours"), mesh, attention="splash")
    got = np.asarray(model(tokens, pixels, mask))
  finally:
    A._splash = original
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)
