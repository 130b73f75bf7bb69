"""A transformers checkpoint directory: its config (read by transformers), format, files and templates."""

from __future__ import annotations

import json
import os
import shutil

from c3l_jax.convert.common import ConversionError
from c3l_jax.convert.tensors import INDEX_FILES, WEIGHT_SUFFIXES

CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def read_config_json(path: str, flag: str, what: str) -> dict:
  """The raw `config.json` of a checkpoint directory (for format detection), with clear errors."""
  if not os.path.isdir(path):
    raise ConversionError(f"{flag} {path!r} is not a directory")
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise ConversionError(f"{path!r} has no config.json: not a transformers {what} directory")
  try:
    with open(file) as f:
      return json.load(f)
  except ValueError as e:
    raise ConversionError(f"{file}: not valid JSON ({e})") from None


def auto_config(path: str, flag: str, what: str):
  """transformers' config object of a directory (`AutoConfig`: omitted fields get their defaults)."""
  read_config_json(path, flag, what)
  from transformers import AutoConfig

  try:
    return AutoConfig.from_pretrained(path, local_files_only=True)
  except (ValueError, KeyError, TypeError, OSError) as e:
    raise ConversionError(f"{os.path.join(path, 'config.json')}: transformers cannot read it as a "
                          f"{what} config: {e}") from None


def is_original_llava(raw: dict) -> bool:
  """True for a LLaVA-repository `config.json` (by its architecture and `mm_*` keys), whose
  `model_type` "llava" would otherwise read as transformers' LLaVA."""
  archs = raw.get("architectures") or []
  return "text_config" not in raw and (any(a.startswith("LlavaLlama") for a in archs)
                                       or any(k.startswith("mm_") for k in raw))


def chat_template_source(path: str) -> str | None:
  """Where a transformers directory keeps its chat template (None: nowhere)."""
  for name in CHAT_TEMPLATE_FILES:
    if os.path.exists(os.path.join(path, name)):
      return name
  tokenizer_config = os.path.join(path, "tokenizer_config.json")
  if os.path.exists(tokenizer_config):
    with open(tokenizer_config) as f:
      if json.load(f).get("chat_template"):
        return "tokenizer_config.json"
  return None


def copy_processor_files(src_dir: str, out: str, skip: tuple[str, ...] = ()) -> None:
  """Copy tokenizer, processor, chat template and HF config files (everything but the weights)."""
  for name in os.listdir(src_dir):
    src = os.path.join(src_dir, name)
    if (os.path.isfile(src) and not name.endswith(WEIGHT_SUFFIXES) and name not in INDEX_FILES
        and name not in skip):
      shutil.copy2(src, os.path.join(out, name))
