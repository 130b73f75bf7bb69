r"""Content relevance between image and generated text: S(I2C), eq. 1 of the C3L paper.

    S(I2C) = D_KL(S(A|V) || S(A)) = \sum_{t=1}^{n} p_t^v \log(p_t^v / p_t^d)          (1)

p_t^v is the teacher-forced probability of the t-th answer token given image + question, p_t^d the same
with no image (the same conversation without its image part). Per record we report `i2c`, `logp_image`
(\sum log p^v), `logp_text` (\sum log p^d) and `n_tokens`. Options: `mode="full_kl"` replaces eq. 1's
per-token term by the full-vocabulary KL(P_t^v || P_t^d); `length_norm` divides by `n_tokens`.

Prefix sharing: the QA pairs of one image share the system prompt and the image tokens (576 of ~650
tokens for LLaVA-1.5). Their KV cache is computed once per image; the image's QA suffixes are packed
into one row (segment-masked: each attends to the prefix and causally to itself) and scored against it,
so the prefix cache is never copied per QA. The text-only pass packs the same image's QA the same
way (each a segment attending causally to itself), so no sequence is padded to the longest. Both
equal the naive two full forwards to float tolerance (tested). Only the answer tokens go through the
LM head, laid out alike in both passes (one image's answers after each other).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from c3l_jax import sharding
from c3l_jax.data.batching import right_pad, round_up
from c3l_jax.models.llama import KVCache, positions_and_mask


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
  mode: str = "eq1"  # eq1 | full_kl
  length_norm: bool = False
  prefix_sharing: bool = True
  batch_rows: int = 8  # QA rows per device batch
  suffix_bucket: int = 32  # static-shape buckets (tokens)
  answer_bucket: int = 16
  text_bucket: int = 32

  def __post_init__(self):
    if self.mode not in ("eq1", "full_kl"):
      raise ValueError(f"scoring.mode must be eq1 or full_kl, got {self.mode!r}")


@dataclasses.dataclass
class ScoreInput:
  """One QA to score: token ids of both prompts, the answer, and which image it belongs to."""

  image_key: Any
  prompt_image: Sequence[int]
  prompt_text: Sequence[int]
  answer: Sequence[int]


def _gather_answer_logprobs(lm, hidden: jax.Array, tokens: jax.Array, answer_pos: jax.Array,
                            full: bool) -> tuple[jax.Array, jax.Array | None]:
  """Log-probs of the answer tokens at `answer_pos [B, A]` (the LM head runs on those rows only)."""
  pred = jnp.take_along_axis(hidden, jnp.maximum(answer_pos - 1, 0)[..., None], axis=1)
  logp = jax.nn.log_softmax(lm.logits(pred), axis=-1)  # [B, A, V]
  target = jnp.take_along_axis(tokens, answer_pos, axis=1)
  token_logp = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  return token_logp, (logp if full else None)


@functools.partial(jax.jit, static_argnames=("graphdef", "full"))
def _full_pass(graphdef, state, tokens, mask, pixel_values, answer_pos, full: bool):
  """Naive teacher forcing over whole sequences `[B, T]` (right-padded)."""
  model = nnx.merge(graphdef, state)
  lm = model.language_model
  x = model.embed_image_and_text(tokens, pixel_values)
  positions, mask3 = positions_and_mask(mask, tokens.shape)
  hidden, _ = lm.decode_hidden(x, positions, mask3)
  return _gather_answer_logprobs(lm, hidden, tokens, answer_pos, full)


def _segment_mask(segments: jax.Array) -> jax.Array:
  """`[B, W, W]`: a token of a packed row attends causally within its own segment (the trailing
  padding, segment 0, within itself), exactly the structure `segment_ids` names for the kernels."""
  w = segments.shape[1]
  same = segments[:, :, None] == segments[:, None, :]
  return same & (jnp.arange(w)[None, :] <= jnp.arange(w)[:, None])[None]


@functools.partial(jax.jit, static_argnames=("graphdef", "full"))
def _packed_pass(graphdef, state, packed, segments, positions, answer_pos, full: bool):
  """Teacher forcing of text-only sequences packed into rows `[B, W]`: each is a segment (1, 2, ...;
  0 = padding) with its own positions from 0, attending causally within itself only, so each is
  scored as if alone, without padding every sequence to the longest."""
  model = nnx.merge(graphdef, state)
  lm = model.language_model
  hidden, _ = lm.decode_hidden(lm.embed(packed), positions, _segment_mask(segments),
                               segment_ids=segments)
  return _gather_answer_logprobs(lm, hidden, packed, answer_pos, full)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefix_cache(graphdef, state, prefix, pixel_values) -> KVCache:
  """KV cache `[L, G, K, P, Dh]` of the shared prefixes `[G, P]` (image tokens included)."""
  model = nnx.merge(graphdef, state)
  lm = model.language_model
  x = model.embed_image_and_text(prefix, pixel_values)
  positions, mask3 = positions_and_mask(None, prefix.shape)
  _, cache = lm.decode_hidden(x, positions, mask3, segment_ids=jnp.ones(prefix.shape, jnp.int32))
  return cache


@functools.partial(jax.jit, static_argnames=("graphdef", "full"))
def _suffix_pass(graphdef, state, cache: KVCache, packed, segments, positions, answer_pos,
                 full: bool):
  """Teacher forcing of each image's QA suffixes, packed into one row, against the image's prefix.

  Args:
    cache: prefix KV cache `[L, G, K, P, Dh]`.
    packed: `[G, W]` the Q suffixes of image g concatenated (then padding).
    segments: `[G, W]` which suffix (1..Q) a token belongs to; 0 = padding.
    positions: `[G, W]` RoPE positions, each suffix starting at P.
    answer_pos: `[G, Q * A]` indices into `packed` of every suffix's answer tokens.
  A token attends to the whole prefix and causally to its own suffix only, so the result equals
  scoring each suffix in its own row, without copying the prefix cache per QA.
  """
  model = nnx.merge(graphdef, state)
  lm = model.language_model
  g, w = packed.shape
  p = cache.k.shape[KVCache.SLOT_AXIS]
  pad = lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, 0), (0, w), (0, 0)))
  to_prefix = jnp.broadcast_to((segments > 0)[:, :, None], (g, w, p))
  mask3 = jnp.concatenate([to_prefix, _segment_mask(segments)], axis=-1)
  hidden, _ = lm.decode_hidden(lm.embed(packed), positions, mask3,
                               KVCache(pad(cache.k), pad(cache.v)), p)
  return _gather_answer_logprobs(lm, hidden, packed, answer_pos, full)


@functools.partial(jax.jit, static_argnames=("rows", "mode"))
def _combine(logp_v, logp_d, full_v, full_d, row_of, rows: int, mode: str):
  """Per-row `(logp_image, logp_text, i2c)` `[rows]` from per-token log-probs `[G, N]` (eq. 1 / full
  KL); `row_of [G, N]` names each token's row (-1: padding)."""
  if mode == "eq1":
    terms = jnp.exp(logp_v) * (logp_v - logp_d)
  else:
    terms = jnp.sum(jnp.exp(full_v) * (full_v - full_d), axis=-1)
  seg = jnp.where(row_of >= 0, row_of, rows).reshape(-1)  # padding goes to a dropped extra row
  total = lambda x: jax.ops.segment_sum(x.reshape(-1), seg, num_segments=rows + 1)[:rows]
  return total(logp_v), total(logp_d), total(terms)


def _pack(seqs: Sequence[Sequence[int] | None], starts: Sequence[int], width: int
          ) -> tuple[list[int], list[int], list[int], list[int], np.ndarray]:
  """One packed row of `seqs` (None = absent): tokens, segments (1 + index), positions (from 0 in
  each), and the indices of each sequence's answer (from its `starts` on) in order, padded to
  `width` with index 0; plus which sequence each of those belongs to (-1: padding)."""
  tokens, segments, positions, answer = [], [], [], []
  owner = np.full(width, -1, np.int32)
  for k, (seq, start) in enumerate(zip(seqs, starts)):
    if seq is None:
      continue
    owner[len(answer):len(answer) + len(seq) - start] = k
    answer += range(len(tokens) + start, len(tokens) + len(seq))
    tokens += seq
    segments += [k + 1] * len(seq)
    positions += range(len(seq))
  return tokens, segments, positions, answer + [0] * (width - len(answer)), owner


class Scorer:
  """Scores QA pairs with a (possibly sharded) LLaVA model.

  Args:
    model: `LlavaVLM`.  mesh: where batches are placed (their leading dim is split over data x fsdp).
    image_token_id / pad_id: from the model config / tokenizer.
  """

  def __init__(self, model: nnx.Module, mesh: jax.sharding.Mesh, cfg: ScoringConfig,
               image_token_id: int, pad_id: int):
    self.graphdef, self.state = nnx.split(model)
    self.mesh, self.cfg = mesh, cfg
    self.image_token_id, self.pad_id = image_token_id, pad_id
    self.batch_multiple = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))

  def _put(self, *arrays):
    return sharding.shard_batch(arrays, self.mesh)

  def score(self, items: Sequence[ScoreInput], pixels: dict[Any, np.ndarray]
            ) -> list[dict[str, float]]:
    """Score `items`; `pixels[image_key]` is the image's `[C, H, W]` pixel array.

    Returns one dict per item, in order: `i2c`, `logp_image`, `logp_text`, `n_tokens`.
    """
    for it in items:
      if not it.answer:
        raise ValueError("an item has an empty answer: nothing to score")
    results: list[dict[str, float] | None] = [None] * len(items)
    for batch in self._batches(items):
      with jax.set_mesh(self.mesh):  # activations stay row-sharded (`layers.batch_sharded`)
        lp_v, lp_d, i2c = self._score_batch(items, batch, pixels)
      for row, idx in enumerate(batch.rows):
        if idx is None:
          continue
        n = len(items[idx].answer)
        value = float(i2c[row]) / (n if self.cfg.length_norm else 1)
        results[idx] = dict(i2c=value, logp_image=float(lp_v[row]), logp_text=float(lp_d[row]),
                            n_tokens=n)
    return results  # type: ignore[return-value]

  def _prefix_len(self, item: ScoreInput) -> int:
    ids = np.asarray(item.prompt_image)
    where = np.flatnonzero(ids == self.image_token_id)
    if not len(where):
      raise ValueError("prompt_image holds no image token")
    return int(where[-1]) + 1

  def _batches(self, items: Sequence[ScoreInput]) -> Iterator["_Batch"]:
    """Groups of G images x Q rows (None rows are padding), images grouped by prefix tokens."""
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
      if self.cfg.prefix_sharing:
        key = (it.image_key, tuple(it.prompt_image[:self._prefix_len(it)]))
      else:
        key = (it.image_key, i)
      groups.setdefault(key, []).append(i)
    # Q = the most QA any image has (one static shape per run; no power-of-two rounding, which would
    # turn 5 QA per image into 8 rows). Without prefix sharing every row is its own group (q = 1).
    q = max(len(v) for v in groups.values())
    g = round_up(max(1, self.cfg.batch_rows // q), self.batch_multiple)
    # Split groups larger than q, then order by prefix length so a batch shares one length.
    chunks = [(key, idx[s:s + q]) for key, idx in groups.items() for s in range(0, len(idx), q)]
    chunks.sort(key=lambda c: len(c[0][1]) if self.cfg.prefix_sharing else 0)
    while chunks:
      head = chunks[:g]
      plen = len(head[0][0][1]) if self.cfg.prefix_sharing else 0
      head = [c for c in head if not self.cfg.prefix_sharing or len(c[0][1]) == plen]
      chunks = chunks[len(head):]
      images = [c[0][0] for c in head] + [None] * (g - len(head))
      rows = [c[1][j] if j < len(c[1]) else None for c in head for j in range(q)]
      rows += [None] * (g * q - len(rows))
      yield _Batch(images=images, rows=rows, q=q, prefix_len=plen)

  def _score_batch(self, items, batch: "_Batch", pixels):
    """`(logp_image, logp_text, i2c)` of every row of `batch`.

    Both passes lay the answer tokens out alike: group g's (one image's) answers, row after row, in
    `[G, N]` (`N` = the largest group's answer tokens rounded up to `answer_bucket`), so the LM head
    runs on answer tokens only and the two passes' log-probs line up token for token.
    """
    cfg, full, q = self.cfg, self.cfg.mode == "full_kl", batch.q
    rows = [items[i] if i is not None else None for i in batch.rows]
    groups = [rows[j * q:(j + 1) * q] for j in range(len(batch.images))]
    n = round_up(max(sum(len(r.answer) for r in grp if r) for grp in groups), cfg.answer_bucket)
    first_image = next(k for k in batch.images if k is not None)
    pix = np.stack([pixels[k if k is not None else first_image] for k in batch.images])

    def packed(seqs_of, starts_of, bucket):
      """Each group's sequences packed into one row: `[G, W]` tokens, segments, positions, answer
      indices `[G, N]` and the batch row of each answer index (-1: padding)."""
      out = [_pack([seqs_of(r) if r else None for r in grp], [starts_of(r) if r else 0 for r in grp],
                   n) for grp in groups]
      width = round_up(max(len(o[0]) for o in out), bucket)
      tokens, _ = right_pad([o[0] for o in out], width, self.pad_id)
      segments, _ = right_pad([o[1] for o in out], width, 0)
      positions, _ = right_pad([o[2] for o in out], width, 0)
      answer = np.asarray([o[3] for o in out], np.int32)
      row_of = np.stack([np.where(o[4] >= 0, j * q + o[4], -1) for j, o in enumerate(out)])
      return tokens, segments, positions, answer, row_of

    if cfg.prefix_sharing:
      p = batch.prefix_len
      filler = next(r for r in rows if r)
      prefixes = [list((grp[0] or filler).prompt_image[:p]) for grp in groups]
      tokens, segments, positions, answer, row_of = packed(
          lambda r: list(r.prompt_image[p:]) + list(r.answer), lambda r: len(r.prompt_image) - p,
          cfg.suffix_bucket)
      positions = np.where(segments > 0, positions + p, p)
      prefix, pix_d = self._put(np.asarray(prefixes, np.int32), pix)
      cache = _prefix_cache(self.graphdef, self.state, prefix, pix_d)
      logp_v, full_v = _suffix_pass(self.graphdef, self.state, cache,
                                    *self._put(tokens, segments, positions, answer), full)
    else:  # q = 1: one row per group, each padded
      seqs = [list(r.prompt_image) + list(r.answer) if r else [self.pad_id] for r in rows]
      width = round_up(max(len(s) for s in seqs), cfg.text_bucket)
      tokens, mask = right_pad(seqs, width, self.pad_id)
      answer = np.zeros((len(rows), n), np.int32)
      row_of = np.full((len(rows), n), -1, np.int32)
      for i, r in enumerate(rows):
        if r:
          answer[i, :len(r.answer)] = len(r.prompt_image) + np.arange(len(r.answer))
          row_of[i, :len(r.answer)] = i
      logp_v, full_v = _full_pass(self.graphdef, self.state,
                                  *self._put(tokens, mask, pix, answer), full)

    tokens, segments, positions, answer_d, row_of_d = packed(
        lambda r: list(r.prompt_text) + list(r.answer), lambda r: len(r.prompt_text), cfg.text_bucket)
    assert np.array_equal(row_of_d, row_of)
    logp_d, full_d = _packed_pass(self.graphdef, self.state,
                                  *self._put(tokens, segments, positions, answer_d), full)
    (row_of,) = self._put(row_of)
    out = _combine(logp_v, logp_d, full_v, full_d, row_of, len(rows), cfg.mode)
    return [np.asarray(x) for x in out]


@dataclasses.dataclass
class _Batch:
  images: list[Any]  # G image keys (None = padding)
  rows: list[int | None]  # G * Q item indices (None = padding), image-major
  q: int
  prefix_len: int
