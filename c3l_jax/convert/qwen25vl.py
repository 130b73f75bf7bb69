"""Qwen2.5-VL (`Qwen/Qwen2.5-VL-3B-Instruct`, `-7B-`, `-32B-`, `-72B-` and their fine-tunes).

The config is read with transformers' `AutoConfig` (the published `config.json` is the flat 4.41-era
schema: text fields at the top level, `vision_config` nested), `min_pixels` / `max_pixels` from
`preprocessor_config.json`. Accepted key layouts: the published one (`visual.*`, `model.*`,
`lm_head.*`) and transformers 5's (`model.visual.*`, `model.language_model.*`, `lm_head.*`). A tied
checkpoint (`tie_word_embeddings`, the 3B) has no `lm_head.weight`: the head is the embedding; one
saved anyway is ignored. Tokenizer, processor, chat-template and generation-config files are copied
verbatim (a snapshot without `tokenizer.json` works: transformers builds the same tokenizer from
`vocab.json` + `merges.txt` + `tokenizer_config.json`).
"""

from __future__ import annotations

import json
import os

from c3l_jax.convert import hf_dir, tensors
from c3l_jax.convert.common import ID, Conversion, ConversionError, Plan, add_linear
from c3l_jax.convert.llava_hf import text_plan
from c3l_jax.models.configs import Qwen25VLConfig, qwen25vl_from_hf


def is_qwen25vl(raw: dict) -> bool:
  return raw.get("model_type") == "qwen2_5_vl"


def read_preprocessor(path: str) -> dict:
  file = os.path.join(path, "preprocessor_config.json")
  if not os.path.exists(file):
    return {}
  try:
    with open(file) as f:
      return json.load(f)
  except ValueError as e:
    raise ConversionError(f"{file}: not valid JSON ({e})") from None


def read_hf_config(hf_path: str) -> Qwen25VLConfig:
  """The `Qwen25VLConfig` of a transformers Qwen2.5-VL directory."""
  hf_dir.read_config_json(hf_path, "--hf_path", "Qwen2.5-VL")
  try:
    return qwen25vl_from_hf(hf_dir.auto_config(hf_path, "--hf_path", "Qwen2.5-VL"),
                            read_preprocessor(hf_path))
  except (ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{os.path.join(hf_path, 'config.json')}: {e}") from e


def canonical_name(key: str) -> str | None:
  """Either layout -> `vision.*`, `text.*` or `lm_head.*`; None if unknown."""
  for prefix, out in (("model.visual.", "vision."), ("visual.", "vision."),
                      ("model.language_model.", "text."), ("model.", "text."), ("lm_head.", "lm_head.")):
    if key.startswith(prefix):
      return out + key[len(prefix):]
  return None


def vision_plan(cfg: Qwen25VLConfig) -> Plan:
  """`vision.*` -> `visual.*` (`QwenVisionTower`)."""
  plan: Plan = {}
  vt = ("visual",)
  plan["vision.patch_embed.proj.weight"] = (
      vt + ("patch_embed", "kernel"), None, lambda w: w.reshape(w.shape[0], -1).T)
  for i in range(cfg.vision.depth):
    src = f"vision.blocks.{i}."
    for hf, ours in (("attn.qkv", "qkv"), ("attn.proj", "proj"), ("mlp.gate_proj", "gate_proj"),
                     ("mlp.up_proj", "up_proj"), ("mlp.down_proj", "down_proj")):
      add_linear(plan, src + hf, vt + ("blocks", ours), i)
    for n in ("norm1", "norm2"):
      plan[src + n + ".weight"] = (vt + ("blocks", n, "weight"), i, ID)
  plan["vision.merger.ln_q.weight"] = (vt + ("merger", "ln_q", "weight"), None, ID)
  add_linear(plan, "vision.merger.mlp.0", vt + ("merger", "mlp_0"), None)
  add_linear(plan, "vision.merger.mlp.2", vt + ("merger", "mlp_2"), None)
  return plan


def conversion_plan(cfg: Qwen25VLConfig) -> Plan:
  """canonical name -> (parameter path, layer index or None, transform) of a Qwen2.5-VL model."""
  plan = vision_plan(cfg)
  plan.update(text_plan(cfg.text))
  return plan


def prepare(hf_path: str) -> Conversion:
  """Read the config and every tensor header of `hf_path`; check every name (nothing read yet)."""
  cfg = read_hf_config(hf_path)
  plan = conversion_plan(cfg)
  tied = cfg.text.tie_word_embeddings  # a tied checkpoint may still ship the head's copy
  refs = tensors.plan_refs(hf_path, plan, canonical_name, lambda name: tied and name == "lm_head.weight")
  head = "tied to the embedding" if cfg.text.tie_word_embeddings else "its own lm_head"
  notes = [f"prompt: the checkpoint's chat template ({hf_dir.chat_template_source(hf_path) or 'none found'})",
           f"head: {head}; image pixels {cfg.min_pixels:,} .. {cfg.max_pixels:,}"]
  return Conversion(cfg, plan, refs, f"{hf_path} (transformers Qwen2.5-VL)",
                    lambda partial: hf_dir.copy_processor_files(hf_path, partial), notes)
