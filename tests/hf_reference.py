"""Tiny random transformers LLaVA checkpoints and the torch reference computations the tests compare to."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   image_size=28, patch_size=14, projection_dim=16)
TINY_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rms_norm_eps=1e-6)
IMAGE_TOKEN = 127


def hf_llava_config(vision: dict | None = None, text: dict | None = None, **top):
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

  v = CLIPVisionConfig(**{**TINY_VISION, **(vision or {})})
  t = LlamaConfig(**{**TINY_TEXT, **(text or {})})
  top.setdefault("image_token_index", IMAGE_TOKEN)
  return LlavaConfig(vision_config=v, text_config=t, **top)


def make_hf_llava(path: str, seed: int = 0, vision: dict | None = None, text: dict | None = None,
                  **top):
  """A random `LlavaForConditionalGeneration` saved (safetensors) under `path`; returns the model."""
  import torch
  from transformers import LlavaForConditionalGeneration

  torch.manual_seed(seed)
  model = LlavaForConditionalGeneration(hf_llava_config(vision, text, **top)).eval()
  # Random init leaves norms at exactly 1 / 0 and biases at 0: perturb everything so a missed or
  # transposed weight shows up in the logits.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def image_seq_length(model) -> int:
  cfg = model.config
  n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
  return n + (1 if cfg.vision_feature_select_strategy == "full" else 0)


def llava_inputs(model, batch: int = 2, text_len: int = 6, seed: int = 0, left_pad: int = 0):
  """Token ids with one expanded `<image>` run per row, pixels `[B, 3, S, S]` and a padding mask.

  Row 0 is unpadded; the other rows are left-padded with `left_pad` pad tokens (id 0).
  """
  rng = np.random.default_rng(seed)
  n_img = image_seq_length(model)
  vocab = model.config.text_config.vocab_size
  rows, masks = [], []
  for b in range(batch):
    pre = rng.integers(3, IMAGE_TOKEN - 1, size=2)
    post = rng.integers(3, IMAGE_TOKEN - 1, size=text_len)
    ids = np.concatenate([[1], pre, np.full(n_img, IMAGE_TOKEN), post])
    pad = left_pad if b > 0 else 0
    rows.append(np.concatenate([np.zeros(pad, int), ids]))
    masks.append(np.concatenate([np.zeros(pad, int), np.ones(len(ids), int)]))
  width = max(len(r) for r in rows)
  tokens = np.stack([np.pad(r, (width - len(r), 0)) for r in rows])
  mask = np.stack([np.pad(m, (width - len(m), 0)) for m in masks])
  size = model.config.vision_config.image_size
  pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
  assert tokens.max() < vocab
  return tokens.astype(np.int32), pixels, mask.astype(np.int32)


def torch_logits(model, tokens, pixels, mask) -> np.ndarray:
  """transformers' logits with positions counting real tokens only (as generate() does)."""
  import torch

  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                pixel_values=torch.as_tensor(pixels),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                position_ids=torch.as_tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()


def convert_cli(hf_path: str, out: str, *extra: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "c3l_jax.convert", f"--hf_path={hf_path}", f"--out={out}", *extra],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def rewrite_layout(src: str, dst: str, rename, shards: int = 1) -> None:
  """Copy the checkpoint at `src` to `dst` with keys renamed by `rename` and split into `shards` files."""
  from safetensors.numpy import save_file

  from c3l_jax.convert import iter_safetensors

  os.makedirs(dst, exist_ok=True)
  tensors = {}
  for name in sorted(os.listdir(src)):
    if name.endswith(".safetensors"):
      tensors.update({rename(k): np.array(v) for k, v in iter_safetensors(os.path.join(src, name))})
    else:
      with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
        g.write(f.read())
  keys = sorted(tensors)
  weight_map = {}
  for i in range(shards):
    part = keys[i::shards]
    fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
    save_file({k: tensors[k] for k in part}, os.path.join(dst, fname))
    weight_map.update({k: fname for k in part})
  if shards > 1:
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)
