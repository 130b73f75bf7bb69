"""Runtime options: unrolled vs scanned layers, remat, bf16 checkpoints and bf16 compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from c3l_jax import sharding
from hf_reference import convert_cli, llava_inputs, make_hf_llava, torch_logits


def _mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def _loss_and_grad(model, tokens, pixels, mask):
  graphdef, state = nnx.split(model)

  def loss(state):
    logits = nnx.merge(graphdef, state)(tokens, pixels, mask)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  value, grads = jax.jit(jax.value_and_grad(loss))(state)
  return value, nnx.to_pure_dict(grads)


def test_scan_unrolled_and_remat_agree(tmp_path):
  hf = make_hf_llava(str(tmp_path / "hf"))
  assert convert_cli(str(tmp_path / "hf"), str(tmp_path / "ours")).returncode == 0
  tokens, pixels, mask = llava_inputs(hf, batch=2, left_pad=1)
  ref_value, ref_grads = _loss_and_grad(sharding.load_model(str(tmp_path / "ours"), _mesh()),
                                        tokens, pixels, mask)
  for opts in (dict(scan_layers=False), dict(remat=True), dict(scan_layers=False, remat=True)):
    model = sharding.load_model(str(tmp_path / "ours"), _mesh(), **opts)
    value, grads = _loss_and_grad(model, tokens, pixels, mask)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads,
                 ref_grads)
  # Gradients are real: the decoder's first layer receives a non-zero gradient.
  assert np.abs(ref_grads["language_model"]["layers"]["q_proj"]["kernel"]).max() > 0


def test_bf16_checkpoint_converts_exactly_and_bf16_compute_is_close(tmp_path):
  import torch

  hf = make_hf_llava(str(tmp_path / "hf32"))
  hf16 = hf.to(torch.bfloat16)
  hf16.save_pretrained(str(tmp_path / "hf16"))
  assert convert_cli(str(tmp_path / "hf16"), str(tmp_path / "ours")).returncode == 0
  tokens, pixels, mask = llava_inputs(hf, batch=2)
  # bf16 weights restored into fp32 parameters: equal to the torch model with the same (rounded) weights.
  want = torch_logits(hf16.float(), tokens, pixels, mask)
  model = sharding.load_model(str(tmp_path / "ours"), _mesh())
  assert model.language_model.lm_head.kernel[...].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(model(tokens, pixels, mask)), want, atol=1e-4, rtol=0)
  # bf16 parameters and compute: close to fp32, and really bf16.
  model16 = sharding.load_model(str(tmp_path / "ours"), _mesh(), dtype="bfloat16",
                                param_dtype="bfloat16")
  assert model16.language_model.lm_head.kernel[...].dtype == jnp.bfloat16
  got16 = np.asarray(model16(tokens, pixels, mask))
  assert got16.dtype == np.float32
  err = np.abs(got16 - want).max()
  assert 0 < err < 0.05 * np.abs(want).max() + 0.05
