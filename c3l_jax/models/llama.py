"""Llama decoder (transformers `LlamaForCausalLM` semantics): Vicuna / Llama-2 / Llama-3 style.

Pre-norm blocks: RMSNorm -> GQA self-attention with RoPE (rotate-half layout) -> residual ->
RMSNorm -> SwiGLU MLP -> residual; final RMSNorm; untied or tied LM head.

The decoder is position- and mask-explicit so that one code path serves full forwards, left-padded
batches, prefix sharing and KV-cached decoding: callers pass RoPE positions `[B, T]`, a boolean attention
mask `[B, T, S]` and optionally a fixed-size KV cache that new keys/values are written into.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from c3l_jax.models import attention as A
from c3l_jax.models import layers as L
from c3l_jax.models.configs import LlamaConfig, RopeConfig


class KVCache(NamedTuple):
  """Per-layer keys and values, `[L, B, K, S, Dh]` each (K = KV heads, S = cache slots)."""

  k: jax.Array
  v: jax.Array

  SLOT_AXIS = 3

  @classmethod
  def zeros(cls, cfg: LlamaConfig, batch: int, slots: int, dtype) -> "KVCache":
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, slots, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Inverse frequencies `[head_dim / 2]` (float32) for the static RoPE types."""
  inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  if rope.rope_type == "linear":
    inv = inv / rope.factor
  elif rope.rope_type == "llama3":
    old = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def mrope_streams(mrope_section: tuple[int, ...]) -> np.ndarray:
  """For each of the `head_dim / 2` frequencies, the position stream (0 time, 1 height, 2 width) that
  rotates it: consecutive sections of `mrope_section`, section i taking stream i % 3 (Qwen2-VL's M-RoPE)."""
  return np.concatenate([np.full(n, i % 3, np.int32) for i, n in enumerate(mrope_section)])


def rope_cos_sin(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`cos, sin` `[B, T, head_dim]` (float32) for integer positions `[B, T]`, or `[B, T, 3]` (time,
  height, width) with multimodal RoPE (`rope.mrope_section`).

  `dynamic` (NTK) RoPE rescales the base when the longest position exceeds `max_position_embeddings`,
  as transformers' `dynamic_rope_update` does for a forward over those positions.
  """
  rope, dim = cfg.rope, cfg.head_dim
  inv = jnp.asarray(rope_inv_freq(rope, dim))
  if rope.rope_type == "dynamic":
    max_pos = cfg.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
    base = rope.theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
    inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  if positions.ndim == 3:  # M-RoPE: frequency j turns with its section's position stream
    if not rope.mrope_section:
      raise ValueError("3-stream positions need rope.mrope_section")
    streams = jnp.asarray(mrope_streams(rope.mrope_section))
    freqs = jnp.take(positions, streams, axis=-1).astype(jnp.float32) * inv
  else:
    freqs = positions.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE on `[B, T, H, Dh]` with `cos/sin` `[B, T, Dh]` cast to `x.dtype` (as HF)."""
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class LlamaBlock(nnx.Module):

  def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs, attention: str = "xla"):
    d, hd, m = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    self.attention = attention  # a resolved `c3l_jax.models.attention` implementation
    h, k = cfg.num_attention_heads, cfg.num_key_value_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = L.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    qkv_bias = cfg.attention_bias or cfg.qkv_bias
    self.q_proj = L.dense(d, h * hd, ("embed", "heads"), bias=qkv_bias, **kw)
    self.k_proj = L.dense(d, k * hd, ("embed", "kv_heads"), bias=qkv_bias, **kw)
    self.v_proj = L.dense(d, k * hd, ("embed", "kv_heads"), bias=qkv_bias, **kw)
    self.o_proj = L.dense(h * hd, d, ("heads", "embed"), bias=cfg.attention_bias, **kw)
    self.post_attention_layernorm = L.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.gate_proj = L.dense(d, m, ("embed", "mlp"), bias=cfg.mlp_bias, **kw)
    self.up_proj = L.dense(d, m, ("embed", "mlp"), bias=cfg.mlp_bias, **kw)
    self.down_proj = L.dense(m, d, ("mlp", "embed"), bias=cfg.mlp_bias, **kw)
    self.num_heads, self.num_kv_heads, self.head_dim = h, k, hd

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               cache: tuple[jax.Array, jax.Array] | None = None, layer: jax.Array | None = None,
               write_index: jax.Array | None = None, segment_ids: jax.Array | None = None,
               prefix: tuple[jax.Array, jax.Array] | None = None,
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """One block.

    Args:
      x: `[B, T, D]`.  cos/sin: `[B, T, Dh]`.  mask: `[B, T, S]` over the keys attended to.
      cache: the whole stacked cache `(k, v)` `[L, B, K, S, Dh]`, or None (keys are this call's `T`
        tokens, S = T). This call's keys/values are written in place at `[layer, :, :, write_index]`,
        so a decode step moves one token's keys, not the cache.
      segment_ids: `[B, T]`, given when `mask` is "causal over slots within a segment" (no cache); the
        fused kernels that need that structure (splash) use it.
      prefix: this layer's read-only keys / values `[B, K, P, Dh]` of a shared prefix (no cache): the
        keys attended are the prefix's then this call's (`mask` is `[B, T, P + T]`).
    Returns:
      `[B, T, D]` and the updated stacked cache, or this call's keys/values `[B, K, T, Dh]`.
    """
    b, t, _ = x.shape
    h = self.input_layernorm(x)
    q = apply_rope(self.q_proj(h).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
    k = apply_rope(self.k_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
    k = k.transpose(0, 2, 1, 3)
    v = self.v_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
    if cache is not None and jnp.ndim(write_index) == 1:  # one token per row, each at its own slot
      rows = jnp.arange(b)
      ck = cache[0].at[layer, rows, :, write_index].set(k[:, :, 0].astype(cache[0].dtype))
      cv = cache[1].at[layer, rows, :, write_index].set(v[:, :, 0].astype(cache[1].dtype))
      k = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False)
      kv_out = (ck, cv)
    elif cache is not None:
      start = (layer, 0, 0, write_index, 0)
      ck = jax.lax.dynamic_update_slice(cache[0], k[None].astype(cache[0].dtype), start)
      cv = jax.lax.dynamic_update_slice(cache[1], v[None].astype(cache[1].dtype), start)
      k = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False)
      v = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False)
      kv_out = (ck, cv)
    else:
      kv_out = (k, v)
      if prefix is not None:
        k = jnp.concatenate([prefix[0].astype(k.dtype), k], axis=2)
        v = jnp.concatenate([prefix[1].astype(v.dtype), v], axis=2)
    attn = A.attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=self.attention,
                       segment_ids=segment_ids if cache is None and prefix is None else None)
    x = x + self.o_proj(attn.reshape(b, t, self.num_heads * self.head_dim))
    h = self.post_attention_layernorm(x)
    x = x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))
    return x, kv_out


class LlamaForCausalLM(nnx.Module):
  """Embeddings, stacked blocks, final norm and LM head."""

  def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               scan: bool = True, remat: bool = False, attention: str = "xla", rngs: nnx.Rngs):
    self.cfg = cfg
    impl = A.resolve(attention, dtype)
    self.embed_tokens = nnx.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
        embedding_init=nnx.initializers.normal(0.02), rngs=rngs,
        embedding_metadata={"out_sharding": ("vocab", "embed")})
    self.layers = L.stacked(
        lambda r: LlamaBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r, attention=impl),
        cfg.num_hidden_layers, rngs)
    self.norm = L.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = L.dense(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.scan = scan
    self.remat = remat

  def embed(self, tokens: jax.Array) -> jax.Array:
    """`[B, T]` int -> `[B, T, D]` in the compute dtype."""
    return self.embed_tokens(tokens)

  def decode_hidden(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
                    cache: KVCache | None = None, write_index: jax.Array | int = 0,
                    segment_ids: jax.Array | None = None, prefix: KVCache | None = None,
                    ) -> tuple[jax.Array, KVCache]:
    """Run the blocks and the final norm.

    Args:
      x: input embeddings `[B, T, D]`.  positions: RoPE positions `[B, T]` (`[B, T, 3]` with M-RoPE).
      mask: boolean `[B, T, S]`; S = T without a cache, S = cache slots with one.
      cache: optional fixed-size `KVCache`; this call's keys/values are written at `write_index` (a
        scalar, or `[B]` per-row slots for one-token steps).
      segment_ids: `[B, T]` when `mask` is `positions_and_mask`'s (causal over slots, padding its own
        segment), for the attention kernels that take that structure instead of a mask.
      prefix: read-only keys / values `[L, B, K, P, Dh]` of a shared prefix that every token attends
        through `mask [B, T, P + T]` (no cache): scoring's suffixes read the image prefix without
        writing into a copy of it.
    Returns:
      final hidden states `[B, T, D]` (after the final norm) and the KV cache (the updated one, or this
      call's keys/values `[L, B, K, T, Dh]` when no cache was given).
    """
    if cache is not None and prefix is not None:
      raise ValueError("give a KV cache or a read-only prefix, not both")
    cos, sin = rope_cos_sin(self.cfg, positions)
    x = x.astype(self.dtype)
    x = L.batch_sharded(x)
    if cache is None:
      def body(layer, h, pre):
        h, kv = layer(h, cos, sin, mask, segment_ids=segment_ids, prefix=pre)
        return L.batch_sharded(h), kv

      x, kv = L.scan_layers(self.layers, body, x, None if prefix is None else tuple(prefix),
                            scan=self.scan, remat=self.remat)
      return self.norm(x), KVCache(*kv)

    index = jnp.asarray(write_index, jnp.int32)
    if index.ndim == 1 and x.shape[1] != 1:
      raise ValueError("per-row write indices need one token per row")

    def cached_body(layer, carry, i):
      h, ck, cv = carry
      h, (ck, cv) = layer(h, cos, sin, mask, (ck, cv), i, index)
      return (L.batch_sharded(h), ck, cv), None

    (x, ck, cv), _ = L.scan_layers(self.layers, cached_body, (x, cache.k, cache.v),
                                   jnp.arange(self.cfg.num_hidden_layers), scan=self.scan,
                                   remat=self.remat)
    return self.norm(x), KVCache(ck, cv)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """`[B, T, D] -> [B, T, V]` (float32)."""
    if self.cfg.tie_word_embeddings:
      return self.embed_tokens.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Text-only full forward: tokens `[B, T]`, padding mask `[B, T]` -> logits `[B, T, V]`."""
    x = self.embed(tokens)
    positions, mask = positions_and_mask(attention_mask, tokens.shape)
    hidden, _ = self.decode_hidden(x, positions, mask, segment_ids=segments(attention_mask, tokens.shape))
    return self.logits(hidden)


def positions_and_mask(attention_mask: jax.Array | None, shape: tuple[int, int],
                       ) -> tuple[jax.Array, jax.Array]:
  """RoPE positions `[B, T]` and causal+padding mask `[B, T, T]` from a `[B, T]` padding mask.

  Positions count only real tokens (`cumsum - 1`, as transformers' generate does), so a left-padded row
  gets the same positions as the same row unpadded.
  """
  b, t = shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.bool_)
  valid = attention_mask.astype(jnp.bool_)
  positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
  slots = jnp.broadcast_to(jnp.arange(t), (b, t))
  return positions, L.causal_mask(slots, slots, valid)


def segments(attention_mask: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
  """Segment ids `[B, T]` of a left-padded batch (padding 0, tokens 1): with causality over slots, the
  structure of `positions_and_mask`'s mask, for the attention kernels that take it instead."""
  if attention_mask is None:
    return jnp.ones(shape, jnp.int32)
  return attention_mask.astype(jnp.int32)
