"""transformers' LLaVA-1.5 (`llava-hf/llava-1.5-7b-hf` and every `LlavaForConditionalGeneration` save).

The config is read with transformers' own `AutoConfig` (a published `config.json` omits every field
that equals `LlamaConfig`'s / `CLIPVisionConfig`'s default: hidden size, layers, heads, rope...), the
weights from the (single or sharded) `*.safetensors` files. Accepted key layouts:
`vision_tower.vision_model.*` / `vision_tower.*` / `model.vision_tower.*`, `language_model.model.*` /
`model.language_model.*`, and `lm_head.*` / `language_model.lm_head.*` (transformers 4.x, 5.x and the
original llava-hf uploads). Tokenizer, processor and chat-template files are copied verbatim; a
checkpoint with no chat template anywhere gets the one llava-hf publishes for LLaVA-1.5.
"""

from __future__ import annotations

import os
import re

from absl import logging

from c3l_jax.convert import hf_dir, tensors
from c3l_jax.convert.common import ID, T, Conversion, ConversionError, Plan, add_layer_norm, add_linear
from c3l_jax.models.configs import LlamaConfig, LlavaConfig, from_hf_config

IGNORED = (
    re.compile(r"vision\.embeddings\.position_ids"),  # buffer in old checkpoints
    re.compile(r"text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),  # buffer in old checkpoints
)


def read_hf_config(hf_path: str) -> LlavaConfig:
  """The `LlavaConfig` of a transformers LLaVA directory."""
  raw = hf_dir.read_config_json(hf_path, "--hf_path", "LLaVA")
  if hf_dir.is_original_llava(raw):
    raise ConversionError(f"{hf_path!r} is in the original LLaVA repository's format "
                          "(LlavaLlamaForCausalLM): convert it with llava_original.prepare")
  try:
    return from_hf_config(hf_dir.auto_config(hf_path, "--hf_path", "LLaVA"))
  except (ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{os.path.join(hf_path, 'config.json')}: {e}") from e


def canonical_name(key: str) -> str | None:
  """Map any accepted layout to `vision.*`, `projector.*`, `text.*` or `lm_head.*`; None if unknown."""
  k = key[len("model."):] if key.startswith("model.") else key
  for prefix, out in (("vision_tower.vision_model.", "vision."), ("vision_tower.", "vision."),
                      ("multi_modal_projector.", "projector."), ("language_model.model.", "text."),
                      ("language_model.lm_head.", "lm_head."), ("language_model.", "text."),
                      ("lm_head.", "lm_head.")):
    if k.startswith(prefix):
      return out + k[len(prefix):]
  return None


def text_plan(t: LlamaConfig) -> Plan:
  """`text.*` / `lm_head.*` -> `language_model.*` (the Llama decoder, every family)."""
  plan: Plan = {}
  lm = ("language_model",)
  plan["text.embed_tokens.weight"] = (lm + ("embed_tokens", "embedding"), None, ID)
  plan["text.norm.weight"] = (lm + ("norm", "weight"), None, ID)
  if not t.tie_word_embeddings:
    plan["lm_head.weight"] = (lm + ("lm_head", "kernel"), None, T)
  qkv_bias = t.attention_bias or t.qkv_bias
  for i in range(t.num_hidden_layers):
    src = f"text.layers.{i}."
    for hf, ours, has_bias in (
        ("self_attn.q_proj", "q_proj", qkv_bias), ("self_attn.k_proj", "k_proj", qkv_bias),
        ("self_attn.v_proj", "v_proj", qkv_bias), ("self_attn.o_proj", "o_proj", t.attention_bias),
        ("mlp.gate_proj", "gate_proj", t.mlp_bias), ("mlp.up_proj", "up_proj", t.mlp_bias),
        ("mlp.down_proj", "down_proj", t.mlp_bias)):
      plan[src + hf + ".weight"] = (lm + ("layers", ours, "kernel"), i, T)
      if has_bias:
        plan[src + hf + ".bias"] = (lm + ("layers", ours, "bias"), i, ID)
    for n in ("input_layernorm", "post_attention_layernorm"):
      plan[src + n + ".weight"] = (lm + ("layers", n, "weight"), i, ID)
  return plan


def clip_plan(cfg: LlavaConfig) -> Plan:
  """`vision.*` (CLIP's `vision_model.*`) -> `vision_tower.*` (`CLIPVisionTower`)."""
  plan: Plan = {}
  vt = ("vision_tower",)
  plan["vision.embeddings.patch_embedding.weight"] = (
      vt + ("patch_embedding", "kernel"), None, lambda w: w.reshape(w.shape[0], -1).T)
  plan["vision.embeddings.class_embedding"] = (vt + ("class_embedding",), None, ID)
  plan["vision.embeddings.position_embedding.weight"] = (vt + ("position_embedding",), None, ID)
  for norm in ("pre_layrnorm", "post_layernorm"):
    add_layer_norm(plan, f"vision.{norm}", vt + (norm,), None)
  for i in range(cfg.vision.num_hidden_layers):
    src = f"vision.encoder.layers.{i}."
    for hf, ours in (("self_attn.q_proj", "q_proj"), ("self_attn.k_proj", "k_proj"),
                     ("self_attn.v_proj", "v_proj"), ("self_attn.out_proj", "out_proj"),
                     ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
      add_linear(plan, src + hf, vt + ("layers", ours), i)
    for n in ("layer_norm1", "layer_norm2"):
      add_layer_norm(plan, src + n, vt + ("layers", n), i)
  return plan


def conversion_plan(cfg: LlavaConfig) -> Plan:
  """canonical name -> (parameter path, layer index or None, transform) of a LLaVA-1.5 model."""
  plan = clip_plan(cfg)
  for n in ("linear_1", "linear_2"):
    add_linear(plan, f"projector.{n}", ("multi_modal_projector", n), None, cfg.multimodal_projector_bias)
  plan.update(text_plan(cfg.text))
  return plan


def prepare(hf_path: str) -> Conversion:
  """Read the config and every tensor header of `hf_path`; check every name (nothing read yet)."""
  cfg = read_hf_config(hf_path)
  plan = conversion_plan(cfg)
  refs = tensors.plan_refs(hf_path, plan, canonical_name,
                           lambda name: name is not None and any(p.fullmatch(name) for p in IGNORED))
  template = hf_dir.chat_template_source(hf_path)
  notes = [f"prompt: the checkpoint's chat template ({template or 'none found: the LLaVA-1.5 template llava-hf publishes will be written'})"]

  def add_files(partial: str) -> None:
    hf_dir.copy_processor_files(hf_path, partial)
    if template is None:
      from c3l_jax.data.prompts import LLAVA15_CHAT_TEMPLATE

      logging.warning("%s has no chat template: writing llava-hf's LLaVA-1.5 template", hf_path)
      with open(os.path.join(partial, "chat_template.jinja"), "w") as f:
        f.write(LLAVA15_CHAT_TEMPLATE)

  return Conversion(cfg, plan, refs, f"{hf_path} (transformers LLaVA)", add_files, notes)
