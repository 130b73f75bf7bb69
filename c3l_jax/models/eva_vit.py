"""EVA ViT-g vision encoder as BLIP-2 and MiniGPT-4 use it (transformers `Blip2VisionModel` semantics).

patch conv (with bias) + CLS + learned positions (no pre-layernorm) -> pre-LN encoder layers
(LayerNorm, fused-qkv MHA, LayerNorm, MLP with exact gelu) -> `post_layernorm`. The output is
`Blip2VisionModel(...).last_hidden_state` `[B, 1 + N, D]`, which is what MiniGPT-4 computes as
`ln_vision(visual_encoder(image))`: transformers' BLIP-2 conversion stores LAVIS' `ln_vision` as the vision
model's `post_layernorm`.

Attention matches `Blip2Attention`: one `qkv` projection `[D, 3D]` whose output is laid out as
`(3, heads, head_dim)`; its bias is the full `[3D]` vector transformers stores (`q_bias`, zeros, `v_bias`
in the original checkpoints; the key part is kept as a parameter so values and counts match exactly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from c3l_jax.models import layers as L
from c3l_jax.models.configs import EVAVisionConfig


class EVAEncoderLayer(nnx.Module):
  """`Blip2EncoderLayer`: x + proj(attn(ln1(x))); x + fc2(act(fc1(ln2(x))))."""

  def __init__(self, cfg: EVAVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, m = cfg.hidden_size, cfg.intermediate_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = L.layer_norm(d, "vision_embed", eps=cfg.layer_norm_eps, **kw)
    self.qkv = L.dense(d, 3 * d, ("vision_embed", "vision_heads"), bias=cfg.qkv_bias, **kw)
    self.projection = L.dense(d, d, ("vision_heads", "vision_embed"), bias=True, **kw)
    self.layer_norm2 = L.layer_norm(d, "vision_embed", eps=cfg.layer_norm_eps, **kw)
    self.fc1 = L.dense(d, m, ("vision_embed", "vision_mlp"), bias=True, **kw)
    self.fc2 = L.dense(m, d, ("vision_mlp", "vision_embed"), bias=True, **kw)
    self.num_heads = cfg.num_attention_heads
    self.act = cfg.hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, N, D] -> [B, N, D]`."""
    b, n, d = x.shape
    h = self.num_heads
    qkv = self.qkv(self.layer_norm1(x)).reshape(b, n, 3, h, d // h)
    q = qkv[:, :, 0]
    k = qkv[:, :, 1].transpose(0, 2, 1, 3)
    v = qkv[:, :, 2].transpose(0, 2, 1, 3)
    x = x + self.projection(L.attention(q, k, v, None).reshape(b, n, d))
    return x + self.fc2(L.activation(self.act)(self.fc1(self.layer_norm2(x))))


class EVAViT(nnx.Module):
  """`Blip2VisionModel`: pixels `[B, C, H, W]` -> `last_hidden_state` `[B, 1 + N, D]` (CLS first)."""

  def __init__(self, cfg: EVAVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               scan: bool = True, remat: bool = False, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
    # The patch conv as a matmul over flattened (C, p, p) patches: kernel [C*p*p, D], with bias.
    self.patch_embedding = L.dense(c * p * p, d, (None, "vision_embed"), bias=True,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.class_embedding = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (d,), param_dtype), out_sharding=("vision_embed",))
    self.position_embedding = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_patches + 1, d), param_dtype),
        out_sharding=(None, "vision_embed"))
    self.layers = L.stacked(
        lambda r: EVAEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
        cfg.num_hidden_layers, rngs)
    # MiniGPT-4's `ln_vision`.
    self.post_layernorm = L.layer_norm(d, "vision_embed", eps=cfg.layer_norm_eps, dtype=dtype,
                                       param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.scan = scan
    self.remat = remat

  def embed(self, pixel_values: jax.Array) -> jax.Array:
    """`[B, C, H, W]` (NCHW) -> `[B, 1 + N, D]`: `Blip2VisionEmbeddings` (no interpolation)."""
    return L.vit_embed(pixel_values, self.cfg.image_size, self.cfg.patch_size, self.patch_embedding,
                       self.class_embedding[...], self.position_embedding[...])

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """`[B, C, H, W]` -> `post_layernorm(encoder(embed(pixels)))` `[B, 1 + N, D]`."""
    # Rows over the batch axes, as CLIP's and the decoder's (`layers.batch_sharded`).
    x = L.batch_sharded(self.embed(pixel_values.astype(self.dtype)))
    x, _ = L.scan_layers(self.layers, lambda layer, h, _: (L.batch_sharded(layer(h)), None), x,
                         scan=self.scan, remat=self.remat)
    return self.post_layernorm(x)
