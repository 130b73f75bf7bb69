"""Logits parity with transformers' `LlavaForConditionalGeneration`, after the converter CLI."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from c3l_jax import sharding
from hf_reference import convert_cli, llava_inputs, make_hf_llava, rewrite_layout, torch_logits

CASES = {
    "gqa-default-layer-2": dict(),
    "mha-full-layer-1-30px-patch6": dict(
        vision=dict(image_size=30, patch_size=6), text=dict(num_key_value_heads=4),
        vision_feature_layer=-1, vision_feature_select_strategy="full"),
    "multi-layer-tied-bias-linear-rope": dict(
        text=dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500.0)),
        vision_feature_layer=[-3, -1], tie_word_embeddings=True),
    "dynamic-rope-past-max-positions": dict(
        text=dict(max_position_embeddings=8,
                  rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))),
    "llama3-rope-layer1": dict(
        text=dict(rope_parameters=dict(rope_type="llama3", factor=8.0, rope_theta=500000.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=8)),
        vision_feature_layer=1),  # 0 trips a transformers bug (output_hidden_states=0 is falsy)
}


def _load(path):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  return sharding.load_model(path, mesh)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(tmp_path, name):
  hf = make_hf_llava(str(tmp_path / "hf"), **CASES[name])
  proc = convert_cli(str(tmp_path / "hf"), str(tmp_path / "ours"))
  assert proc.returncode == 0, proc.stderr
  model = _load(str(tmp_path / "ours"))
  tokens, pixels, mask = llava_inputs(hf, batch=2, left_pad=3)
  want = torch_logits(hf, tokens, pixels, mask)
  got = np.asarray(model(tokens, pixels, mask))
  valid = mask.astype(bool)
  assert got.shape == want.shape
  np.testing.assert_array_less(np.abs(got - want)[valid].max(), 1e-4)
  # The comparison is not vacuous: logits differ between rows and from zero.
  assert np.abs(want[valid]).max() > 1e-2


def test_left_padding_does_not_change_a_row(tmp_path):
  hf = make_hf_llava(str(tmp_path / "hf"))
  assert convert_cli(str(tmp_path / "hf"), str(tmp_path / "ours")).returncode == 0
  model = _load(str(tmp_path / "ours"))
  tokens, pixels, mask = llava_inputs(hf, batch=2, left_pad=5)
  padded = np.asarray(model(tokens, pixels, mask))
  alone = np.asarray(model(tokens[1:, 5:], pixels[1:], mask[1:, 5:]))
  np.testing.assert_allclose(padded[1, 5:], alone[0], atol=1e-5)


LAYOUTS = {
    # transformers 5 in-memory names
    "v5": lambda k: k.replace("language_model.model.", "model.language_model.")
                     .replace("language_model.lm_head.", "lm_head.")
                     .replace("vision_tower.", "model.vision_tower.")
                     .replace("multi_modal_projector.", "model.multi_modal_projector."),
    # vision tower saved without the `vision_model.` level
    "flat-vision": lambda k: k.replace("vision_tower.vision_model.", "vision_tower."),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_converter_accepts_key_layouts_and_shards(tmp_path, layout):
  hf = make_hf_llava(str(tmp_path / "hf"))
  rewrite_layout(str(tmp_path / "hf"), str(tmp_path / "re"), LAYOUTS[layout], shards=3)
  proc = convert_cli(str(tmp_path / "re"), str(tmp_path / "ours"), "--dtype=float32")
  assert proc.returncode == 0, proc.stderr
  tokens, pixels, mask = llava_inputs(hf, batch=1)
  got = np.asarray(_load(str(tmp_path / "ours"))(tokens, pixels, mask))
  np.testing.assert_allclose(got, torch_logits(hf, tokens, pixels, mask), atol=1e-4, rtol=0)


def test_converter_errors_are_clear(tmp_path):
  missing = convert_cli(str(tmp_path / "nope"), str(tmp_path / "o"))
  assert missing.returncode != 0 and "is not a directory" in missing.stderr
  assert "Traceback" not in missing.stderr

  make_hf_llava(str(tmp_path / "hf"))
  drop = lambda k: k  # identity, then delete two tensors and add a stray one below
  rewrite_layout(str(tmp_path / "hf"), str(tmp_path / "bad"), drop)
  from safetensors.numpy import load_file, save_file
  f = str(tmp_path / "bad" / "model.safetensors")
  tensors = load_file(f)
  del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
  del tensors["multi_modal_projector.linear_2.bias"]
  tensors["language_model.model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
  save_file(tensors, f)
  proc = convert_cli(str(tmp_path / "bad"), str(tmp_path / "o"))
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  for name in ("text.layers.1.mlp.up_proj.weight", "projector.linear_2.bias",
               "language_model.model.layers.0.self_attn.extra.weight"):
    assert name in proc.stderr, proc.stderr

  import json
  cfg_path = tmp_path / "hf" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["model_type"] = "blip-2"
  cfg_path.write_text(json.dumps(cfg))
  proc = convert_cli(str(tmp_path / "hf"), str(tmp_path / "o"))
  assert proc.returncode != 0 and "not a LLaVA config" in proc.stderr


def test_clip_pooled_output_matches_transformers(tmp_path):
  import torch

  hf = make_hf_llava(str(tmp_path / "hf"))
  assert convert_cli(str(tmp_path / "hf"), str(tmp_path / "ours")).returncode == 0
  _, pixels, _ = llava_inputs(hf, batch=2)
  with torch.no_grad():
    want = hf.model.vision_tower(torch.as_tensor(pixels)).pooler_output.numpy()
  got = np.asarray(_load(str(tmp_path / "ours")).vision_tower.pooled(pixels))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
