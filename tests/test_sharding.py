"""The same logits on an 8-device (data=2, fsdp=2, tensor=2) CPU mesh as on one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from c3l_jax import sharding
from hf_reference import convert_cli, llava_inputs, make_hf_llava


def _forward(model, tokens, pixels, mask):
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, tokens, pixels, mask):
    return nnx.merge(graphdef, state)(tokens, pixels, mask)

  return np.asarray(fwd(state, tokens, pixels, mask))


def test_mesh_shape_resolution():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
  for bad in ({"data": -1, "fsdp": -1, "tensor": 1}, {"data": 3, "fsdp": 1, "tensor": 1},
              {"data": 0, "fsdp": 1, "tensor": 1}):
    with pytest.raises(ValueError):
      sharding.mesh_shape(bad, 8)


def test_sharded_logits_equal_single_device(tmp_path):
  assert len(jax.devices()) == 8, "conftest must simulate 8 CPU devices"
  hf = make_hf_llava(str(tmp_path / "hf"), vision=dict(num_attention_heads=4),
                     text=dict(num_key_value_heads=2))
  assert convert_cli(str(tmp_path / "hf"), str(tmp_path / "ours")).returncode == 0
  tokens, pixels, mask = llava_inputs(hf, batch=4, left_pad=2)

  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  want = _forward(sharding.load_model(str(tmp_path / "ours"), one), tokens, pixels, mask)

  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = sharding.load_model(str(tmp_path / "ours"), mesh)
  q = model.language_model.layers.q_proj.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
  batch = sharding.shard_batch({"t": tokens, "p": pixels, "m": mask}, mesh)
  assert batch["t"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  got = _forward(model, batch["t"], batch["p"], batch["m"])
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_init_model_creates_sharded_parameters():
  from c3l_jax.models.configs import from_hf_config
  from hf_reference import hf_llava_config

  cfg = from_hf_config(hf_llava_config().to_dict())
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = sharding.init_model(cfg, mesh, seed=0)
  emb = model.language_model.embed_tokens.embedding[...]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert len({s.device for s in emb.addressable_shards}) == 8
