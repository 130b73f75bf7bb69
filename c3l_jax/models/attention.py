"""Scaled dot-product attention for every model, by backend (`model.attention`).

- `xla`: plain XLA. Scores are computed in the compute dtype, the softmax (max, sum) and the output
  accumulate in float32. Over `kv_block` keys the keys are processed in blocks with an online softmax (running max,
  running sum and output in float32: flash attention's recurrence), so the `[B, K, G, T, S]` score
  matrix never exists for long sequences; shorter ones take one block, exactly the plain formula.
- `cudnn`: cuDNN's fused flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`
  (NVIDIA GPUs, bf16 / fp16), with the boolean mask passed as is.
- `splash`: Pallas splash attention (TPU). It takes a static causal mask plus segment ids, so it serves
  the calls whose mask is "causal over slots, within a segment" (prefill, full forwards, training):
  the caller passes `segment_ids`; other calls fall back to `xla`.
- `auto`: `cudnn` on GPU and `splash` on TPU for bf16 / fp16 compute, `xla` otherwise.
Decoding one token (`T == 1`) always takes `xla`: it reads the KV cache once, which is all a fused kernel
would do. `interpret=True` runs the Pallas kernel in interpret mode on CPU (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
KV_BLOCK = 1024
_SPLASH_ALIGN = 128
_EMPTY = -1e30  # running max of a row that has seen no key yet (finite: exp(_EMPTY - m) is 0 or 1)
_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)


def resolve(impl: str, dtype, platform: str | None = None) -> str:
  """The implementation `impl` means on `platform` (default: jax's backend) for compute `dtype`."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {impl!r} (valid: {', '.join(IMPLEMENTATIONS)})")
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _FUSED_DTYPES]:
    return "xla"
  return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform, "xla")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, impl: str = "xla",
              segment_ids: jax.Array | None = None, kv_block: int = KV_BLOCK,
              interpret: bool = False) -> jax.Array:
  """Attention with grouped KV heads.

  Args:
    q: `[B, T, H, D]` queries.
    k, v: `[B, K, S, D]` keys / values, heads-major (the KV-cache layout), `H % K == 0`.
    mask: boolean `[B, T, S]` (True = attend) or None for full attention.
    impl: a resolved implementation (`resolve`): xla | cudnn | splash.
    segment_ids: `[B, T]` with `T == S`, given only when `mask` is exactly "key slot <= query slot and
      same segment id" (what `splash` needs; the others use `mask`).
  Returns:
    `[B, T, H, D]` in `q.dtype`.
  """
  if q.shape[1] == 1 or impl == "xla" or (impl == "splash" and segment_ids is None):
    return _xla(q, k, v, mask, kv_block)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(
        q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        mask=None if mask is None else mask[:, None], implementation="cudnn").astype(q.dtype)
  if impl == "splash":
    return _splash(q, k, v, segment_ids, interpret)
  raise ValueError(f"unresolved attention implementation {impl!r}")


def _xla(q, k, v, mask, kv_block: int) -> jax.Array:
  b, t, h, d = q.shape
  kv, s = k.shape[1], k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d) * jnp.asarray(d ** -0.5, q.dtype)
  if s <= kv_block:
    out = _block(q, k, v, mask)[2]
    return out.reshape(b, t, h, d).astype(v.dtype)
  pad = -s % kv_block
  if pad:
    k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
    full = jnp.ones((b, t, s), jnp.bool_) if mask is None else mask
    mask = jnp.pad(full, ((0, 0), (0, 0), (0, pad)))
  n = (s + pad) // kv_block
  blocks = (k.reshape(b, kv, n, kv_block, d).transpose(2, 0, 1, 3, 4),
            v.reshape(b, kv, n, kv_block, d).transpose(2, 0, 1, 3, 4),
            None if mask is None else mask.reshape(b, t, n, kv_block).transpose(2, 0, 1, 3))
  g = h // kv
  init = (jnp.full((b, kv, g, t), _EMPTY, jnp.float32), jnp.zeros((b, kv, g, t), jnp.float32),
          jnp.zeros((b, t, kv, g, d), jnp.float32))

  def step(carry, block):
    m, l, acc = carry
    kb, vb, mb = block
    m_b, l_b, acc_b = _block(q, kb, vb, mb, normalise=False)
    m_new = jnp.maximum(m, m_b)
    a, a_b = jnp.exp(m - m_new), jnp.exp(m_b - m_new)
    l = l * a + l_b * a_b
    acc = (acc * a.transpose(0, 3, 1, 2)[..., None] + acc_b * a_b.transpose(0, 3, 1, 2)[..., None])
    return (m_new, l, acc), None

  (m, l, acc), _ = jax.lax.scan(step, init, blocks)
  out = acc / jnp.where(l == 0, 1.0, l).transpose(0, 3, 1, 2)[..., None]
  return out.reshape(b, t, h, d).astype(v.dtype)


def _block(q, k, v, mask, normalise: bool = True):
  """One key block: scores and products in the compute dtype, softmax statistics and the running output
  in float32 (XLA:CPU has no bf16 x bf16 -> f32 dot); returns the block's row max
  `[B, K, G, T]`, row sum of exp and its output `[B, T, K, G, D]` (normalised when `normalise`)."""
  logits = jnp.einsum("btkgd,bksd->bkgts", q, k).astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
  m = logits.max(-1)
  p = jnp.exp(logits - m[..., None])
  l = p.sum(-1)
  if normalise:
    p = p / l[..., None]
  out = jnp.einsum("bkgts,bksd->btkgd", p.astype(v.dtype), v).astype(jnp.float32)
  if mask is not None and not normalise:  # a block with no visible key contributes nothing
    visible = mask.any(-1)[:, None, None, :]
    m = jnp.where(visible, m, _EMPTY)
    l = jnp.where(visible, l, 0.0)
  return m, l, out


@functools.lru_cache(maxsize=None)
def _splash_kernel(t: int, group: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  block = max(b for b in (512, 256, 128) if t % b == 0)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(group)])
  # Built eagerly even when first asked for inside a trace: the cached kernel holds the mask's block
  # tables as arrays, which must be constants, not tracers of the jit that happened to build it.
  with jax.ensure_compile_time_eval():
    return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash(q, k, v, segment_ids, interpret: bool) -> jax.Array:
  """Per batch row and KV head, the G query heads of that group attend its keys (splash's MQA form)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  b, t, h, d = q.shape
  kv = k.shape[1]
  g = h // kv
  pad = -t % _SPLASH_ALIGN  # the kernel's blocks are multiples of 128: pad the end as segment 0
  if pad:
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    k, v = [jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k, v)]
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
  kernel = _splash_kernel(t + pad, g, interpret)
  qg = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, t + pad, kv, g, d).transpose(0, 2, 3, 1, 4)
  seg = segment_ids.astype(jnp.int32)

  def one(qh, kh, vh, sg):  # [G, T, D], [S, D], [S, D], [T]
    return kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=sg, kv=sg))

  out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0))(qg, k, v, seg)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t + pad, h, d)[:, :t].astype(q.dtype)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
  """Float64 numpy attention (tests)."""
  b, t, h, d = q.shape
  kv = k.shape[1]
  kk = np.repeat(np.asarray(k, np.float64), h // kv, axis=1)
  vv = np.repeat(np.asarray(v, np.float64), h // kv, axis=1)
  logits = np.einsum("bthd,bhsd->bhts", np.asarray(q, np.float64), kk) / np.sqrt(d)
  if mask is not None:
    logits = np.where(mask[:, None], logits, -np.inf)
  logits -= logits.max(-1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bhsd->bthd", p, vv)
