"""Vision-language models: vision tower + connector + decoder (big_vision PaliGemma's shape).

`VLM` is the composition every family shares: a subclass builds `language_model` (the Llama decoder)
and implements `encode_images` (`[N_img, C, H, W] -> [N_img, image_seq_length, D]`); `VLM` provides
`embed_image_and_text`, which scatters the image features into the positions of the expanded image
placeholder tokens, in order, exactly like transformers' `masked_scatter`, and the full forward. Everything
after the embeddings is the decoder's business, so prefill, decode, teacher-forced scoring and training
share one code path for every family (`sampling`, `scoring` and `train` see only this interface).

`VLM` itself lives in `c3l_jax.models.base` (re-exported here), so the families import it without
importing each other. Families: `LlavaVLM` (here) and `c3l_jax.models.minigpt4.MiniGPT4VLM`;
`build_vlm(cfg)` picks by `cfg.family`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from c3l_jax.models import layers as L
from c3l_jax.models.base import VLM
from c3l_jax.models.clip import CLIPVisionTower
from c3l_jax.models.configs import LlavaConfig
from c3l_jax.models.llama import KVCache, LlamaForCausalLM


class MultiModalProjector(nnx.Module):
  """linear_1 -> act (gelu) -> linear_2: vision width (x number of feature layers) -> decoder width."""

  def __init__(self, cfg: LlavaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d_in = cfg.vision.hidden_size * len(cfg.feature_layers)
    d = cfg.text.hidden_size
    kw = dict(bias=cfg.multimodal_projector_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = L.dense(d_in, d, ("vision_embed", "mlp"), **kw)
    self.linear_2 = L.dense(d, d, ("mlp", "embed"), **kw)
    self.act = cfg.projector_hidden_act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(L.activation(self.act)(self.linear_1(x)))


class LlavaVLM(VLM):
  """`LlavaForConditionalGeneration` in Flax NNX."""

  def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = L.dtype_of(cfg.dtype), L.dtype_of(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Logical axis names are metadata only; `c3l_jax.sharding` places the weights explicitly.
    with nnx.use_eager_sharding(False):
      self.vision_tower = CLIPVisionTower(cfg.vision, scan=cfg.scan_layers, remat=cfg.remat, **kw)
      self.multi_modal_projector = MultiModalProjector(cfg, **kw)
      self.language_model = LlamaForCausalLM(cfg.text, scan=cfg.scan_layers, remat=cfg.remat,
                                             attention=cfg.attention, **kw)

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """`[N_img, C, H, W]` -> projected features `[N_img, image_seq_length, D]`."""
    states = self.vision_tower(pixel_values, self.cfg.feature_layers)
    if self.cfg.vision_feature_select_strategy == "default":
      states = [s[:, 1:] for s in states]
    return self.multi_modal_projector(jnp.concatenate(states, axis=-1))


class FixedImageInputs:
  """How a batch's pictures enter a fixed-resolution family's model (LLaVA-1.5, MiniGPT-4): each picture
  is `[C, H, W]` and becomes the same number of image tokens, so a batch is their stack and RoPE
  positions count the tokens (no host-side positions). The seam a stage uses for every family:
  `batch(pictures)` -> the model's pixel input, `rope_positions(tokens, mask, pictures)` -> None or
  `[B, T, 3]`; `variable` says whether pictures differ in token count (`QwenImageInputs`)."""

  variable = False

  def batch(self, pictures):
    import numpy as np

    return np.stack(pictures)

  def rope_positions(self, tokens, mask, pictures):
    del tokens, mask, pictures
    return None


def image_inputs(cfg: Any, patch_bucket: int = 256):
  """The image-input seam of `cfg.family` (see `FixedImageInputs`)."""
  if getattr(cfg, "family", "llava15") == "qwen25vl":
    from c3l_jax.models.qwen25vl import QwenImageInputs

    return QwenImageInputs(cfg, patch_bucket)
  return FixedImageInputs()


def build_vlm(cfg: Any, rngs: nnx.Rngs) -> VLM:
  """The VLM of `cfg.family`: `LlavaVLM` (llava15), `MiniGPT4VLM` (minigpt4) or `Qwen25VLVLM`
  (qwen25vl)."""
  family = getattr(cfg, "family", "llava15")
  if family == "llava15":
    return LlavaVLM(cfg, rngs=rngs)
  if family == "minigpt4":
    from c3l_jax.models.minigpt4 import MiniGPT4VLM  # lazily: MiniGPT-4's towers load only when used

    return MiniGPT4VLM(cfg, rngs=rngs)
  if family == "qwen25vl":
    from c3l_jax.models.qwen25vl import Qwen25VLVLM

    return Qwen25VLVLM(cfg, rngs=rngs)
  raise ValueError(f"unknown model family {family!r}")


__all__ = ["FixedImageInputs", "KVCache", "LlavaVLM", "MultiModalProjector", "VLM", "build_vlm",
           "image_inputs"]
