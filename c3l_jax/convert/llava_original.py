"""The original LLaVA repository's format (`liuhaotian/llava-v1.5-7b` / `-13b`, and every fine-tune made
with that code, the C3L authors' included).

Such a directory holds `LlavaLlamaForCausalLM`: a `config.json` that says `"model_type": "llava"` (the
same string as transformers' LLaVA, with a different schema: a flat Llama config plus `mm_*` keys), the
decoder and `model.mm_projector.{0,2}` in `pytorch_model-*.bin` (or safetensors), and no CLIP weights:
`mm_vision_tower` names the CLIP checkpoint (`openai/clip-vit-large-patch14-336`), which `--clip_path`
must point to (a local transformers CLIP directory: its vision weights, config and image processor). A
fine-tune that trained the tower stores it as `model.vision_tower.vision_tower.vision_model.*`; those
weights then take precedence over the CLIP directory's.

The model is LLaVA-1.5's architecture (`LlavaConfig`, family `llava15`) with the original format's
conventions recorded in the converted config: `image_token_id` is a placeholder outside the 32000-token
vocabulary (LLaVA splices the image features where `tokenizer_image_token` put `IMAGE_TOKEN_INDEX`),
`prompt_format` is LLaVA's `conv_vicuna_v1` (or `llava_v1`), and `image_aspect_ratio: pad` squares each
image on the processor's mean colour before CLIP preprocessing (`expand2square`).
"""

from __future__ import annotations

import os
import re
import shutil

from absl import logging

from c3l_jax.convert import hf_dir, llava_hf, tensors
from c3l_jax.convert.common import Conversion, ConversionError, check_complete
from c3l_jax.models.configs import LLAVA_PROMPT_FORMATS, LlavaConfig, clip_from_hf, llama_from_hf

_LLAVA_IGNORED = (re.compile(r"text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
                  re.compile(r"vision\.embeddings\.position_ids"))
_CLIP_IGNORED = re.compile(r"(text_model|visual_projection|text_projection|logit_scale)(\..*)?"
                           r"|vision\.embeddings\.position_ids")
_TOWER = "model.vision_tower.vision_tower.vision_model."


def _llama_config(raw: dict):
  """transformers' `LlamaConfig` of the flat original config (the LLaVA class subclasses it)."""
  from transformers import LlamaConfig as HFLlamaConfig

  d = {k: v for k, v in raw.items()
       if k not in ("model_type", "architectures", "transformers_version") and v is not None}
  return HFLlamaConfig(**d)


def read_config(llava_path: str, clip_path: str, prompt_format: str = "vicuna_v1") -> LlavaConfig:
  """The `LlavaConfig` of an original-format directory and its CLIP tower's directory."""
  raw = hf_dir.read_config_json(llava_path, "--hf_path", "LLaVA")
  if not hf_dir.is_original_llava(raw):
    raise ConversionError(f"{llava_path!r} is not in the original LLaVA format (no "
                          "LlavaLlamaForCausalLM architecture / mm_* keys)")
  where = os.path.join(llava_path, "config.json")
  archs = raw.get("architectures") or []
  if any(not a.startswith("LlavaLlama") for a in archs):
    raise ConversionError(f"{where}: architecture {archs} is not supported (LLaVA-1.5 is "
                          "LlavaLlamaForCausalLM)")
  try:
    llama = _llama_config(raw)  # the mm_* keys become its attributes, as in LLaVA's LlavaConfig
  except (ValueError, TypeError) as e:
    raise ConversionError(f"{where}: {e}") from e
  mm = lambda name, default=None: getattr(llama, name, default)  # noqa: E731
  checks = [
      (mm("mm_projector_type", "linear") == "mlp2x_gelu",
       f"mm_projector_type {mm('mm_projector_type', 'linear')!r} is not LLaVA-1.5's mlp2x_gelu"),
      (not mm("mm_use_im_start_end", False), "mm_use_im_start_end (LLaVA v1.0 image markers)"),
      (not mm("mm_use_im_patch_token", False), "mm_use_im_patch_token (LLaVA v1.0 patch tokens)"),
      (mm("image_aspect_ratio") in (None, "", "pad", "square"),
       f"image_aspect_ratio {mm('image_aspect_ratio')!r} (LLaVA-NeXT's anyres)"),
      (mm("mm_patch_merge_type", "flat") == "flat",
       f"mm_patch_merge_type {mm('mm_patch_merge_type')!r} (LLaVA-NeXT)"),
      (mm("mm_vision_select_feature", "patch") in ("patch", "cls_patch"),
       f"mm_vision_select_feature {mm('mm_vision_select_feature')!r}"),
  ]
  for ok, what in checks:
    if not ok:
      raise ConversionError(f"{where}: unsupported {what}")
  if prompt_format not in LLAVA_PROMPT_FORMATS or prompt_format == "chat_template":
    raise ConversionError(f"unknown conversation mode {prompt_format!r} (vicuna_v1 or llava_v1)")
  clip = hf_dir.auto_config(clip_path, "--clip_path", "CLIP")
  vision = getattr(clip, "vision_config", clip)
  if getattr(vision, "model_type", "") != "clip_vision_model":
    raise ConversionError(f"{clip_path!r}: model_type {getattr(clip, 'model_type', None)!r} is not CLIP")
  try:
    text = llama_from_hf(llama)
    cfg = LlavaConfig(
        vision=clip_from_hf(vision), text=text, image_token_id=text.vocab_size,
        vision_feature_layer=int(mm("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=("default" if mm("mm_vision_select_feature", "patch") == "patch"
                                        else "full"),
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        prompt_format=prompt_format,
        image_aspect_ratio="pad" if mm("image_aspect_ratio") == "pad" else "resize")
  except (ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{where}: {e}") from e
  mm_hidden = mm("mm_hidden_size")
  if mm_hidden is not None and mm_hidden != cfg.vision.hidden_size:
    raise ConversionError(f"{where}: mm_hidden_size {mm_hidden} but the CLIP tower at {clip_path!r} "
                          f"is {cfg.vision.hidden_size} wide")
  return cfg


def _canonical(key: str) -> str | None:
  if key.startswith(_TOWER):
    return "vision." + key[len(_TOWER):]
  for old, new in (("model.mm_projector.0.", "projector.linear_1."),
                   ("model.mm_projector.2.", "projector.linear_2."), ("model.", "text."),
                   ("lm_head.", "lm_head.")):
    if key.startswith(old):
      return new + key[len(old):]
  return None


def prepare(llava_path: str, clip_path: str | None, prompt_format: str = "vicuna_v1") -> Conversion:
  """Read both configs and every tensor header; check every name (nothing read yet)."""
  if not clip_path:
    raw = hf_dir.read_config_json(llava_path, "--hf_path", "LLaVA")
    raise ConversionError(f"{llava_path!r} is an original-format LLaVA checkpoint without its vision "
                          f"tower: pass --clip_path=DIR, a local transformers copy of "
                          f"{raw.get('mm_vision_tower', 'the CLIP model')!r}")
  cfg = read_config(llava_path, clip_path, prompt_format)
  plan = llava_hf.conversion_plan(cfg)
  refs, unexpected, tower = {}, [], 0
  for key, ref in tensors.read_all(llava_path, "--hf_path"):
    name = _canonical(key)
    if name in plan:
      refs[name] = ref
      tower += name.startswith("vision.")
    elif name is None or not any(p.fullmatch(name) for p in _LLAVA_IGNORED):
      unexpected.append(f"{key} (in --hf_path)")
  for key, ref in tensors.read_all(clip_path, "--clip_path"):
    name = "vision." + key[len("vision_model."):] if key.startswith("vision_model.") else key
    if name in plan:
      refs.setdefault(name, ref)  # the LLaVA checkpoint's own (trained) tower wins
    elif not _CLIP_IGNORED.fullmatch(name):
      unexpected.append(f"{key} (in --clip_path)")
  check_complete(f"{llava_path} + {clip_path}", plan, refs, unexpected)
  notes = [f"prompt: LLaVA's conv_{prompt_format} template, image placeholder id {cfg.image_token_id} "
           f"(outside the vocabulary), image_aspect_ratio {cfg.image_aspect_ratio}",
           "vision tower: " + (f"{tower} tensors from the LLaVA checkpoint" if tower
                               else f"from {clip_path}")]

  def add_files(partial: str) -> None:
    # The LLaVA-format config.json stays behind: c3l_model.json replaces it.
    hf_dir.copy_processor_files(llava_path, partial, skip=("config.json",))
    if os.path.exists(os.path.join(clip_path, "preprocessor_config.json")):
      shutil.copy2(os.path.join(clip_path, "preprocessor_config.json"), partial)
    else:  # CLIPImageProcessor's defaults are OpenAI CLIP's preprocessing
      from transformers import CLIPImageProcessor

      logging.warning("%s has no preprocessor_config.json: using CLIP's default preprocessing at %d px",
                      clip_path, cfg.vision.image_size)
      size = cfg.vision.image_size
      CLIPImageProcessor(size={"shortest_edge": size},
                         crop_size={"height": size, "width": size}).save_pretrained(partial)

  return Conversion(cfg, plan, refs, f"{llava_path} (original LLaVA format) + {clip_path} (CLIP)",
                    add_files, notes)
