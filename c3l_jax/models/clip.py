"""CLIP ViT vision tower (transformers `CLIPVisionModel` semantics, as used by LLaVA-1.5).

patch conv (no bias) + CLS + learned positions -> `pre_layrnorm` -> pre-LN encoder layers
(LayerNorm, MHA with biases, LayerNorm, MLP with quick_gelu). `hidden_states[0]` is the pre-layernormed
embedding and `hidden_states[i]` the output of layer i, exactly as transformers numbers them, so
`vision_feature_layer=-2` is the penultimate layer's output (the last layer is never computed).
`post_layernorm` (CLIP's pooled-output norm) is not used by LLaVA; it is kept so that checkpoints
round-trip and parameter counts equal transformers', and serves `pooled()`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from c3l_jax.models import layers as L
from c3l_jax.models.configs import CLIPVisionConfig


class CLIPEncoderLayer(nnx.Module):

  def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, m = cfg.hidden_size, cfg.intermediate_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = L.layer_norm(d, "vision_embed", eps=cfg.layer_norm_eps, **kw)
    self.q_proj = L.dense(d, d, ("vision_embed", "vision_heads"), bias=True, **kw)
    self.k_proj = L.dense(d, d, ("vision_embed", "vision_heads"), bias=True, **kw)
    self.v_proj = L.dense(d, d, ("vision_embed", "vision_heads"), bias=True, **kw)
    self.out_proj = L.dense(d, d, ("vision_heads", "vision_embed"), bias=True, **kw)
    self.layer_norm2 = L.layer_norm(d, "vision_embed", eps=cfg.layer_norm_eps, **kw)
    self.fc1 = L.dense(d, m, ("vision_embed", "vision_mlp"), bias=True, **kw)
    self.fc2 = L.dense(m, d, ("vision_mlp", "vision_embed"), bias=True, **kw)
    self.num_heads = cfg.num_attention_heads
    self.act = cfg.hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[B, N, D] -> [B, N, D]`."""
    b, n, d = x.shape
    heads = lambda t: t.reshape(b, n, self.num_heads, d // self.num_heads)
    kv_heads = lambda t: heads(t).transpose(0, 2, 1, 3)
    h = self.layer_norm1(x)
    attn = L.attention(heads(self.q_proj(h)), kv_heads(self.k_proj(h)), kv_heads(self.v_proj(h)),
                       None)
    x = x + self.out_proj(attn.reshape(b, n, d))
    h = self.layer_norm2(x)
    return x + self.fc2(L.activation(self.act)(self.fc1(h)))


class CLIPVisionTower(nnx.Module):
  """Returns the hidden states LLaVA selects (`feature_layers`), each `[B, 1 + N, D]` (CLS first)."""

  def __init__(self, cfg: CLIPVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               scan: bool = True, remat: bool = False, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
    # The patch conv as a matmul over flattened (C, p, p) patches: kernel [C*p*p, D].
    self.patch_embedding = L.dense(c * p * p, d, (None, "vision_embed"), bias=False,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.class_embedding = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (d,), param_dtype), out_sharding=("vision_embed",))
    self.position_embedding = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (cfg.num_patches + 1, d), param_dtype),
        out_sharding=(None, "vision_embed"))
    self.pre_layrnorm = L.layer_norm(d, "vision_embed", eps=cfg.layer_norm_eps, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
    self.layers = L.stacked(
        lambda r: CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
        cfg.num_hidden_layers, rngs)
    self.post_layernorm = L.layer_norm(d, "vision_embed", eps=cfg.layer_norm_eps, dtype=dtype,
                                       param_dtype=param_dtype, rngs=rngs)
    self.dtype = dtype
    self.scan = scan
    self.remat = remat

  def embed(self, pixel_values: jax.Array) -> jax.Array:
    """`[B, C, H, W]` (NCHW, as HF image processors return) -> `[B, 1 + N, D]`."""
    x = L.vit_embed(pixel_values, self.cfg.image_size, self.cfg.patch_size, self.patch_embedding,
                    self.class_embedding[...], self.position_embedding[...])
    return self.pre_layrnorm(x)

  def __call__(self, pixel_values: jax.Array, feature_layers: tuple[int, ...]) -> list[jax.Array]:
    """Hidden states `hidden_states[i]` for i in `feature_layers` (negative i counts from the end)."""
    total = self.cfg.num_hidden_layers
    index = [i if i >= 0 else total + 1 + i for i in feature_layers]
    if any(not 0 <= i <= total for i in index):
      raise ValueError(f"vision_feature_layer {feature_layers} out of range for {total} layers")
    # Rows over the batch axes, as the decoder's (`layers.batch_sharded`): without it XLA may lay the
    # tower's activations out like its fsdp-sharded weights and hold every image on every fsdp device.
    x = L.batch_sharded(self.embed(pixel_values.astype(self.dtype)))
    needed = max(index)
    if needed == 0:
      return [x for _ in index]
    body = lambda layer, h, _: (L.batch_sharded(layer(h)), h if len(index) > 1 else None)
    last, inputs = L.scan_layers(self.layers, body, x, scan=self.scan, remat=self.remat, num=needed)
    # inputs[i] is the input of layer i, i.e. hidden_states[i]; hidden_states[needed] is `last`.
    return [last if i == needed else inputs[i] for i in index]

  def pooled(self, pixel_values: jax.Array) -> jax.Array:
    """CLIP's pooled output: `post_layernorm` of the last layer's CLS state, `[B, D]`."""
    (last,) = self(pixel_values, (self.cfg.num_hidden_layers,))
    return self.post_layernorm(last[:, 0])
