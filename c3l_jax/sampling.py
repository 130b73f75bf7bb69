"""Batched generation for the VLM: one jitted prefill + a `lax.while_loop` decode over a fixed KV cache.

Prompts are left-padded to a bucketed static length (`pad_prompts`); RoPE positions count only real
tokens and padding slots are masked out of every attention, so a row's result does not depend on what it
is batched with (the batched-LLaVA right-padding bug, LLaVA issues #754/#1149, cannot happen). Each row
stops on its own at an EOS id or a stop token sequence (e.g. MiniGPT-4's "###"); the loop ends when every
row has stopped or `max_new_tokens` is reached. Sampling (greedy / temperature / top-k / top-p) draws
from per-row PRNG keys folded with the step, so a row's sample is reproducible and batch-independent.

The loop state is a small dataclass, as in the gemma library's sampler.

`generate_many` is continuous batching over a fixed number of decode slots: every slot (a row of the KV
cache) has its own step counter and cache write position, and a slot whose row has finished takes the
next waiting prompt (its prefill written into that slot's cache rows) while the other slots keep
decoding, so a batch never waits for its longest row. `generate` is the same decode loop over one batch.
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
class _Slots:
  """The decode state of `B` slots: each slot is one row of the KV cache and holds one prompt at a time.

  The cache is `P` prompt slots (a prompt is left-padded to end at `P`) followed by `N` slots for the
  generated tokens; a slot's `step` counts the tokens it has generated, so rows need not be in step.
  """

  cache: KVCache
  key_valid: jax.Array  # [B, P + N] bool: cache slots holding real tokens
  positions: jax.Array  # [B] RoPE position of the next token
  logits: jax.Array  # [B, V] float32, for the token to sample next
  tokens: jax.Array  # [B, N] generated tokens (pad after a row stops)
  step: jax.Array  # [B] int32: tokens generated so far
  limit: jax.Array  # [B] int32: the row's budget of new tokens (<= N)
  done: jax.Array  # [B] bool: stopped (or an empty slot)
  keys: jax.Array  # [B] PRNG keys
  decode_steps: jax.Array  # scalar int32: decode steps run (all slots), for occupancy accounting


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
  """`[B]` bool: row b's token at `step[b]` (or at a scalar `step`) is an EOS or completes a stop
  sequence."""
  step = jnp.broadcast_to(step, tokens.shape[:1])
  last = jnp.take_along_axis(tokens, step[:, None], axis=1)[:, 0]
  hit = jnp.zeros(last.shape, jnp.bool_)
  for eos in cfg.eos_ids:
    hit |= last == eos
  for seq in cfg.stop_sequences:
    n = len(seq)
    padded = jnp.pad(tokens, ((0, 0), (n, 0)), constant_values=-1)
    window = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s + 1, n))(padded, step)
    hit |= jnp.all(window == jnp.asarray(seq, tokens.dtype), axis=-1)
  return hit


def _prefill(model: nnx.Module, tokens: jax.Array, mask: jax.Array, pixel_values: jax.Array | None,
             prompt_slots: int, slots: int, rope_positions: jax.Array | None = None
             ) -> tuple[KVCache, jax.Array, jax.Array, jax.Array]:
  """Prompts `[b, t]` (left-padded, `t <= prompt_slots`) written to cache slots `[P - t, P)` of fresh
  cache rows of `slots` slots: `(cache, key_valid [b, slots], positions [b], logits [b, V])`.

  `rope_positions` `[b, t, 3]`: the prompts' multimodal RoPE positions (Qwen2.5-VL, computed on the
  host); the generated tokens then continue from each row's largest position + 1, the same in all three
  streams (a `[B, 1]` position is exactly that). None: positions count the real tokens."""
  lm = model.language_model
  b, t = tokens.shape
  start = prompt_slots - t
  valid = mask.astype(jnp.bool_)
  key_valid = jnp.concatenate([jnp.zeros((b, start), jnp.bool_), valid,
                               jnp.zeros((b, slots - prompt_slots), jnp.bool_)], axis=1)
  if rope_positions is None:
    positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
    next_position = jnp.sum(valid, axis=-1).astype(jnp.int32)
  else:
    positions = rope_positions
    next_position = jnp.max(jnp.where(valid[..., None], rope_positions, -1), axis=(1, 2)) + 1
  prefill_mask = L.causal_mask(jnp.broadcast_to(start + jnp.arange(t), (b, t)),
                               jnp.broadcast_to(jnp.arange(slots), (b, slots)), key_valid)
  cache = KVCache.zeros(lm.cfg, b, slots, lm.dtype)
  x = model.embed_image_and_text(tokens, pixel_values)
  hidden, cache = lm.decode_hidden(x, positions, prefill_mask, cache, start)
  return cache, key_valid, next_position.astype(jnp.int32), lm.logits(hidden[:, -1])


def _start(model: nnx.Module, tokens: jax.Array, mask: jax.Array, pixel_values: jax.Array | None,
           keys: jax.Array, limits: jax.Array, active: jax.Array, cfg: SamplingConfig,
           prompt_slots: int, rope_positions: jax.Array | None = None) -> _Slots:
  """Prefill every slot; rows with `active` False start done (empty slots)."""
  b = tokens.shape[0]
  n = cfg.max_new_tokens
  cache, key_valid, positions, logits = _prefill(model, tokens, mask, pixel_values, prompt_slots,
                                                 prompt_slots + n, rope_positions)
  return _Slots(cache=cache, key_valid=key_valid, positions=positions, logits=logits,
                tokens=jnp.full((b, n), cfg.pad_id, jnp.int32), step=jnp.zeros((b,), jnp.int32),
                limit=limits.astype(jnp.int32), done=~active, keys=keys,
                decode_steps=jnp.zeros((), jnp.int32))


def _decode_step(model: nnx.Module, s: _Slots, cfg: SamplingConfig, prompt_slots: int) -> _Slots:
  """Every slot samples its next token and runs it through the decoder (one cached step).

  A live row writes its token at cache slot `P + step`. Empty / finished slots compute along: their
  results are never read, their `key_valid` is left alone, and an admission rewrites the whole row.
  """
  lm = model.language_model
  b, n = s.tokens.shape
  slots = s.key_valid.shape[1]
  rows = jnp.arange(b)
  live = ~s.done
  step_keys = jax.vmap(jax.random.fold_in)(s.keys, s.step)
  token = jnp.where(live, sample_logits(s.logits, step_keys, cfg), cfg.pad_id)
  tokens = s.tokens.at[rows, jnp.where(live, s.step, n)].set(token, mode="drop")
  ends = _stopped(tokens, jnp.minimum(s.step, n - 1), cfg) | (s.step + 1 >= s.limit)
  done = s.done | (live & ends)
  slot = jnp.minimum(prompt_slots + s.step, slots - 1)
  key_valid = s.key_valid.at[rows, slot].set(s.key_valid[rows, slot] | live)
  step_mask = (key_valid & (jnp.arange(slots) <= slot[:, None]))[:, None, :]
  h, cache = lm.decode_hidden(lm.embed(token[:, None]), s.positions[:, None], step_mask, s.cache, slot)
  live_i = live.astype(jnp.int32)
  return s.replace(cache=cache, key_valid=key_valid, positions=s.positions + live_i,
                   logits=lm.logits(h[:, 0]), tokens=tokens, step=s.step + live_i, done=done,
                   decode_steps=s.decode_steps + 1)


def _decode_until(model: nnx.Module, s: _Slots, need: jax.Array, cfg: SamplingConfig,
                  prompt_slots: int) -> _Slots:
  """Decode until `need` more rows have finished, or every row has."""
  done_before = s.done

  def cond(s: _Slots) -> jax.Array:
    return ~jnp.all(s.done) & (jnp.sum(s.done & ~done_before) < need)

  return jax.lax.while_loop(cond, lambda s: _decode_step(model, s, cfg, prompt_slots), s)


def decode(model: nnx.Module, tokens: jax.Array, mask: jax.Array, pixel_values: jax.Array | None,
           keys: jax.Array, cfg: SamplingConfig, rope_positions: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array]:
  """`generate`'s computation, traceable inside another jitted function (e.g. a train step that
  generates): `(tokens [B, max_new_tokens], lengths [B])` for left-padded prompts."""
  b, t = tokens.shape
  s = _start(model, tokens, mask, pixel_values, keys, jnp.full((b,), cfg.max_new_tokens),
             jnp.ones((b,), jnp.bool_), cfg, t, rope_positions)
  s = _decode_until(model, s, jnp.asarray(b + 1), cfg, t)
  return s.tokens, _lengths(s.tokens, cfg)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, mask: jax.Array,
              pixel_values: jax.Array | None, keys: jax.Array, cfg: SamplingConfig,
              rope_positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  return decode(nnx.merge(graphdef, state), tokens, mask, pixel_values, keys, cfg, rope_positions)


def _lengths(tokens: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Tokens before the first EOS (EOS excluded; stop sequences are kept and cut as text)."""
  is_eos = jnp.zeros(tokens.shape, jnp.bool_)
  for eos in cfg.eos_ids:
    is_eos |= tokens == eos
  first = jnp.argmax(is_eos, axis=-1)
  return jnp.where(jnp.any(is_eos, axis=-1), first, tokens.shape[1]).astype(jnp.int32)


def generate(model: nnx.Module, tokens: jax.Array | np.ndarray, mask: jax.Array | np.ndarray,
             pixel_values: jax.Array | np.ndarray | None, cfg: SamplingConfig,
             keys: jax.Array | None = None, rope_positions: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Generate continuations of left-padded prompts.

  Args:
    model: a `LlavaVLM` (possibly sharded: inputs placed with `sharding.shard_batch` stay sharded).
    tokens, mask: `[B, T]` left-padded prompts with `<image>` runs expanded (`pad_prompts`).
    pixel_values: `[B, C, H, W]`, one image per row (a family's packed image input, e.g.
      `QwenImages`), or None for text-only prompts.
    keys: per-row PRNG keys `[B]` (required when `cfg.temperature > 0`).
    rope_positions: `[B, T, 3]` multimodal RoPE positions of the prompts (Qwen2.5-VL), or None.
  Returns:
    `tokens [B, max_new_tokens]` (pad after a row stops) and `lengths [B]` (tokens before EOS).
  """
  if keys is None:
    if cfg.temperature > 0:
      raise ValueError("sampling with temperature > 0 needs explicit per-row PRNG keys")
    keys = jax.random.split(jax.random.key(0), tokens.shape[0])
  graphdef, state = nnx.split(model)
  out, lengths = _generate(graphdef, state, tokens, mask, pixel_values, keys, cfg, rope_positions)
  return np.asarray(out), np.asarray(lengths)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "prompt_slots"))
def _start_jit(graphdef, state, tokens, mask, pixel_values, keys, limits, active, cfg, prompt_slots,
               rope_positions=None):
  return _start(nnx.merge(graphdef, state), tokens, mask, pixel_values, keys, limits, active, cfg,
                prompt_slots, rope_positions)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "prompt_slots"), donate_argnums=(2,))
def _decode_jit(graphdef, state, s, need, cfg, prompt_slots):
  return _decode_until(nnx.merge(graphdef, state), s, need, cfg, prompt_slots)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "prompt_slots"), donate_argnums=(2,))
def _admit_jit(graphdef, state, s: _Slots, rows, tokens, mask, pixel_values, keys, limits, cfg,
               prompt_slots, rope_positions=None):
  """Prefill new prompts into slots `rows` (finished ones), resetting those slots' state."""
  model = nnx.merge(graphdef, state)
  cache, key_valid, positions, logits = _prefill(model, tokens, mask, pixel_values, prompt_slots,
                                                 s.key_valid.shape[1], rope_positions)
  return s.replace(
      cache=KVCache(s.cache.k.at[:, rows].set(cache.k), s.cache.v.at[:, rows].set(cache.v)),
      key_valid=s.key_valid.at[rows].set(key_valid), positions=s.positions.at[rows].set(positions),
      logits=s.logits.at[rows].set(logits), tokens=s.tokens.at[rows].set(cfg.pad_id),
      step=s.step.at[rows].set(0), limit=s.limit.at[rows].set(limits.astype(jnp.int32)),
      done=s.done.at[rows].set(False), keys=s.keys.at[rows].set(keys))


@dataclasses.dataclass
class Occupancy:
  """How busy the decode slots were: `useful` row-steps (tokens generated, stop tokens included) out
  of `slots x decode_steps`."""

  slots: int
  decode_steps: int
  useful: int
  prefills: int  # prefill calls (the first fill included)

  @property
  def wasted(self) -> float:
    """The fraction of slot-steps that computed for an empty or finished slot."""
    total = self.slots * self.decode_steps
    return 1.0 - self.useful / total if total else 0.0


def longest_first(expected: Sequence[float]) -> list[int]:
  """The admission order for `generate_many`: prompts by expected output length, longest first (ties
  keep their order). A hint, such as the instruction type, is enough: only the order changes."""
  return sorted(range(len(expected)), key=lambda i: -expected[i])


def _chunks(n: int, most: int) -> list[int]:
  """`n` as a sum of powers of two (largest first), each at most `most`: the admission batch sizes,
  so prefills compile for a few shapes only."""
  sizes = []
  while n:
    size = min(1 << (n.bit_length() - 1), 1 << (most.bit_length() - 1))
    sizes.append(size)
    n -= size
  return sizes


def generate_many(model: nnx.Module, prompts: Sequence[Sequence[int]],
                  pixels: Sequence[np.ndarray] | np.ndarray | None, cfg: SamplingConfig,
                  keys: jax.Array | None = None, *, slots: int, bucket: int,
                  limits: Sequence[int] | None = None, order: Sequence[int] | None = None,
                  place=None, images=None) -> tuple[np.ndarray, np.ndarray, Occupancy]:
  """Generate for any number of prompts with continuous batching over `slots` decode slots.

  The first `slots` prompts are prefilled together; whenever a row finishes (EOS, stop sequence or its
  budget), the next waiting prompts are prefilled into the freed slots and decoding goes on, so a batch
  never waits for its longest row. Each row's tokens are those `generate` gives for that prompt alone
  with the same key: a row's computation never reads another row's, and its PRNG stream is its key
  folded with its own step.

  Shapes are static: the cache holds `P + N` slots per row (`P` = the longest prompt rounded up to
  `bucket`, `N = cfg.max_new_tokens`); a newcomer batch is padded to its own bucket and has a
  power-of-two size, so the programs compile once per (size, bucket).

  Args:
    prompts: token lists (`<image>` runs expanded). pixels: one `[C, H, W]` image per prompt, or None.
    keys: per-prompt PRNG keys `[M]` (required when `cfg.temperature > 0`).
    slots: decode slots (the batch size). bucket: prompt-length bucket.
    limits: per-prompt budgets of new tokens (default `cfg.max_new_tokens`, at most that).
    order: the order the prompts take the slots in, a permutation of `range(M)` (default: as given).
      Admitting the rows expected to be longest first (`longest_first`) shortens the tail, where a
      long row admitted late runs on alone; the outputs do not depend on the order.
    place: optional function placing the first fill's numpy batch dict (`tokens`, `mask`, `pixels`) on
      devices (e.g. `sharding.shard_batch` on a mesh); the slots' state stays laid out that way.
    images: for a family whose images vary in size (Qwen2.5-VL), a function `(indices, tokens, mask) ->
      (pixel input, rope positions [b, T, 3])` building a batch's packed images and multimodal RoPE
      positions from the prompts' own images; `pixels` is then ignored.
  Returns:
    `tokens [M, N]` (pad after a row stops), `lengths [M]` (tokens before EOS, at most the row's
    budget) and the `Occupancy`.
  """
  m, n = len(prompts), cfg.max_new_tokens
  if keys is None:
    if cfg.temperature > 0:
      raise ValueError("sampling with temperature > 0 needs explicit per-row PRNG keys")
    keys = jax.random.split(jax.random.key(0), max(m, 1))
  limits = np.full(m, n, np.int32) if limits is None else np.asarray(limits, np.int32)
  if limits.shape != (m,) or np.any(limits < 1) or np.any(limits > n):
    raise ValueError(f"limits must be {m} budgets in 1..max_new_tokens={n}")
  out = np.full((m, n), cfg.pad_id, np.int32)
  if not m:
    return out, np.zeros(0, np.int32), Occupancy(slots, 0, 0, 0)
  graphdef, state = nnx.split(model)
  prompt_slots = round_up(max(len(p) for p in prompts), bucket)
  pix = None if pixels is None or images is not None else np.asarray(pixels)

  def batch(idx: Sequence[int]) -> dict:
    tokens, mask = pad_prompts([prompts[i] for i in idx], bucket, cfg.pad_id)
    out = {"tokens": tokens, "mask": mask, "pixels": None if pix is None else pix[list(idx)],
           "keys": keys[np.asarray(idx)], "limits": limits[list(idx)], "rope": None}
    if images is not None:
      out["pixels"], out["rope"] = images(list(idx), tokens, mask)
    return out

  queue = list(range(m)) if order is None else [int(i) for i in order]
  if sorted(queue) != list(range(m)):
    raise ValueError(f"order must be a permutation of range({m})")
  first = queue[:slots]
  fill = batch(first + [first[0]] * (slots - len(first)))
  fill["active"] = np.arange(slots) < len(first)
  if place is not None:
    placed = ("tokens", "mask") if images is not None else ("tokens", "mask", "pixels")
    fill.update(place({k: fill[k] for k in placed if fill[k] is not None}))
  s = _start_jit(graphdef, state, fill["tokens"], fill["mask"], fill["pixels"], fill["keys"],
                 fill["limits"], fill["active"], cfg, prompt_slots, fill["rope"])
  owner = first + [-1] * (slots - len(first))  # the prompt in each slot, -1 when empty
  waiting = queue[len(first):]
  prefills, useful = 1, 0
  while True:
    need = 1 if waiting else slots + 1  # refill as soon as a row ends; at the end run all out
    s = _decode_jit(graphdef, state, s, jnp.asarray(need, jnp.int32), cfg, prompt_slots)
    done = np.asarray(s.done)
    finished = [r for r in range(slots) if done[r] and owner[r] >= 0]
    if finished:
      tokens, steps = np.asarray(s.tokens), np.asarray(s.step)
      for r in finished:
        out[owner[r]] = tokens[r]
        useful += int(steps[r])
        owner[r] = -1
    if not waiting:
      if all(o < 0 for o in owner):
        break
      continue
    free = [r for r in range(slots) if owner[r] < 0]
    take = free[:len(waiting)]
    for size in _chunks(len(take), slots):
      rows, take = take[:size], take[size:]
      idx, waiting = waiting[:size], waiting[size:]
      new = batch(idx)
      s = _admit_jit(graphdef, state, s, jnp.asarray(rows, jnp.int32), new["tokens"], new["mask"],
                     new["pixels"], new["keys"], new["limits"], cfg, prompt_slots, new["rope"])
      prefills += 1
      for r, i in zip(rows, idx):
        owner[r] = i
  occupancy = Occupancy(slots, int(s.decode_steps), useful, prefills)
  return out, np.minimum(np.asarray(_lengths(jnp.asarray(out), cfg)), limits), occupancy


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
