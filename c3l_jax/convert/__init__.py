r"""Convert published checkpoints into a self-contained c3l-jax model directory.

    python -m c3l_jax.convert --hf_path=llava-1.5-7b-hf --out=checkpoints/llava15-7b [--dtype=bfloat16]
    python -m c3l_jax.convert --hf_path=llava-v1.5-7b --clip_path=clip-vit-large-patch14-336 \
        --out=checkpoints/llava15-7b-orig
    python -m c3l_jax.convert --family=minigpt4 --blip2_path=blip2-flan-t5-xxl --llm_path=vicuna-7b-v0 \
        --proj_path=prerained_minigpt4_7b.pth --out=checkpoints/minigpt4-7b [--variant=llama2] [--image_size=N]
    ... --dry_run    # read configs and tensor headers only, print the plan, write nothing

One module per source format, each turning its files into a `common.Conversion` (config + plan + tensor
references, every name checked, nothing read yet):
- `llava_hf`: transformers' LLaVA (`llava-hf/llava-1.5-7b-hf`, any `LlavaForConditionalGeneration` save);
- `llava_original`: the LLaVA repository's `LlavaLlamaForCausalLM` (`liuhaotian/llava-v1.5-7b`) + CLIP;
- `minigpt4`: BLIP-2 + Llama / Vicuna + MiniGPT-4's `llama_proj`;
- `qwen25vl`: transformers' Qwen2.5-VL (`Qwen/Qwen2.5-VL-7B-Instruct`; published and transformers-5 keys).
`--hf_path` alone picks Qwen2.5-VL by the config's `model_type`; otherwise `--family=llava15` (the default) tells the two LLaVA formats apart by the config's architecture and
`mm_*` keys. `tensors` reads safetensors headers and torch pickles lazily; `hf_dir` reads configs with
transformers' own classes; `interpolate` resizes ViT position embeddings; `common.write_model` streams
the parameters into the output (one at a time: peak memory is about twice the largest stacked
parameter) and `common.dry_run_report` describes it. The output directory's layout is
`c3l_jax.checkpoint`'s.
"""

from __future__ import annotations

from c3l_jax.convert import hf_dir, llava_hf, llava_original, minigpt4, qwen25vl
from c3l_jax.convert.common import Conversion, ConversionError, dry_run_report, write_model
from c3l_jax.convert.interpolate import bicubic_resize_matrix, interpolate_position_embedding
from c3l_jax.convert.llava_hf import canonical_name, conversion_plan, read_hf_config
from c3l_jax.convert.minigpt4 import minigpt4_conversion_plan, read_llama_proj
from c3l_jax.convert.tensors import (ArrayRef, TensorRef, TorchRef, iter_safetensors,
                                     read_safetensors_index)
from c3l_jax.models.configs import LlavaConfig, MiniGPT4Config, Qwen25VLConfig


def prepare_llava(hf_path: str, clip_path: str | None = None, conv_mode: str = "vicuna_v1"
                  ) -> Conversion:
  """A LLaVA-1.5 directory in either format: transformers' (`llava_hf`) or the LLaVA repository's
  (`llava_original`, which needs `clip_path`)."""
  if hf_dir.is_original_llava(hf_dir.read_config_json(hf_path, "--hf_path", "LLaVA")):
    return llava_original.prepare(hf_path, clip_path, conv_mode)
  return llava_hf.prepare(hf_path)


def prepare_hf(hf_path: str, clip_path: str | None = None, conv_mode: str = "vicuna_v1") -> Conversion:
  """A transformers-format directory of any family the config names: Qwen2.5-VL (`model_type`
  qwen2_5_vl) or LLaVA-1.5 in either format (`prepare_llava`)."""
  if qwen25vl.is_qwen25vl(hf_dir.read_config_json(hf_path, "--hf_path", "VLM")):
    return qwen25vl.prepare(hf_path)
  return prepare_llava(hf_path, clip_path, conv_mode)


def convert(hf_path: str, out: str, dtype: str | None = None, clip_path: str | None = None,
            conv_mode: str = "vicuna_v1") -> LlavaConfig | Qwen25VLConfig:
  """Convert a LLaVA-1.5 directory (either format) or a Qwen2.5-VL directory into the model directory
  `out`; returns its config.

  Args:
    dtype: storage dtype of the parameters (`float32`, `bfloat16`, `float16`); None keeps each tensor's.
    clip_path: the original format's CLIP tower directory (ignored for transformers' format).
    conv_mode: the original format's conversation template, `vicuna_v1` (LLaVA-1.5's) or `llava_v1`.
  Raises:
    ConversionError: a missing directory / config / weights, an unsupported config, missing or
      unexpected tensors (all of them listed), or a tensor whose shape disagrees with the config.
  """
  conv = prepare_hf(hf_path, clip_path, conv_mode)
  write_model(conv, out, dtype)
  return conv.cfg


def convert_minigpt4(blip2_path: str, llm_path: str, proj_path: str, out: str, dtype: str | None = None,
                     variant: str | None = None, image_size: int | None = None) -> MiniGPT4Config:
  """Convert BLIP-2 + Llama + MiniGPT-4's `llama_proj` into the model directory `out` (see `minigpt4`)."""
  conv = minigpt4.prepare(blip2_path, llm_path, proj_path, variant, image_size)
  write_model(conv, out, dtype)
  return conv.cfg


__all__ = ["ArrayRef", "Conversion", "ConversionError", "TensorRef", "TorchRef", "bicubic_resize_matrix",
           "canonical_name", "conversion_plan", "convert", "convert_minigpt4", "dry_run_report",
           "interpolate_position_embedding", "iter_safetensors", "minigpt4_conversion_plan",
           "prepare_hf", "prepare_llava", "read_hf_config", "read_llama_proj", "read_safetensors_index"]
