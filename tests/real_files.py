"""The published files in `tests/fixtures/` (see its SOURCES.md), and checkpoints shaped like them.

`published_7b_headers` writes the real llava-1.5-7b-hf shard files as they would be on disk after a
download (each tensor's header entry, the data region left sparse: nothing is allocated), with every
shape taken from transformers' own `LlavaForConditionalGeneration` built from the real `config.json` on
the meta device. So a dry run over them checks our reading of the config against transformers'.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
LLAVA_HF_7B = os.path.join(FIXTURES, "llava-1.5-7b-hf")
LLAVA_ORIGINAL_7B = os.path.join(FIXTURES, "llava-v1.5-7b-original")
QWEN25VL_3B = os.path.join(FIXTURES, "qwen2.5-vl-3b-instruct")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json",
                   "chat_template.jinja", "generation_config.json")

# transformers 5 names its modules `model.language_model.*`; the hub files keep the 4.x layout.
_HUB_TO_MODULE = (("language_model.model.", "model.language_model."),
                  ("language_model.lm_head.", "lm_head."),
                  ("vision_tower.vision_model.", "model.vision_tower."),
                  ("multi_modal_projector.", "model.multi_modal_projector."))


def copy_files(src: str, dst: str, names) -> None:
  os.makedirs(dst, exist_ok=True)
  for name in names:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def transformers_shapes(config_dir: str) -> dict[str, tuple[int, ...]]:
  """Module-name -> shape of transformers' LLaVA built from `config_dir/config.json` (meta device)."""
  import torch
  from transformers import AutoConfig, LlavaForConditionalGeneration

  with torch.device("meta"):
    model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(config_dir))
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def hub_to_module(name: str) -> str:
  for old, new in _HUB_TO_MODULE:
    if name.startswith(old):
      return new + name[len(old):]
  return name


def write_sparse_safetensors(path: str, shapes: dict[str, tuple[int, ...]], dtype: str = "F16",
                             itemsize: int = 2, shape_override: dict | None = None) -> int:
  """A safetensors file with these tensors' header and a sparse (unallocated) data region."""
  header, offset = {}, 0
  for name in sorted(shapes):
    shape = (shape_override or {}).get(name, shapes[name])
    n = 1
    for d in shape:
      n *= d
    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n * itemsize]}
    offset += n * itemsize
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    f.truncate(8 + len(blob) + offset)
  return offset


def published_7b_headers(dst: str, shape_override: dict | None = None) -> int:
  """The real llava-1.5-7b-hf directory (config, index, tokenizer, processor) with its three shard files
  as sparse safetensors; returns the total data bytes written into the headers."""
  shutil.copytree(LLAVA_HF_7B, dst)
  with open(os.path.join(dst, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  shapes = transformers_shapes(dst)
  files: dict[str, dict[str, tuple[int, ...]]] = {}
  for name, file in weight_map.items():
    files.setdefault(file, {})[name] = shapes[hub_to_module(name)]
  return sum(write_sparse_safetensors(os.path.join(dst, file), tensors, shape_override=shape_override)
             for file, tensors in files.items())


# The tiny sizes `tiny_real_llava` gives the published config (image 336 / patch 14 as published: 576
# image tokens).
TINY_REAL_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
TINY_REAL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        projection_dim=16)


def tiny_real_llava(root, text: dict, vision: dict) -> dict:
  """A tiny transformers LLaVA under `root` with the published llava-1.5-7b-hf files: its config.json's
  spelling (partial text / vision configs, the sizes `text` / `vision` added), vocab 32064, CLIP 336 px /
  patch 14 (576 image tokens), and every real tokenizer / processor file; converted to `root/ours`.
  Returns `{root, hf, ours, torch}` (`torch`: the fp32 transformers model, eval mode)."""
  import pathlib
  import subprocess
  import sys

  import torch
  from transformers import LlavaForConditionalGeneration

  root = pathlib.Path(root)
  hf = root / "hf"
  shutil.copytree(LLAVA_HF_7B, hf, ignore=shutil.ignore_patterns("model.safetensors.index.json"))
  with open(hf / "config.json") as f:
    config = json.load(f)
  config["text_config"].update(text)
  config["vision_config"].update(vision)
  (hf / "config.json").write_text(json.dumps(config, indent=2))
  torch.manual_seed(0)
  model = LlavaForConditionalGeneration._from_config(
      LlavaForConditionalGeneration.config_class.from_pretrained(hf), torch_dtype=torch.float32)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
    model.lm_head.weight.mul_(8.0)  # next-token distributions far from uniform
    model.model.multi_modal_projector.linear_2.weight.mul_(10.0)  # the image moves them
  model.save_pretrained(root / "saved")
  for name in os.listdir(root / "saved"):  # the weights only: the published config.json stays
    if name.endswith(".safetensors") or name.endswith(".index.json"):
      shutil.copy(root / "saved" / name, hf / name)
  model = LlavaForConditionalGeneration.from_pretrained(hf, torch_dtype=torch.float32).eval()
  assert model.config.text_config.vocab_size == 32064
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "c3l_jax.convert", f"--hf_path={hf}", f"--out={root / 'ours'}"],
                        cwd=repo, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  return dict(root=root, hf=str(hf), ours=str(root / "ours"), torch=model)

def qwen_hub_to_module(name: str) -> str:
  """Published Qwen2.5-VL name (`visual.*`, `model.*`) -> transformers 5's module name."""
  if name.startswith("visual."):
    return "model." + name
  if name.startswith("model."):
    return "model.language_model." + name[len("model."):]
  return name


def published_qwen25vl_3b_headers(dst: str) -> int:
  """The real Qwen2.5-VL-3B-Instruct small files with its two shard files as sparse safetensors (bf16),
  every shape taken from transformers' `Qwen2_5_VLForConditionalGeneration` built from the real
  `config.json` on the meta device; returns the total data bytes."""
  import torch
  from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

  shutil.copytree(QWEN25VL_3B, dst)
  with open(os.path.join(dst, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  with torch.device("meta"):
    model = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(dst))
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  files: dict[str, dict[str, tuple[int, ...]]] = {}
  for name, file in weight_map.items():
    files.setdefault(file, {})[name] = shapes[qwen_hub_to_module(name)]
  return sum(write_sparse_safetensors(os.path.join(dst, file), tensors, dtype="BF16")
             for file, tensors in files.items())
