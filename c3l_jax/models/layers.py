"""Shared building blocks: annotated dense/norm layers, attention, activations, stacked-layer scan.

Every weight carries logical axis names as `out_sharding` metadata (see `c3l_jax.sharding` for the rules
that map them onto the mesh):
  `layers` (stacked decoder/encoder layers), `vocab`, `embed` (model width), `mlp`, `heads`,
  `kv_heads`, `head_dim`, `vision_embed`, `vision_mlp`, `vision_heads`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from c3l_jax.models.attention import attention as _attention

Axes = tuple[str | None, ...]


def dtype_of(name: str | Any) -> Any:
  return jnp.dtype(name) if isinstance(name, str) else name


def dense(in_features: int, out_features: int, axes: Axes, *, bias: bool, dtype: Any,
          param_dtype: Any, rngs: nnx.Rngs, std: float = 0.02) -> nnx.Linear:
  """`nnx.Linear` whose kernel `[in, out]` (and bias `[out]`) carry logical axis names."""
  return nnx.Linear(
      in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.initializers.normal(std), rngs=rngs,
      kernel_metadata={"out_sharding": axes}, bias_metadata={"out_sharding": axes[-1:]})


def layer_norm(features: int, axis: str, *, eps: float, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  """torch-exact LayerNorm (two-pass variance) with annotated scale and bias."""
  return nnx.LayerNorm(
      features, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      rngs=rngs, scale_metadata={"out_sharding": (axis,)}, bias_metadata={"out_sharding": (axis,)})


class RMSNorm(nnx.Module):
  """Llama RMSNorm exactly as transformers: normalise in float32, cast back, then scale."""

  def __init__(self, features: int, *, eps: float, param_dtype: Any):
    self.weight = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=("embed",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    in_dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(in_dtype) * x32.astype(in_dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Plain (XLA) attention: `c3l_jax.models.attention.attention` with `impl="xla"` (the vision towers'
  and the Q-Former's; the decoder picks its implementation from the model config)."""
  return _attention(q, k, v, mask)


def batch_sharded(x: jax.Array) -> jax.Array:
  """`x` `[B, ...]` constrained to rows over the mesh's batch axes (`data`, `fsdp`), the rest whole,
  when a mesh is set (`jax.set_mesh`) and B divides: without it, XLA may lay activations out like the
  fsdp-sharded weights (width split, rows whole) and hold every row on every device."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  if mesh.empty or not axes:
    return x
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  if size == 1 or x.shape[0] % size:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1))))


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module:
  """`num` copies of a layer with parameters stacked on a leading `layers` axis."""

  @nnx.split_rngs(splits=num)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num,
            transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r: nnx.Rngs) -> nnx.Module:
    return make(r)

  return create(rngs)


def scan_layers(layers: nnx.Module, body: Callable[..., tuple[Any, Any]], carry: Any,
                xs: Any = None, *, scan: bool = True, remat: bool = False,
                num: int | None = None) -> tuple[Any, Any]:
  """Apply stacked `layers` in order: `carry, y_i = body(layer_i, carry, xs_i)`.

  Functional core: the stacked module is split once and each layer is merged inside the loop body.
  `scan=True` lowers to one `lax.scan` (compile time independent of depth); `scan=False` unrolls it.
  `remat=True` rematerialises each layer's activations in the backward pass. `num` applies only the
  first `num` layers (e.g. CLIP features taken from the penultimate layer never run the last one).
  """
  graphdef, state = nnx.split(layers)
  length = jax.tree.leaves(state)[0].shape[0]
  if num is not None and num < length:
    # Index the first `num` layers out of the whole stack inside the loop: slicing the stack first
    # (`a[:num]`) would copy those layers' parameters (CLIP-L: 0.6 GB in bf16).
    def step(c, inputs):
      i, x = inputs
      return body(nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)), c, x)

    scanned, length = (jnp.arange(num), xs), num
  else:
    def step(c, inputs):
      layer_state, x = inputs
      return body(nnx.merge(graphdef, layer_state), c, x)

    scanned = (state, xs)
  if remat:
    step = jax.checkpoint(step, prevent_cse=not scan)
  return jax.lax.scan(step, carry, scanned, unroll=1 if scan else length)


def causal_mask(query_pos: jax.Array, key_pos: jax.Array, key_valid: jax.Array) -> jax.Array:
  """`[B, T, S]` mask: key s visible to query t iff valid and `key_pos[s] <= query_pos[t]`.

  Positions are slot indices in the (padded) sequence, so padding never attends or is attended.
  """
  return (key_pos[:, None, :] <= query_pos[:, :, None]) & key_valid[:, None, :]


def vit_embed(pixel_values: jax.Array, image_size: int, patch_size: int, patch_embedding: Any,
              class_embedding: jax.Array, position_embedding: jax.Array) -> jax.Array:
  """ViT input embeddings (CLIP / BLIP-2 semantics): `[B, C, H, W]` (NCHW, as HF image processors
  return) -> `[CLS, patches] + positions` `[B, 1 + N, D]`; `patch_embedding` maps `[.., C*p*p]` to D."""
  b, c, hgt, wid = pixel_values.shape
  p = patch_size
  if (hgt, wid) != (image_size, image_size):
    raise ValueError(f"pixel_values are {hgt}x{wid}, the vision tower expects {image_size}x{image_size}")
  x = pixel_values.reshape(b, c, hgt // p, p, wid // p, p).transpose(0, 2, 4, 1, 3, 5)
  patches = patch_embedding(x.reshape(b, (hgt // p) * (wid // p), c * p * p))
  cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (b, 1, patches.shape[-1]))
  return jnp.concatenate([cls, patches], axis=1) + position_embedding.astype(patches.dtype)
