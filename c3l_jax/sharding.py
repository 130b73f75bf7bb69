"""Device mesh, logical-axis rules and sharded model creation / restoration.

The mesh has three axes with Auto axis types: `data` (batch), `fsdp` (batch and parameter shards) and
`tensor` (heads / MLP / vocab). Weights carry logical axis names (see `c3l_jax.models.layers`);
`LOGICAL_RULES` maps them onto mesh axes. Models are built abstractly (`nnx.eval_shape`) and their
parameters are created or restored directly into their shardings, so a 13B model is never
materialised on one device.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from c3l_jax import checkpoint
from c3l_jax.models.configs import ModelConfig, with_runtime
from c3l_jax.models.vlm import VLM, build_vlm

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
)


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolve `{data, fsdp, tensor}` sizes (one may be -1 = the rest) against `num_devices`."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh sizes must be positive with at most one -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"{num_devices} are available")
  return tuple(shape)


def make_mesh(sizes: dict[str, int] | Any, devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A `data x fsdp x tensor` mesh with Auto axis types from `config.mesh`-like sizes."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(dict(sizes), len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh
                    ) -> P:
  """PartitionSpec for logical `axes`; a dimension not divisible by its mesh axes is replicated."""
  rules = dict(LOGICAL_RULES)
  spec = []
  for name, dim in zip(axes, shape):
    mesh_axes = rules.get(name) if name is not None else None
    if mesh_axes is not None:
      size = math.prod(mesh.shape[a] for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes))
      if dim % size:
        logging.warning("dimension %d (%s) not divisible by mesh axes %s: replicated", dim, name,
                        mesh_axes)
        mesh_axes = None
    spec.append(mesh_axes)
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh) -> Any:
  """`NamedSharding` for each variable of an (abstract) NNX state, from its `out_sharding` names."""

  def one(v: nnx.Variable) -> NamedSharding:
    axes = v.get_metadata().get("out_sharding") or (None,) * len(v.shape)
    return NamedSharding(mesh, logical_to_spec(axes, v.shape, mesh))

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph definition and abstract parameter state (ShapeDtypeStructs), no memory allocated.

  The model class follows `cfg.family` (`c3l_jax.models.vlm.build_vlm`).
  """
  return nnx.split(nnx.eval_shape(lambda: build_vlm(cfg, nnx.Rngs(0))))


def init_model(cfg: ModelConfig, mesh: jax.sharding.Mesh, seed: int = 0) -> VLM:
  """Randomly initialised model with every parameter created directly in its sharding."""
  graphdef, abstract = abstract_model(cfg)
  shardings = state_shardings(abstract, mesh)

  def create():
    return nnx.state(build_vlm(cfg, nnx.Rngs(seed)))

  with jax.set_mesh(mesh):
    state = jax.jit(create, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def load_model(path: str, mesh: jax.sharding.Mesh,
               param_dtypes: Callable[[str], str | None] | None = None, **runtime: Any) -> VLM:
  """Restore a converted model directory into `mesh`.

  Args:
    path: a model directory (see `c3l_jax.checkpoint`), of any family (`LlavaVLM`, `MiniGPT4VLM`).
    param_dtypes: `'/'-joined parameter path -> dtype` for parameters restored in another dtype than
      `param_dtype` (None = `param_dtype`), e.g. fp32 master weights of the trained ones next to frozen
      bf16 ones. Every layer computes in `dtype` whatever its parameters' dtype.
    runtime: `dtype`, `param_dtype`, `scan_layers`, `remat` overrides (e.g. bf16 compute).
  """
  cfg = with_runtime(checkpoint.load_model_config(path), **runtime)
  graphdef, abstract = abstract_model(cfg)
  shardings = state_shardings(abstract, mesh)

  def target(key_path, v, s):
    name = "/".join(str(getattr(k, "key", k)) for k in key_path)
    dtype = (param_dtypes(name) if param_dtypes is not None else None) or v.dtype
    return jax.ShapeDtypeStruct(v.shape, dtype, sharding=s)

  targets = jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(abstract),
                                             nnx.to_pure_dict(shardings))
  restored = checkpoint.restore_params(path, targets)
  nnx.replace_by_pure_dict(abstract, restored)
  return nnx.merge(graphdef, abstract)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Sharding of a batch-major array: dim 0 over `data x fsdp`, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Place this process's slice of a batch (numpy pytree) on the mesh as global arrays."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x)),
      batch)


__all__ = ["LOGICAL_RULES", "MESH_AXES", "abstract_model", "batch_sharding", "init_model",
           "load_model", "make_mesh", "mesh_shape", "shard_batch", "state_shardings"]
