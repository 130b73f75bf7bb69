"""`jax.eval_shape` of the real MiniGPT-4 configs: exact parameter counts of the transformers modules
MiniGPT-4 is made of (built on the meta device, nothing allocated on either side)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from c3l_jax.models.configs import minigpt4_from_hf
from c3l_jax.sharding import abstract_model

# Salesforce/blip2-* config.json: EVA ViT-g/14 (39 layers) and the BERT-base Q-Former; transformers'
# Blip2VisionConfig / Blip2QFormerConfig defaults are exactly these.
_BLIP2 = dict(model_type="blip-2", num_query_tokens=32,
              vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                 num_attention_heads=16, image_size=224, patch_size=14,
                                 layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True),
              qformer_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, layer_norm_eps=1e-12,
                                  cross_attention_frequency=2, encoder_hidden_size=1408))
# Vicuna-7B v0 and Llama-2-7b-chat config.json (same architecture; vocabulary 32000).
_LLAMA_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                 rms_norm_eps=1e-6)


def transformers_param_count(variant: str) -> int:
  """Blip2VisionModel (+ Blip2QFormerModel + query tokens) + nn.Linear llama_proj + LlamaForCausalLM."""
  import torch
  from transformers import (Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel,
                            LlamaConfig, LlamaForCausalLM)

  count = lambda m: sum(p.numel() for p in m.parameters())
  with torch.device("meta"):
    total = count(Blip2VisionModel(Blip2VisionConfig(**_BLIP2["vision_config"])))
    if variant == "vicuna0":
      total += count(Blip2QFormerModel(Blip2QFormerConfig(**_BLIP2["qformer_config"])))
      total += _BLIP2["num_query_tokens"] * 768  # query_tokens [1, 32, 768]
      total += count(torch.nn.Linear(768, 4096))
    else:
      total += count(torch.nn.Linear(4 * 1408, 4096))
    total += count(LlamaForCausalLM(LlamaConfig(**_LLAMA_7B)))
  return total


@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_eval_shape_param_count_equals_transformers(variant):
  cfg = minigpt4_from_hf(_BLIP2, _LLAMA_7B, variant)
  _, abstract = abstract_model(cfg)
  leaves = jax.tree.leaves(nnx.to_pure_dict(abstract))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
  ours = sum(int(np.prod(x.shape)) for x in leaves)
  assert ours == transformers_param_count(variant)
  if variant == "vicuna0":
    assert cfg.image_seq_length == 32
    assert 7.7e9 < ours < 7.9e9  # ViT-g ~1.0B + Q-Former ~0.1B + Vicuna-7B 6.74B
  else:
    assert cfg.image_seq_length == 256 // 4
