"""`jax.eval_shape` of the real LLaVA-1.5 7B / 13B configs: exact transformers parameter counts."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from c3l_jax.models.configs import from_hf_config
from c3l_jax.sharding import abstract_model

# The architecture fields of llava-hf/llava-1.5-{7b,13b}-hf's config.json.
_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
               num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
               projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_TEXT = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}


def llava15_hf_config(size: str) -> dict:
  text = dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
              rope_theta=10000.0, pad_token_id=32001, **_TEXT[size])
  return dict(model_type="llava", image_token_index=32000, vision_feature_layer=-2,
              vision_feature_select_strategy="default", projector_hidden_act="gelu",
              vision_config=_VISION, text_config=text)


def transformers_param_count(hf_dict: dict) -> int:
  import torch
  from transformers import LlavaConfig, LlavaForConditionalGeneration

  cfg = LlavaConfig(**hf_dict)
  with torch.device("meta"):
    model = LlavaForConditionalGeneration(cfg)
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_eval_shape_param_count_equals_transformers(size):
  hf_dict = llava15_hf_config(size)
  cfg = from_hf_config(hf_dict)
  _, abstract = abstract_model(cfg)
  leaves = jax.tree.leaves(nnx.to_pure_dict(abstract))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
  ours = sum(int(np.prod(x.shape)) for x in leaves)
  assert ours == transformers_param_count(hf_dict)
  if size == "7b":
    assert 7.0e9 < ours < 7.1e9
