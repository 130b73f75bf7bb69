"""LLaVA vision-language model: vision tower + connector + decoder (big_vision PaliGemma's shape).

`embed_image_and_text` scatters the projected patch features into the positions of the expanded
`<image>` placeholder tokens, in order, exactly like transformers' `masked_scatter`; everything after
that is the decoder's business, so prefill, decode and teacher-forced scoring share one code path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from c3l_jax.models import layers as L
from c3l_jax.models.clip import CLIPVisionTower
from c3l_jax.models.configs import LlavaConfig
from c3l_jax.models.llama import KVCache, LlamaForCausalLM, positions_and_mask


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


class LlavaVLM(nnx.Module):
  """`LlavaForConditionalGeneration` in Flax NNX."""

  def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = L.dtype_of(cfg.dtype), L.dtype_of(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Logical axis names are metadata only; `c3l_jax.sharding` places the weights explicitly.
    with nnx.use_eager_sharding(False):
      self.vision_tower = CLIPVisionTower(cfg.vision, scan=cfg.scan_layers, remat=cfg.remat, **kw)
      self.multi_modal_projector = MultiModalProjector(cfg, **kw)
      self.language_model = LlamaForCausalLM(cfg.text, scan=cfg.scan_layers, remat=cfg.remat, **kw)

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """`[N_img, C, H, W]` -> projected features `[N_img, image_seq_length, D]`."""
    states = self.vision_tower(pixel_values, self.cfg.feature_layers)
    if self.cfg.vision_feature_select_strategy == "default":
      states = [s[:, 1:] for s in states]
    return self.multi_modal_projector(jnp.concatenate(states, axis=-1))

  def embed_image_and_text(self, tokens: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
    """Token embeddings `[B, T, D]` with image features written over the `<image>` tokens.

    The k-th `<image>` token of the batch (row-major) receives the k-th row of the flattened image
    features, so the batch must hold exactly `N_img * image_seq_length` image tokens (checked on the
    host by the prompt builders; a mismatch here cannot be detected under jit).
    """
    x = self.language_model.embed(tokens)
    if pixel_values is None:
      return x
    feats = self.encode_images(pixel_values).astype(x.dtype)
    feats = feats.reshape(-1, feats.shape[-1])
    is_image = (tokens == self.cfg.image_token_id).reshape(-1)
    source = jnp.clip(jnp.cumsum(is_image) - 1, 0, feats.shape[0] - 1)
    flat = jnp.where(is_image[:, None], feats[source], x.reshape(-1, x.shape[-1]))
    return flat.reshape(x.shape)

  def __call__(self, tokens: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """Full forward: tokens `[B, T]` (image tokens expanded), pixels `[N_img, C, H, W]`,
    padding mask `[B, T]` -> logits `[B, T, V]` (float32)."""
    x = self.embed_image_and_text(tokens, pixel_values)
    positions, mask = positions_and_mask(attention_mask, tokens.shape)
    hidden, _ = self.language_model.decode_hidden(x, positions, mask)
    return self.language_model.logits(hidden)


__all__ = ["KVCache", "LlavaVLM", "MultiModalProjector"]
