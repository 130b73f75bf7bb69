r"""Content relevance between image and generated text: S(I2C), eq. 1 of the C3L paper.

    S(I2C) = D_KL(S(A|V) || S(A)) = \sum_{t=1}^{n} p_t^v \log(p_t^v / p_t^d)          (1)

p_t^v is the teacher-forced probability of the t-th answer token given image + question, p_t^d the same
with no image (the same conversation without its image part). Per record we report `i2c`, `logp_image`
(\sum log p^v), `logp_text` (\sum log p^d) and `n_tokens`. Options: `mode="full_kl"` replaces eq. 1's
per-token term by the full-vocabulary KL(P_t^v || P_t^d); `length_norm` divides by `n_tokens`.

Prefix sharing: the QA pairs of one image share the system prompt and the image tokens (576 of ~650
tokens for LLaVA-1.5). Their KV cache is computed once per image; the image's QA suffixes are packed
into one row (segment-masked: each attends to the prefix and causally to itself) and scored against it;
each layer reads the prefix's keys in place, so the prefix cache is never copied. The text-only pass is
short and batched separately. Both equal the naive two full forwards to float tolerance (tested). An
item may hold several answers of one sequence (`ScoreInput.parts`: a multi-turn conversation
teacher-forced once), each summed apart. Only
the answer tokens go through the LM head (each data shard's, flattened: `_answer_index`), and eq. 1 takes
each one's logit minus the logsumexp, never writing a log-softmax over the vocabulary.
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
from c3l_jax.data.batching import bucket, left_pad, right_pad, round_up
from c3l_jax.models.llama import KVCache, positions_and_mask, segments


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
  mode: str = "eq1"  # eq1 | full_kl
  length_norm: bool = False
  prefix_sharing: bool = True
  batch_rows: int = 8  # QA rows per device batch
  # Static shapes (`batching.bucket`: at most 8 lengths per octave, each a multiple of these): packed
  # suffix width, text-pass width, answer tokens per data shard.
  suffix_bucket: int = 8
  answer_bucket: int = 16
  text_bucket: int = 8

  def __post_init__(self):
    if self.mode not in ("eq1", "full_kl"):
      raise ValueError(f"scoring.mode must be eq1 or full_kl, got {self.mode!r}")


@dataclasses.dataclass
class ScoreInput:
  """One QA to score: token ids of both prompts, the answer, and which image it belongs to.

  `parts`: several answers in one sequence, `(start, length)` spans of `answer` each scored apart (a
  multi-turn conversation teacher-forced once: `answer` is everything after turn 0's prompt, the
  spans are the turns' answers); empty = `answer` is one answer, scored whole.
  """

  image_key: Any
  prompt_image: Sequence[int]
  prompt_text: Sequence[int]
  answer: Sequence[int]
  parts: Sequence[tuple[int, int]] = ()

  def spans(self) -> Sequence[tuple[int, int]]:
    return self.parts or ((0, len(self.answer)),)


def _gather_answer_logprobs(lm, hidden: jax.Array, tokens: jax.Array, answer_pos: jax.Array,
                            full: bool) -> tuple[jax.Array, jax.Array | None]:
  """Log-probs of the answer tokens `answer_pos [S, M]`, flat indices into each data shard's rows of
  `hidden [B, T, D]` / `tokens [B, T]` (see `_answer_index`); the LM head runs on those M rows only.

  eq. 1 needs only the answer token's log-prob: its logit minus the logsumexp, without writing the
  `[S, M, V]` log-softmax; `full` (the full-vocabulary KL) returns that too."""
  s = answer_pos.shape[0]
  b, t, d = hidden.shape
  hidden = hidden.reshape(s, b // s * t, d)
  pred = jnp.take_along_axis(hidden, jnp.maximum(answer_pos - 1, 0)[..., None], axis=1)
  logits = lm.logits(pred)  # [S, M, V]
  target = jnp.take_along_axis(tokens.reshape(s, b // s * t), answer_pos, axis=1)
  target_logit = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
  lse = jax.nn.logsumexp(logits, axis=-1)
  return target_logit - lse, (logits - lse[..., None] if full else None)


@functools.partial(jax.jit, static_argnames=("graphdef", "full"))
def _full_pass(graphdef, state, tokens, mask, pixel_values, answer_pos, full: bool, rope=None):
  """Naive teacher forcing over whole sequences `[B, T]` (right-padded); `rope` `[B, T, 3]`: the
  multimodal RoPE positions of a variable-resolution family (else positions count the tokens)."""
  model = nnx.merge(graphdef, state)
  lm = model.language_model
  x = model.embed_image_and_text(tokens, pixel_values)
  positions, mask3 = positions_and_mask(mask, tokens.shape)
  positions = positions if rope is None else rope
  hidden, _ = lm.decode_hidden(x, positions, mask3, segment_ids=segments(mask, tokens.shape))
  return _gather_answer_logprobs(lm, hidden, tokens, answer_pos, full)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prefix_cache(graphdef, state, prefix, prefix_mask, pixel_values, rope=None) -> KVCache:
  """KV cache `[L, G, K, P, Dh]` of the shared prefixes `[G, P]` (image tokens included), left-padded
  (`prefix_mask`) when their images differ in token count; `rope` `[G, P, 3]` as in `_full_pass`."""
  model = nnx.merge(graphdef, state)
  lm = model.language_model
  x = model.embed_image_and_text(prefix, pixel_values)
  positions, mask3 = positions_and_mask(prefix_mask, prefix.shape)
  positions = positions if rope is None else rope
  _, cache = lm.decode_hidden(x, positions, mask3, segment_ids=segments(prefix_mask, prefix.shape))
  return cache


@functools.partial(jax.jit, static_argnames=("graphdef", "full"))
def _suffix_pass(graphdef, state, cache: KVCache, prefix_mask, packed, segments, positions, answer_pos,
                 full: bool):
  """Teacher forcing of each image's QA suffixes, packed into one row, against the image's prefix.

  Args:
    cache: prefix KV cache `[L, G, K, P, Dh]`, read-only; `prefix_mask [G, P]` its real slots.
    packed: `[G, W]` the Q suffixes of image g concatenated (then padding).
    segments: `[G, W]` which suffix (1..Q) a token belongs to; 0 = padding.
    positions: `[G, W]` RoPE positions, each suffix starting where its prefix's positions end.
    answer_pos: `[S, M]` every suffix's answer tokens (`_answer_index` over the rows of `packed`).
  A token attends to the whole prefix and causally to its own suffix only, so the result equals
  scoring each suffix in its own row, without copying the prefix cache per QA (or at all: each layer
  reads its prefix keys and the suffix's own, `LlamaForCausalLM.decode_hidden(prefix=...)`).
  """
  model = nnx.merge(graphdef, state)
  lm = model.language_model
  g, w = packed.shape
  same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
  own = same & (jnp.arange(w)[None, :] <= jnp.arange(w)[:, None])[None]
  to_prefix = (segments > 0)[:, :, None] & prefix_mask.astype(jnp.bool_)[:, None, :]
  mask3 = jnp.concatenate([to_prefix, own], axis=-1)
  hidden, _ = lm.decode_hidden(lm.embed(packed), positions, mask3, prefix=cache)
  return _gather_answer_logprobs(lm, hidden, packed, answer_pos, full)


@functools.partial(jax.jit, static_argnames=("mode", "rows"))
def _combine(logp_v, logp_d, full_v, full_d, item, mode: str, rows: int):
  """Per-row `(logp_image, logp_text, i2c)` `[rows]` from per-token log-probs `[S, M]` (eq. 1 / full
  KL); `item [S, M]` is each token's row (`rows` = padding)."""
  if mode == "eq1":
    terms = jnp.exp(logp_v) * (logp_v - logp_d)
  else:
    terms = jnp.sum(jnp.exp(full_v) * (full_v - full_d), axis=-1)
  total = lambda x: jax.ops.segment_sum(x.reshape(-1), item.reshape(-1), num_segments=rows + 1)[:rows]
  return total(logp_v), total(logp_d), total(terms)


def _answer_index(spans: Sequence[tuple[int, int, int]], n_rows: int, width: int, shards: int,
                  minimum: int) -> tuple[np.ndarray, np.ndarray]:
  """Flat positions of every answer token, shard by shard: `(pos [S, M], item [S, M])`.

  `spans[i] = (row, start, length)`: item i's answer occupies `start:start + length` of row `row` of a
  `[n_rows, width]` batch whose rows split into `shards` contiguous blocks (the data shards). Shard s
  lists its items' tokens in item order as indices into its own rows flattened (`row_in_shard * width
  + column`), padded to one bucketed length M (padding: index of the shard's first answer token,
  item `len(spans)`), so each shard's gather stays on its device and both passes list the same
  tokens in the same order whatever their row layout.
  """
  per_shard = n_rows // shards
  pos = [[] for _ in range(shards)]
  item = [[] for _ in range(shards)]
  for i, (row, start, n) in enumerate(spans):
    s, local = divmod(row, per_shard)
    pos[s].extend(local * width + start + np.arange(n))
    item[s].extend([i] * n)
  m = bucket(max(1, max(map(len, pos))), minimum)
  out_pos = np.zeros((shards, m), np.int32)
  out_item = np.full((shards, m), len(spans), np.int32)
  for s in range(shards):
    out_pos[s] = pos[s][0] if pos[s] else 1
    out_pos[s, :len(pos[s])] = pos[s]
    out_item[s, :len(item[s])] = item[s]
  return out_pos, out_item


class Scorer:
  """Scores QA pairs with a (possibly sharded) LLaVA model.

  Args:
    model: `LlavaVLM`.  mesh: where batches are placed (their leading dim is split over data x fsdp).
    image_token_id / pad_id: from the model config / tokenizer.
  """

  def __init__(self, model: nnx.Module, mesh: jax.sharding.Mesh, cfg: ScoringConfig,
               image_token_id: int, pad_id: int, images: Any = None):
    from c3l_jax.models.vlm import image_inputs

    # How pictures enter the model (`models.vlm.image_inputs`): stacked, or packed with M-RoPE positions.
    self.images = images if images is not None else image_inputs(model.cfg)
    self.graphdef, self.state = nnx.split(model)
    self.mesh, self.cfg = mesh, cfg
    self.image_token_id, self.pad_id = image_token_id, pad_id
    self.batch_multiple = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))

  def _put(self, *arrays):
    return sharding.shard_batch(arrays, self.mesh)

  def score(self, items: Sequence[ScoreInput], pixels: dict[Any, np.ndarray]
            ) -> list[dict[str, float]]:
    """Score `items`; `pixels[image_key]` is the image's picture (`[C, H, W]`, or a `QwenPicture`).

    Returns one dict per item, in order: `i2c`, `logp_image`, `logp_text`, `n_tokens`; for an item
    with `parts`, each is a list, one value per part.
    """
    for it in items:
      if not it.answer or any(n <= 0 or s < 0 or s + n > len(it.answer) for s, n in it.spans()):
        raise ValueError("an item has an empty answer (or a part outside it): nothing to score")
    results: list[dict[str, Any] | None] = [None] * len(items)
    for batch in self._batches(items):
      with jax.set_mesh(self.mesh):  # activations stay row-sharded (`layers.batch_sharded`)
        lp_v, lp_d, i2c = self._score_batch(items, batch, pixels)
      span = 0  # the outputs list each row's parts in order (one slot for a padding row)
      for idx in batch.rows:
        if idx is None:
          span += 1
          continue
        out = []
        for _, n in items[idx].spans():
          out.append(dict(i2c=float(i2c[span]) / (n if self.cfg.length_norm else 1),
                          logp_image=float(lp_v[span]), logp_text=float(lp_d[span]), n_tokens=n))
          span += 1
        results[idx] = out[0] if not items[idx].parts else {k: [o[k] for o in out] for k in out[0]}
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
    # Split groups larger than q, then order by prefix length so a batch shares one length (pictures
    # of one size). A variable-resolution family's prefixes differ with their pictures: a batch takes
    # neighbours in that order, left-padded to one bucketed length.
    chunks = [(key, idx[s:s + q]) for key, idx in groups.items() for s in range(0, len(idx), q)]
    chunks.sort(key=lambda c: len(c[0][1]) if self.cfg.prefix_sharing else 0)
    while chunks:
      head = chunks[:g]
      plen = max(len(c[0][1]) for c in head) if self.cfg.prefix_sharing else 0
      if self.cfg.prefix_sharing and self.images.variable:
        plen = bucket(plen, self.cfg.suffix_bucket)
      else:
        head = [c for c in head if not self.cfg.prefix_sharing or len(c[0][1]) == len(head[0][0][1])]
      chunks = chunks[len(head):]
      images = [c[0][0] for c in head] + [None] * (g - len(head))
      rows = [c[1][j] if j < len(c[1]) else None for c in head for j in range(q)]
      rows += [None] * (g * q - len(rows))
      yield _Batch(images=images, rows=rows, q=q, prefix_len=plen)

  def _full_rows(self, prompts: Sequence[Sequence[int]], rows: Sequence[ScoreInput],
                 real: Sequence[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(tokens, mask, answer_pos, item)` of one right-padded row per QA, prompt then answer (the
    text-only pass; the with-image pass without prefix sharing); `real[i] = False` marks a padding
    row. Items are the rows' answer parts in order (`_spans`)."""
    seqs = [list(pr) + list(r.answer) for pr, r in zip(prompts, rows)]
    width = bucket(max(map(len, seqs)), self.cfg.text_bucket)
    tokens, mask = right_pad(seqs, width, self.pad_id)
    spans = self._spans([(i, len(pr)) for i, pr in enumerate(prompts)], rows, real)
    ans, item = _answer_index(spans, len(rows), width, self.batch_multiple, self.cfg.answer_bucket)
    return tokens, mask, ans, item

  @staticmethod
  def _spans(starts: Sequence[tuple[int, int]], rows: Sequence[ScoreInput], real: Sequence[bool]
             ) -> list[tuple[int, int, int]]:
    """`(row, start, length)` of every answer part, row by row (`starts[i]`: the row and column where
    row i's answer begins); a padding row gets one empty span, so both passes list the same items."""
    spans = []
    for (row, start), r, ok in zip(starts, rows, real):
      spans += [(row, start + s, n) for s, n in r.spans()] if ok else [(row, start, 0)]
    return spans

  def _score_batch(self, items, batch: "_Batch", pixels):
    cfg, full = self.cfg, self.cfg.mode == "full_kl"
    real = [items[i] for i in batch.rows if i is not None]
    filler = real[0]
    rows = [items[i] if i is not None else filler for i in batch.rows]
    real = [i is not None for i in batch.rows]
    first_image = next(k for k in batch.images if k is not None)
    pictures = [pixels[k if k is not None else first_image] for k in batch.images]
    pix = self.images.batch(pictures)

    if cfg.prefix_sharing:
      p, g = batch.prefix_len, len(batch.images)
      own = [self._prefix_len(rows[j * batch.q]) for j in range(g)]  # each image's own prefix length
      prefixes = [list(rows[j * batch.q].prompt_image[:own[j]]) for j in range(g)]
      prefix_tokens, prefix_mask = left_pad(prefixes, p, self.pad_id)
      rope = self.images.rope_positions(prefix_tokens, prefix_mask, pictures)
      # Where each image's suffixes start: after its prefix's last position (its token count, or one
      # past the largest M-RoPE position).
      pos0 = [own[j] if rope is None else int(rope[j].max()) + 1 for j in range(g)]
      packed_rows, seg_rows, pos_rows, starts = [], [], [], []
      for j in range(g):
        toks, segs, poss = [], [], []
        for k in range(batch.q):
          row = j * batch.q + k
          r = rows[row]
          if batch.rows[row] is None:
            starts.append((j, 0))  # a padding row: no answer tokens
            continue
          suffix = list(r.prompt_image[own[j]:]) + list(r.answer)
          starts.append((j, len(toks) + len(r.prompt_image) - own[j]))
          toks += suffix
          segs += [k + 1] * len(suffix)
          poss += list(range(pos0[j], pos0[j] + len(suffix)))
        packed_rows.append(toks)
        seg_rows.append(segs)
        pos_rows.append(poss)
      width = bucket(max(map(len, packed_rows)), cfg.suffix_bucket)
      packed, _ = right_pad(packed_rows, width, self.pad_id)
      segments, _ = right_pad(seg_rows, width, 0)
      positions, _ = right_pad(pos_rows, width, p)
      spans = self._spans(starts, rows, real)
      ans, item = _answer_index(spans, g, width, self.batch_multiple, cfg.answer_bucket)
      prefix, prefix_mask_d = self._put(prefix_tokens, prefix_mask)
      pix_d = pix if self.images.variable else self._put(pix)[0]  # packed patches stay whole
      rope_d = None if rope is None else self._put(rope)[0]
      cache = _prefix_cache(self.graphdef, self.state, prefix, prefix_mask_d, pix_d, rope_d)
      logp_v, full_v = _suffix_pass(self.graphdef, self.state, cache, prefix_mask_d,
                                    *self._put(packed, segments, positions, ans), full)
    else:
      tokens, mask, ans, item = self._full_rows([r.prompt_image for r in rows], rows, real)
      # One picture per row: a row repeats its image's picture (padding rows: the first's).
      row_pictures = [pixels[r.image_key] for r in rows]
      if self.images.variable:
        rope = self.images.rope_positions(tokens, mask, row_pictures)
        logp_v, full_v = _full_pass(self.graphdef, self.state, *self._put(tokens, mask),
                                    self.images.batch(row_pictures), *self._put(ans), full,
                                    self._put(rope)[0])
      else:
        logp_v, full_v = _full_pass(self.graphdef, self.state, *self._put(tokens, mask, pix, ans), full)

    tokens, mask, ans_t, item_t = self._full_rows([r.prompt_text for r in rows], rows, real)
    assert (item_t == item).all(), "both passes must list the same answer tokens in the same order"
    logp_d, full_d = _full_pass(self.graphdef, self.state, *self._put(tokens, mask), None,
                                *self._put(ans_t), full)
    # Items: every row's answer parts (one for a padding row); a bucketed count keeps `_combine`'s
    # shapes few (its padding item, the count itself, lands in a slot nobody reads).
    n_items = sum(len(r.spans()) if ok else 1 for r, ok in zip(rows, real))
    out = _combine(logp_v, logp_d, full_v, full_d, *self._put(item), cfg.mode,
                   bucket(n_items + 1, 8))
    return [np.asarray(x) for x in out]


@dataclasses.dataclass
class _Batch:
  images: list[Any]  # G image keys (None = padding)
  rows: list[int | None]  # G * Q item indices (None = padding), image-major
  q: int
  prefix_len: int
