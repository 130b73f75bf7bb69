"""MiniGPT-4: BLIP-2 (EVA ViT-g + Q-Former) + Llama / Vicuna + MiniGPT-4's `llama_proj`.

Three sources:
- `--blip2_path`: a transformers BLIP-2 directory (`model_type: blip-2`, any language model): the EVA ViT-g
  (`vision_model.*`, its `post_layernorm` being MiniGPT-4's `ln_vision`), the Q-Former (`qformer.*`) and
  `query_tokens`. Its language model / projection and the Q-Former's text-only feed-forward are ignored.
- `--llm_path`: a transformers Llama directory (Vicuna v0 / Llama-2-chat): the decoder and the tokenizer
  (Vicuna ships only Llama's SentencePiece `tokenizer.model`; transformers converts it).
- `--proj_path`: MiniGPT-4's released checkpoint (`.pth`, `{"model": {...}}` or flat, read with torch
  `weights_only=True`; or `.safetensors`) holding `llama_proj.weight` / `llama_proj.bias`.
Both configs are read with transformers' `AutoConfig` (omitted fields get its defaults).
`variant` is `vicuna0` (Q-Former, `###Human:` prompts) or `llama2` (no Q-Former, 4 adjacent patches
concatenated, `[INST]` prompts); by default it follows `llama_proj`'s input width. `image_size` (default:
the BLIP-2 config's, 224 as both released MiniGPT-4 checkpoints use) other than the checkpoint's resizes
the ViT's position embeddings as EVA's `interpolate_pos_embed` does (bicubic, `align_corners=False`).
The output holds the LLM's tokenizer files and a BLIP image processor (`preprocessor_config.json`:
bicubic resize to the image size, BLIP-2 mean / std).
"""

from __future__ import annotations

import os
import re

import numpy as np
from absl import logging

from c3l_jax.convert import hf_dir, tensors
from c3l_jax.convert.common import (ID, Conversion, ConversionError, Plan, add_layer_norm, add_linear,
                                   check_complete, listing)
from c3l_jax.convert.interpolate import interpolate_position_embedding
from c3l_jax.convert.llava_hf import text_plan
from c3l_jax.models.configs import MiniGPT4Config, minigpt4_from_hf

_BLIP2_IGNORED = (
    re.compile(r"(language_model|language_projection|text_projection|vision_projection|itm_head)\..*"),
    re.compile(r"qformer\.embeddings\..*"),  # text embeddings (retrieval checkpoints)
    re.compile(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..*"),  # text feed-forward
    re.compile(r"vision_model\.embeddings\.position_ids"),
)
_LLM_IGNORED = (re.compile(r"text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)


def _eva_plan(cfg: MiniGPT4Config) -> Plan:
  """`vision.*` (BLIP-2 `vision_model.*`) -> `vision_tower.*` (`EVAViT`)."""
  v = cfg.vision
  vt = ("vision_tower",)
  grid = v.image_size // v.patch_size
  plan: Plan = {
      "vision.embeddings.patch_embedding.weight": (
          vt + ("patch_embedding", "kernel"), None, lambda w: w.reshape(w.shape[0], -1).T),
      "vision.embeddings.patch_embedding.bias": (vt + ("patch_embedding", "bias"), None, ID),
      "vision.embeddings.class_embedding": (vt + ("class_embedding",), None, lambda w: w.reshape(-1)),
      "vision.embeddings.position_embedding": (
          vt + ("position_embedding",), None,
          lambda w: interpolate_position_embedding(w.reshape(-1, w.shape[-1]), grid)),
  }
  add_layer_norm(plan, "vision.post_layernorm", vt + ("post_layernorm",), None)
  for i in range(v.num_hidden_layers):
    src = f"vision.encoder.layers.{i}."
    biased = [("self_attn.projection", "projection"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")]
    add_linear(plan, src + "self_attn.qkv", vt + ("layers", "qkv"), i, bias=v.qkv_bias)
    for hf, ours in biased:
      add_linear(plan, src + hf, vt + ("layers", ours), i)
    for n in ("layer_norm1", "layer_norm2"):
      add_layer_norm(plan, src + n, vt + ("layers", n), i)
  return plan


def _qformer_plan(cfg: MiniGPT4Config) -> Plan:
  """`qformer.*` and `query_tokens` (BLIP-2) -> `qformer.*` (`QFormer`)."""
  q = cfg.qformer
  assert q is not None
  qf = ("qformer",)
  plan: Plan = {"query_tokens": (qf + ("query_tokens",), None, lambda w: w.reshape(-1, w.shape[-1]))}
  add_layer_norm(plan, "qformer.layernorm", qf + ("layernorm",), None)

  def attention(src: str, dst: tuple[str, ...], layer: int) -> None:
    for hf, ours in (("attention.query", "query"), ("attention.key", "key"),
                     ("attention.value", "value"), ("output.dense", "dense")):
      add_linear(plan, f"{src}.{hf}", dst + (ours,), layer)
    add_layer_norm(plan, f"{src}.output.LayerNorm", dst + ("layer_norm",), layer)

  for i in range(q.num_hidden_layers):
    src = f"qformer.encoder.layer.{i}"
    attention(f"{src}.attention", qf + ("layers", "attention"), i)
    if i % q.cross_attention_frequency == 0:
      attention(f"{src}.crossattention", qf + ("crossattention",), i // q.cross_attention_frequency)
    for hf, ours in (("intermediate_query.dense", "intermediate"), ("output_query.dense", "output")):
      add_linear(plan, f"{src}.{hf}", qf + ("layers", ours), i)
    add_layer_norm(plan, f"{src}.output_query.LayerNorm", qf + ("layers", "output_layer_norm"), i)
  return plan


def minigpt4_conversion_plan(cfg: MiniGPT4Config) -> Plan:
  """canonical name -> (parameter path, layer index or None, transform) for a MiniGPT-4 model.

  Canonical names: `vision.*` (BLIP-2 `vision_model.*`), `qformer.*` / `query_tokens` (BLIP-2), `text.*` /
  `lm_head.*` (the Llama directory) and `llama_proj.*` (MiniGPT-4's checkpoint).
  """
  plan = _eva_plan(cfg)
  if cfg.qformer is not None:
    plan.update(_qformer_plan(cfg))
  add_linear(plan, "llama_proj", ("llama_proj",), None)
  plan.update(text_plan(cfg.text))
  return plan


def _canonical_blip2(key: str) -> str:
  k = key[len("model."):] if key.startswith("model.") else key
  return "vision." + k[len("vision_model."):] if k.startswith("vision_model.") else k


def _canonical_llama(key: str) -> str | None:
  k = key
  for prefix in ("language_model.", "model.language_model."):  # a Llama saved inside a wrapper
    if k.startswith(prefix):
      k = k[len(prefix):]
  if k.startswith("model."):
    return "text." + k[len("model."):]
  if k.startswith("lm_head."):
    return k
  return None

def read_llama_proj(path: str) -> dict[str, np.ndarray]:
  """`{"llama_proj.weight", "llama_proj.bias"}` from MiniGPT-4's checkpoint (`.pth` or safetensors).

  The state dict may sit under `"model"` (as MiniGPT-4 saves it) and keys may carry a module prefix.
  Only `llama_proj` is taken: MiniGPT-4 trains nothing else.
  """
  if not os.path.isfile(path):
    raise ConversionError(f"--proj_path {path!r} is not a file")
  refs = tensors.read_index(path)
  out = {}
  for part in ("weight", "bias"):
    keys = [k for k in refs if k == f"llama_proj.{part}" or k.endswith(f".llama_proj.{part}")]
    if len(keys) != 1:
      raise ConversionError(f"{path!r}: expected one llama_proj.{part} tensor, found {keys or 'none'} "
                            f"(keys: {listing(sorted(refs))})")
    value = refs[keys[0]].read()
    out[f"llama_proj.{part}"] = value.astype(np.float32) if value.dtype.name == "bfloat16" else value
  ignored = len(refs) - 2
  if ignored:
    logging.info("%s: ignored %d tensors that are not llama_proj", path, ignored)
  return out


def read_config(blip2_path: str, llm_path: str, proj_in: int, variant: str | None = None,
                image_size: int | None = None) -> MiniGPT4Config:
  """The `MiniGPT4Config` of the three sources; `variant=None` follows `llama_proj`'s input width
  `proj_in` (the Q-Former's width: vicuna0; 4x the ViT's: llama2)."""
  blip2 = hf_dir.auto_config(blip2_path, "--blip2_path", "BLIP-2")
  llm = hf_dir.auto_config(llm_path, "--llm_path", "Llama")
  try:
    if variant is None:
      guess = minigpt4_from_hf(blip2, llm, "vicuna0", image_size)
      variant = "vicuna0" if proj_in == guess.projector_input_size else "llama2"
    cfg = minigpt4_from_hf(blip2, llm, variant, image_size)
  except (ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{blip2_path} / {llm_path}: {e}") from e
  if proj_in != cfg.projector_input_size:
    raise ConversionError(
        f"llama_proj takes {proj_in} features but the {variant} variant feeds it "
        f"{cfg.projector_input_size} ({'the Q-Former width' if cfg.qformer else '4 x the ViT width'})")
  return cfg


def prepare(blip2_path: str, llm_path: str, proj_path: str, variant: str | None = None,
            image_size: int | None = None) -> Conversion:
  """Read the configs and every tensor header of the three sources; check every name."""
  proj = read_llama_proj(proj_path)
  if proj["llama_proj.weight"].ndim != 2:
    raise ConversionError(f"llama_proj.weight has shape {proj['llama_proj.weight'].shape}, not 2-D")
  cfg = read_config(blip2_path, llm_path, int(proj["llama_proj.weight"].shape[1]), variant, image_size)
  plan = minigpt4_conversion_plan(cfg)
  refs: dict = {k: tensors.ArrayRef(v) for k, v in proj.items()}
  unexpected: list[str] = []
  for key, ref in tensors.read_all(blip2_path, "--blip2_path"):
    name = _canonical_blip2(key)
    if name in plan:
      refs[name] = ref
    elif cfg.qformer is None and (name.startswith("qformer.") or name == "query_tokens"):
      continue  # the Llama-2 variant has no Q-Former
    elif not any(p.fullmatch(name) for p in _BLIP2_IGNORED):
      unexpected.append(f"{key} (in --blip2_path)")
  for key, ref in tensors.read_all(llm_path, "--llm_path"):
    name = _canonical_llama(key)
    if name in plan:
      refs[name] = ref
    elif name is None or not any(p.fullmatch(name) for p in _LLM_IGNORED):
      unexpected.append(f"{key} (in --llm_path)")
  check_complete(f"{blip2_path} + {llm_path} + {proj_path}", plan, refs, unexpected)

  def add_files(partial: str) -> None:
    # The LLM's tokenizer (and its own config / generation config), not another processor's files.
    hf_dir.copy_processor_files(llm_path, partial, skip=(
        "preprocessor_config.json", "processor_config.json", *hf_dir.CHAT_TEMPLATE_FILES))
    from c3l_jax.data.prompts import blip2_image_processor

    blip2_image_processor(cfg.vision.image_size).save_pretrained(partial)

  notes = [f"prompt: MiniGPT-4 {cfg.variant} template"]
  return Conversion(cfg, plan, refs, f"{blip2_path} (BLIP-2) + {llm_path} (Llama) + {proj_path}",
                    add_files, notes)
