"""Vision-language models: vision tower + connector + decoder (big_vision PaliGemma's shape).

`VLM` is the composition every family shares: a subclass builds `language_model` (the Llama decoder)
and implements `encode_images` (`[N_img, C, H, W] -> [N_img, image_seq_length, D]`); `VLM` provides
`embed_image_and_text`, which scatters the image features into the positions of the expanded image
placeholder tokens, in order, exactly like transformers' `masked_scatter`, and the full forward. Everything
after the embeddings is the decoder's business, so prefill, decode, teacher-forced scoring and training
share one code path for every family (`sampling`, `scoring` and `train` see only this interface).

Families: `LlavaVLM` (here) and `c3l_jax.models.minigpt4.MiniGPT4VLM`; `build_vlm(cfg)` picks by
`cfg.family`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from c3l_jax.models import layers as L
from c3l_jax.models.clip import CLIPVisionTower
from c3l_jax.models.configs import LlavaConfig
from c3l_jax.models.llama import KVCache, LlamaForCausalLM, positions_and_mask, segments


class VLM(nnx.Module):
  """The shared composition. Subclasses set `cfg` (with `image_token_id`, `image_seq_length`, `text`),
  `language_model` (`LlamaForCausalLM`) and implement `encode_images`."""

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """`[N_img, C, H, W]` -> features in the decoder's width `[N_img, image_seq_length, D]`."""
    raise NotImplementedError

  def embed_image_and_text(self, tokens: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
    """Token embeddings `[B, T, D]` with image features written over the image placeholder tokens.

    The k-th placeholder of the batch (row-major) receives the k-th row of the flattened image
    features, so the batch must hold exactly `N_img * image_seq_length` placeholders (checked on the
    host by the prompt builders; a mismatch here cannot be detected under jit). A placeholder id outside
    the vocabulary (MiniGPT-4's) is looked up as id 0 before being overwritten.
    """
    image_id = self.cfg.image_token_id
    is_image = tokens == image_id
    if image_id >= self.cfg.text.vocab_size:
      x = self.language_model.embed(jnp.where(is_image, 0, tokens))
    else:
      x = self.language_model.embed(tokens)
    if pixel_values is None:
      return x
    feats = self.encode_images(pixel_values).astype(x.dtype)
    feats = feats.reshape(-1, feats.shape[-1])
    is_image = is_image.reshape(-1)
    source = jnp.clip(jnp.cumsum(is_image) - 1, 0, feats.shape[0] - 1)
    flat = jnp.where(is_image[:, None], feats[source], x.reshape(-1, x.shape[-1]))
    return flat.reshape(x.shape)

  def __call__(self, tokens: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """Full forward: tokens `[B, T]` (image placeholders expanded), pixels `[N_img, C, H, W]`,
    padding mask `[B, T]` -> logits `[B, T, V]` (float32)."""
    x = self.embed_image_and_text(tokens, pixel_values)
    positions, mask = positions_and_mask(attention_mask, tokens.shape)
    hidden, _ = self.language_model.decode_hidden(x, positions, mask,
                                                  segment_ids=segments(attention_mask, tokens.shape))
    return self.language_model.logits(hidden)


class MultiModalProjector(nnx.Module):
  """linear_1 -> act (gelu) -> linear_2: vision width (x number of feature layers) -> decoder width."""

  def __init__(self, cfg: LlavaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
    d = cfg.text.hidden_size
    kw = dict(bias=cfg.multimodal_projector_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = L.dense(d_in, d, ("vision_embed", "mlp"), **kw)
    self.linear_2 = L.dense(d, d, ("mlp", "embed"), **kw)
    self.act = cfg.projector_hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(L.activation(self.act)(self.linear_1(x)))


class LlavaVLM(VLM):
  """`LlavaForConditionalGeneration` in Flax NNX."""

  def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = L.dtype_of(cfg.dtype), L.dtype_of(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Logical axis names are metadata only; `c3l_jax.sharding` places the weights explicitly.
    with nnx.use_eager_sharding(False):
      self.vision_tower = CLIPVisionTower(cfg.vision, scan=cfg.scan_layers, remat=cfg.remat, **kw)
      self.multi_modal_projector = MultiModalProjector(cfg, **kw)
      self.language_model = LlamaForCausalLM(cfg.text, scan=cfg.scan_layers, remat=cfg.remat,
                                             attention=cfg.attention, **kw)

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """`[N_img, C, H, W]` -> projected features `[N_img, image_seq_length, D]`."""
    states = self.vision_tower(pixel_values, self.cfg.feature_layers)
    if self.cfg.vision_feature_select_strategy == "default":
      states = [s[:, 1:] for s in states]
    return self.multi_modal_projector(jnp.concatenate(states, axis=-1))


def build_vlm(cfg: Any, rngs: nnx.Rngs) -> VLM:
  """The VLM of `cfg.family`: `LlavaVLM` (llava15) or `MiniGPT4VLM` (minigpt4)."""
  family = getattr(cfg, "family", "llava15")
  if family == "llava15":
    return LlavaVLM(cfg, rngs=rngs)
  if family == "minigpt4":
    from c3l_jax.models.minigpt4 import MiniGPT4VLM  # imports this module

    return MiniGPT4VLM(cfg, rngs=rngs)
  raise ValueError(f"unknown model family {family!r}")


__all__ = ["KVCache", "LlavaVLM", "MultiModalProjector", "VLM", "build_vlm"]
