"""Batched generation for the VLM: one jitted prefill + a `lax.while_loop` decode over a fixed KV cache.

Prompts are left-padded to a bucketed static length (`pad_prompts`); RoPE positions count only real
tokens and padding slots are masked out of every attention, so a row's result does not depend on what it
is batched with (the batched-LLaVA right-padding bug, LLaVA issues #754/#1149, cannot happen). Each row
stops on its own at an EOS id or a stop token sequence (e.g. MiniGPT-4's "###"); the loop ends when every
row has stopped or `max_new_tokens` is reached. Sampling (greedy / temperature / top-k / top-p) draws
from per-row PRNG keys folded with the step, so a row's sample is reproducible and batch-independent.

The loop state is a small dataclass, as in the gemma library's sampler.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from c3l_jax.data.batching import left_pad, round_up
from c3l_jax.models import layers as L
from c3l_jax.models.llama import KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static generation settings (hashable: part of the jit cache key)."""

  max_new_tokens: int = 64
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  eos_ids: tuple[int, ...] = ()
  stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end a row
  pad_id: int = 0


@flax.struct.dataclass
class _LoopState:
  step: jax.Array  # scalar int32
  cache: KVCache
  key_valid: jax.Array  # [B, S] bool: slots holding real tokens
  positions: jax.Array  # [B] RoPE position of the next token
  logits: jax.Array  # [B, V] float32, for the token to sample at `step`
  tokens: jax.Array  # [B, N] generated tokens (pad after a row stops)
  done: jax.Array  # [B] bool


def pad_prompts(prompts: Sequence[Sequence[int]], bucket: int, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token lists to one length, a multiple of `bucket`: `tokens [B, T]`, `mask [B, T]`."""
  return left_pad(prompts, round_up(max(len(p) for p in prompts), bucket), pad_id)


def sample_logits(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Next tokens `[B]` from logits `[B, V]` with per-row keys `[B]`."""
  if cfg.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / cfg.temperature
  neg = jnp.finfo(logits.dtype).min
  if cfg.top_k > 0:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if cfg.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < cfg.top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, neg)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _stopped(tokens: jax.Array, step: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """`[B]` bool: the token at `step` is an EOS or completes a stop sequence."""
  last = tokens[:, step]
  hit = jnp.zeros(last.shape, jnp.bool_)
  for eos in cfg.eos_ids:
    hit |= last == eos
  for seq in cfg.stop_sequences:
    n = len(seq)
    window = jax.lax.dynamic_slice_in_dim(
        jnp.pad(tokens, ((0, 0), (n, 0)), constant_values=-1), step + 1, n, axis=1)
    hit |= jnp.all(window == jnp.asarray(seq, tokens.dtype), axis=-1)
  return hit


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, mask: jax.Array,
              pixel_values: jax.Array | None, keys: jax.Array, cfg: SamplingConfig
              ) -> tuple[jax.Array, jax.Array]:
  model = nnx.merge(graphdef, state)
  lm = model.language_model
  b, t = tokens.shape
  n = cfg.max_new_tokens
  slots = t + n
  valid = mask.astype(jnp.bool_)
  key_valid = jnp.concatenate([valid, jnp.zeros((b, n), jnp.bool_)], axis=1)
  slot_ids = jnp.arange(slots)
  positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
  prefill_mask = L.causal_mask(jnp.broadcast_to(jnp.arange(t), (b, t)),
                               jnp.broadcast_to(slot_ids, (b, slots)), key_valid)
  cache = KVCache.zeros(lm.cfg, b, slots, lm.dtype)
  x = model.embed_image_and_text(tokens, pixel_values)
  hidden, cache = lm.decode_hidden(x, positions, prefill_mask, cache, 0)

  state0 = _LoopState(
      step=jnp.zeros((), jnp.int32), cache=cache, key_valid=key_valid,
      positions=jnp.sum(valid, axis=-1).astype(jnp.int32), logits=lm.logits(hidden[:, -1]),
      tokens=jnp.full((b, n), cfg.pad_id, jnp.int32), done=jnp.zeros((b,), jnp.bool_))

  def cond(s: _LoopState) -> jax.Array:
    return (s.step < n) & ~jnp.all(s.done)

  def body(s: _LoopState) -> _LoopState:
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, s.step)
    token = jnp.where(s.done, cfg.pad_id, sample_logits(s.logits, step_keys, cfg))
    out = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1)
    done = s.done | _stopped(out, s.step, cfg)
    slot = t + s.step
    key_valid = s.key_valid.at[:, slot].set(True)
    step_mask = (key_valid & (slot_ids <= slot))[:, None, :]
    h, cache = lm.decode_hidden(lm.embed(token[:, None]), s.positions[:, None], step_mask, s.cache,
                                slot)
    return _LoopState(step=s.step + 1, cache=cache, key_valid=key_valid, positions=s.positions + 1,
                      logits=lm.logits(h[:, 0]), tokens=out, done=done)

  final = jax.lax.while_loop(cond, body, state0)
  return final.tokens, _lengths(final.tokens, cfg)


def _lengths(tokens: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Tokens before the first EOS (EOS excluded; stop sequences are kept and cut as text)."""
  is_eos = jnp.zeros(tokens.shape, jnp.bool_)
  for eos in cfg.eos_ids:
    is_eos |= tokens == eos
  first = jnp.argmax(is_eos, axis=-1)
  return jnp.where(jnp.any(is_eos, axis=-1), first, tokens.shape[1]).astype(jnp.int32)


def generate(model: nnx.Module, tokens: jax.Array | np.ndarray, mask: jax.Array | np.ndarray,
             pixel_values: jax.Array | np.ndarray | None, cfg: SamplingConfig,
             keys: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Generate continuations of left-padded prompts.

  Args:
    model: a `LlavaVLM` (possibly sharded: inputs placed with `sharding.shard_batch` stay sharded).
    tokens, mask: `[B, T]` left-padded prompts with `<image>` runs expanded (`pad_prompts`).
    pixel_values: `[B, C, H, W]`, one image per row, or None for text-only prompts.
    keys: per-row PRNG keys `[B]` (required when `cfg.temperature > 0`).
  Returns:
    `tokens [B, max_new_tokens]` (pad after a row stops) and `lengths [B]` (tokens before EOS).
  """
  if keys is None:
    if cfg.temperature > 0:
      raise ValueError("sampling with temperature > 0 needs explicit per-row PRNG keys")
    keys = jax.random.split(jax.random.key(0), tokens.shape[0])
  graphdef, state = nnx.split(model)
  out, lengths = _generate(graphdef, state, tokens, mask, pixel_values, keys, cfg)
  return np.asarray(out), np.asarray(lengths)


def decode_texts(tokenizer, tokens: np.ndarray, lengths: np.ndarray,
                 stop_strings: Sequence[str] = ()) -> list[str]:
  """Detokenise each row up to its length and cut at the first stop string."""
  texts = []
  for row, n in zip(tokens, lengths):
    text = tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
    for stop in stop_strings:
      if stop in text:
        text = text[:text.index(stop)]
    texts.append(text.strip())
  return texts
