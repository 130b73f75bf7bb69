"""MiniGPT-4 (Zhu et al., 2023): EVA ViT-g + BLIP-2 Q-Former + `llama_proj` into Vicuna / Llama-2.

Matches `MiniGPT4.encode_img` of the MiniGPT-4 repository (minigpt4/models/minigpt4.py):

    image_embeds = ln_vision(visual_encoder(image))                 # EVAViT: Blip2VisionModel output
    has_qformer:  inputs_llama = llama_proj(Qformer.bert(query_tokens, image_embeds).last_hidden_state)
    Llama-2 variant (no Q-Former):
                  image_embeds = image_embeds[:, 1:]                 # drop CLS
                  inputs_llama = llama_proj(image_embeds.view(B, N / 4, 4 * D))  # 4 adjacent patches

The image features replace the `image_seq_length` placeholder tokens that the prompt builder writes where
the template has `<ImageHere>`, through the shared `VLM.embed_image_and_text`; the decoder is the project's
Llama (`LlamaForCausalLM`), so sampling, scoring and training run unchanged.
"""

from __future__ import annotations

import jax
from flax import nnx

from c3l_jax.models import layers as L
from c3l_jax.models.configs import MiniGPT4Config
from c3l_jax.models.eva_vit import EVAViT
from c3l_jax.models.llama import LlamaForCausalLM
from c3l_jax.models.qformer import QFormer
from c3l_jax.models.base import VLM


class MiniGPT4VLM(VLM):
  """`vision_tower` (EVA ViT-g + ln_vision) -> `qformer` (or 4-patch concat) -> `llama_proj` -> decoder."""

  def __init__(self, cfg: MiniGPT4Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = L.dtype_of(cfg.dtype), L.dtype_of(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Logical axis names are metadata only; `c3l_jax.sharding` places the weights explicitly.
    with nnx.use_eager_sharding(False):
      self.vision_tower = EVAViT(cfg.vision, scan=cfg.scan_layers, remat=cfg.remat, **kw)
      self.qformer = QFormer(cfg.qformer, **kw) if cfg.qformer is not None else None
      self.llama_proj = L.dense(cfg.projector_input_size, cfg.text.hidden_size,
                                ("vision_embed", "mlp"), bias=True, **kw)
      self.language_model = LlamaForCausalLM(cfg.text, scan=cfg.scan_layers, remat=cfg.remat,
                                             attention=cfg.attention, **kw)

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """`[N_img, C, H, W]` -> `llama_proj` outputs `[N_img, image_seq_length, D]`."""
    feats = self.vision_tower(pixel_values)
    if self.qformer is not None:
      feats = self.qformer(feats)
    else:
      feats = feats[:, 1:]
      b, n, d = feats.shape
      m = self.cfg.merge_patches
      feats = feats.reshape(b, n // m, d * m)
    return self.llama_proj(feats)


__all__ = ["MiniGPT4VLM"]
