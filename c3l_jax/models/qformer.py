"""BLIP-2 Q-Former (transformers `Blip2QFormerModel` semantics, the query path MiniGPT-4 uses).

`num_query_tokens` learned queries (`query_tokens`, BLIP-2's / MiniGPT-4's top-level parameter, kept here)
-> `layernorm` -> `num_hidden_layers` post-LN BERT layers. Each layer: self-attention over the queries,
`LayerNorm(dense(attn) + x)`; in every `cross_attention_frequency`-th layer (i % frequency == 0, as
`Blip2QFormerLayer` and LAVIS' `cross_attention_freq=2`) cross-attention to the image features, same
residual form; then the query feed-forward `intermediate_query` / `output_query`. There is no text input,
so the text feed-forward (`intermediate` / `output`, absent from transformers' Q-Former unless
`use_qformer_text_input`) does not exist, and no attention mask is needed (every image feature is valid).

Layers are stacked on a `layers` axis (`layers`: self-attention + feed-forward of every layer,
`crossattention`: the cross-attention of the layers that have one) and applied in an unrolled Python loop:
the Q-Former has 12 small layers over 32 queries, and cross-attention in every other layer does not fit
one scan body.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from c3l_jax.models import layers as L
from c3l_jax.models.configs import QFormerConfig


class QFormerAttention(nnx.Module):
  """`Blip2QFormerAttention`: MHA (biased query/key/value) -> `LayerNorm(dense(out) + x)`.

  `kv_features` is the width keys/values are projected from: `hidden_size` for self-attention,
  `encoder_hidden_size` (the vision width) for cross-attention.
  """

  def __init__(self, cfg: QFormerConfig, kv_features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = L.dense(d, d, ("vision_embed", "vision_heads"), bias=True, **kw)
    self.key = L.dense(kv_features, d, ("vision_embed", "vision_heads"), bias=True, **kw)
    self.value = L.dense(kv_features, d, ("vision_embed", "vision_heads"), bias=True, **kw)
    self.dense = L.dense(d, d, ("vision_heads", "vision_embed"), bias=True, **kw)
    self.layer_norm = L.layer_norm(d, "vision_embed", eps=cfg.layer_norm_eps, **kw)
    self.num_heads = cfg.num_attention_heads

  def __call__(self, x: jax.Array, kv_input: jax.Array | None = None) -> jax.Array:
    """`x [B, T, D]`, keys/values from `kv_input [B, S, E]` (None: from `x`) -> `[B, T, D]`."""
    src = x if kv_input is None else kv_input
    b, t, d = x.shape
    s = src.shape[1]
    h = self.num_heads
    q = self.query(x).reshape(b, t, h, d // h)
    k = self.key(src).reshape(b, s, h, d // h).transpose(0, 2, 1, 3)
    v = self.value(src).reshape(b, s, h, d // h).transpose(0, 2, 1, 3)
    attn = L.attention(q, k, v, None).reshape(b, t, d)
    return self.layer_norm(self.dense(attn) + x)


class QFormerLayer(nnx.Module):
  """Self-attention and the query feed-forward of one `Blip2QFormerLayer` (cross-attention apart)."""

  def __init__(self, cfg: QFormerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, m = cfg.hidden_size, cfg.intermediate_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention = QFormerAttention(cfg, d, **kw)
    self.intermediate = L.dense(d, m, ("vision_embed", "vision_mlp"), bias=True, **kw)  # intermediate_query
    self.output = L.dense(m, d, ("vision_mlp", "vision_embed"), bias=True, **kw)  # output_query
    self.output_layer_norm = L.layer_norm(d, "vision_embed", eps=cfg.layer_norm_eps, **kw)
    self.act = cfg.hidden_act

  def feed_forward(self, x: jax.Array) -> jax.Array:
    """`Blip2QFormerLayer.feed_forward_chunk_query`: `LayerNorm(output(act(intermediate(x))) + x)`."""
    return self.output_layer_norm(self.output(L.activation(self.act)(self.intermediate(x))) + x)


class QFormer(nnx.Module):
  """Image features `[B, S, E]` -> query outputs `[B, num_query_tokens, D]` (`last_hidden_state`)."""

  def __init__(self, cfg: QFormerConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.query_tokens = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_query_tokens, d), param_dtype),
        out_sharding=(None, "vision_embed"))
    self.layernorm = L.layer_norm(d, "vision_embed", eps=cfg.layer_norm_eps, rngs=rngs, **kw)
    self.layers = L.stacked(lambda r: QFormerLayer(cfg, rngs=r, **kw), cfg.num_hidden_layers, rngs)
    self.crossattention = L.stacked(
        lambda r: QFormerAttention(cfg, cfg.encoder_hidden_size, rngs=r, **kw),
        len(cfg.cross_attention_layers), rngs)
    self.dtype = dtype

  def __call__(self, encoder_hidden_states: jax.Array, query_embeds: jax.Array | None = None
               ) -> jax.Array:
    """`Blip2QFormerModel(query_embeds, encoder_hidden_states=...).last_hidden_state`.

    Args:
      encoder_hidden_states: image features `[B, S, E]` (MiniGPT-4: `ln_vision` output, CLS included).
      query_embeds: `[B, Q, D]`; None uses the learned `query_tokens` (what BLIP-2 / MiniGPT-4 do).
    Returns:
      `[B, Q, D]`.
    """
    b = encoder_hidden_states.shape[0]
    if query_embeds is None:
      query_embeds = jnp.broadcast_to(self.query_tokens[...], (b, *self.query_tokens.shape))
    x = self.layernorm(query_embeds.astype(self.dtype))
    enc = encoder_hidden_states.astype(self.dtype)
    layer_def, layer_state = nnx.split(self.layers)
    cross_def, cross_state = nnx.split(self.crossattention)
    frequency = self.cfg.cross_attention_frequency
    for i in range(self.cfg.num_hidden_layers):
      layer = nnx.merge(layer_def, jax.tree.map(lambda a, i=i: a[i], layer_state))
      x = layer.attention(x)
      if i % frequency == 0:
        cross = nnx.merge(cross_def, jax.tree.map(lambda a, j=i // frequency: a[j], cross_state))
        x = cross(x, enc)
      x = layer.feed_forward(x)
    return x
