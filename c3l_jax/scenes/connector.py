"""The word connector: image tokens that hold the embeddings of their cell's words.

The grounded recipe's frozen random connector hands the decoder everything the supervised tower sees
(linear probes: 95-100 % per cell), but a from-scratch decoder reads only the scene-level features
from it; the cell-local ones (where is the star? is it small?) stayed near the language prior in every
run (docs/testbed-notes.md, sessions 2-3). Here part of the connector's hidden layer is set so that each
cell's token also carries the sum of the decoder's own embeddings of the cell's words: its shape,
colour and size, and its row and column ("star", "red", "small", "top", "left"). Reading the image then
becomes the content match and copy a decoder learns from text (the question's "star" finds the token
holding "star"; the answer copies its "top left").

It stays an ordinary LLaVA-1.5 connector (`linear_2(gelu(linear_1(x)))`):

- `K` of `linear_1`'s hidden units become *word detectors*: a least-squares fit of the tower's patch
  features to `+margin` where the cell has the word and `-margin` elsewhere, so `gelu` leaves about
  `margin` or about 0.
- Those units' rows of `linear_2` are the decoder's embeddings of the words, divided by `margin`. During
  training they are *tied* to the decoder's embedding table (`image_rows`), so the image token for a
  star is always the current `E["star"]` plus the frozen random part; `sync` writes the table's rows
  into `linear_2` before every export.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from c3l_jax.models import layers as L
from c3l_jax.scenes import vision
from c3l_jax.scenes import world as world_lib

ROW_WORDS = ("top", "middle", "bottom")
COL_WORDS = ("left", "middle", "right")


def cell_words() -> list[tuple[int, int, str]]:
  """`(local head, class, word)` of every word unit: the stage-0 local heads' classes with a word
  (shape, colour and size of the cell's object; the cell's row and column)."""
  heads = [h for h, _ in vision.LOCAL_HEADS]
  units = [(heads.index("shape"), i + 1, w) for i, w in enumerate(world_lib.SHAPES)]
  units += [(heads.index("colour"), i + 1, w) for i, w in enumerate(world_lib.COLOURS)]
  units += [(heads.index("size"), i + 1, w) for i, w in enumerate(world_lib.SIZES)]
  units += [(heads.index("row"), i, w) for i, w in enumerate(ROW_WORDS)]
  units += [(heads.index("col"), i, w) for i, w in enumerate(COL_WORDS)]
  return units


@dataclasses.dataclass(frozen=True)
class ImageCache:
  """Every training scene's image tokens, split into the frozen part `base [N, S, D]` (the random
  connector units, bias included) and the word units' activations `acts [N, S, K]`; the token is
  `base + acts @ (E[word_ids] * scale)` for the decoder's embedding table `E` (`acts` None: the plain
  frozen connector, `base` is the token)."""
  base: np.ndarray
  acts: np.ndarray | None = None
  word_ids: np.ndarray | None = None
  scale: float = 1.0

  def __len__(self) -> int:
    return len(self.base)


jax.tree_util.register_dataclass(ImageCache, data_fields=["base", "acts", "word_ids"], meta_fields=["scale"])


def image_rows(cache: Any, embedding: jax.Array, scenes: jax.Array) -> jax.Array:
  """The image tokens `[B, S, D]` of `scenes [B]` from a device copy of an `ImageCache` (the tied word
  rows read from `embedding`, so the decoder's gradient reaches them) or of plain tokens `[N, S, D]`."""
  if not isinstance(cache, ImageCache):  # plain cached tokens [N, S, D]
    return cache[scenes].astype(embedding.dtype)
  rows = cache.base[scenes].astype(embedding.dtype)
  if cache.acts is None:
    return rows
  words = embedding[cache.word_ids] * cache.scale  # [K, D]
  return rows + jnp.einsum("bsk,kd->bsd", cache.acts[scenes].astype(embedding.dtype), words)


def _features(m: Any, px: jax.Array) -> jax.Array:
  """The patch features the connector reads (`encode_images` before the projector)."""
  states = m.vision_tower(px, m.cfg.feature_layers)
  if m.cfg.vision_feature_select_strategy == "default":
    states = [s[:, 1:] for s in states]
  return jnp.concatenate(states, axis=-1)


_patch_features = nnx.jit(_features)


@nnx.jit
def _hidden_units(m: Any, px: jax.Array) -> jax.Array:
  return L.activation(m.cfg.projector_hidden_act)(m.multi_modal_projector.linear_1(_features(m, px)))


def fit_word_units(vlm: Any, world: Sequence[world_lib.Scene], pixels: np.ndarray, tokenizer: Any,
                   margin: float = 3.0, ridge: float = 1e-3, chunk: int = 256) -> dict:
  """Turn the first K hidden units of the connector into word detectors (module docstring) and zero
  their `linear_2` rows (the tied rows are added by `image_rows` / written by `sync`). Fit on `world`'s
  patches. Returns `{"word_ids", "words", "scale", "train_accuracy"}`: the accuracy is the share of
  (patch, unit) pairs whose activation is on the right side of margin / 2."""
  xs = np.concatenate([np.asarray(_patch_features(vlm, jnp.asarray(pixels[s:s + chunk])))
                       for s in range(0, len(pixels), chunk)])
  n, s, d = xs.shape
  units = cell_words()
  labels = np.stack([vision.scene_targets(sc, world_lib.GRID)[0] for sc in world])  # [N, S, heads]
  y = np.stack([np.where(labels[..., h] == c, margin, -margin) for h, c, _ in units], -1).reshape(n * s, -1)
  x = np.concatenate([xs.reshape(n * s, d), np.ones((n * s, 1), xs.dtype)], -1).astype(np.float64)
  w = np.linalg.solve(x.T @ x + ridge * len(x) * np.eye(d + 1), x.T @ y.astype(np.float64))
  k = len(units)
  proj = vlm.multi_modal_projector
  kernel = np.array(proj.linear_1.kernel[...])
  kernel[:, :k] = w[:-1]
  proj.linear_1.kernel[...] = jnp.asarray(kernel, proj.linear_1.kernel[...].dtype)
  if getattr(proj.linear_1, "bias", None) is None:
    raise ValueError("the word connector needs the projector's bias (multimodal_projector_bias)")
  bias = np.array(proj.linear_1.bias[...])
  bias[:k] = w[-1]
  proj.linear_1.bias[...] = jnp.asarray(bias, proj.linear_1.bias[...].dtype)
  out = np.array(proj.linear_2.kernel[...])
  out[:k] = 0.0
  proj.linear_2.kernel[...] = jnp.asarray(out, proj.linear_2.kernel[...].dtype)
  ids = []
  for _, _, word in units:
    tid = tokenizer.convert_tokens_to_ids(word)
    if tid is None or tid == tokenizer.unk_token_id:
      raise ValueError(f"the word connector's word {word!r} is not in the tokenizer's vocabulary")
    ids.append(int(tid))
  act = L.activation(vlm.cfg.projector_hidden_act)
  fitted = np.asarray(act(jnp.asarray(x[:, :-1] @ w[:-1] + w[-1], jnp.float32)))
  accuracy = float(((fitted > margin / 2) == (y > 0)).mean())
  return {"word_ids": np.asarray(ids, np.int32), "words": [u[2] for u in units], "scale": 1.0 / margin,
          "units": k, "train_accuracy": round(accuracy, 5), "margin": margin}


def unit_activations(vlm: Any, pixels: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
  """The first `k` hidden units of the connector, `act(linear_1(patch features))`: `[N, S, k]`."""
  return np.concatenate([np.asarray(_hidden_units(vlm, jnp.asarray(pixels[s:s + chunk])))[..., :k]
                         for s in range(0, len(pixels), chunk)])


def sync(vlm: Any, cache: ImageCache) -> None:
  """Write the tied rows (the decoder's current embeddings of the words, times `scale`) into
  `linear_2`, so the exported connector computes `image_rows`' tokens."""
  if cache.acts is None:
    return
  table = vlm.language_model.embed_tokens.embedding[...]
  k = len(cache.word_ids)
  kernel = vlm.multi_modal_projector.linear_2.kernel
  kernel[...] = kernel[...].at[:k].set((table[jnp.asarray(cache.word_ids)] * cache.scale).astype(kernel.dtype))


__all__ = ["COL_WORDS", "ImageCache", "ROW_WORDS", "cell_words", "fit_word_units", "image_rows", "sync",
           "unit_activations"]
