"""`VLM`: the composition every vision-language family shares (big_vision PaliGemma's shape).

A family subclasses it (`c3l_jax.models.vlm.LlavaVLM`, `c3l_jax.models.minigpt4.MiniGPT4VLM`): it builds
`language_model` (the Llama decoder) and implements `encode_images`; `VLM` provides
`embed_image_and_text` and the full forward. Kept apart from the families so that they import it, not
each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from c3l_jax.models.llama import positions_and_mask, segments


class VLM(nnx.Module):
  """The shared composition. Subclasses set `cfg` (with `image_token_id`, `image_seq_length`, `text`),
  `language_model` (`LlamaForCausalLM`) and implement `encode_images`."""

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """`[N_img, C, H, W]` -> features in the decoder's width `[N_img, image_seq_length, D]`."""
    raise NotImplementedError

  def embed_image_and_text(self, tokens: jax.Array, pixel_values: jax.Array | None) -> jax.Array:
    """Token embeddings `[B, T, D]` with image features written over the image placeholder tokens.

    The k-th placeholder of the batch (row-major) receives the k-th row of the flattened image
    features, so the batch must hold exactly `N_img * image_seq_length` placeholders (checked on the
    host by the prompt builders; a mismatch here cannot be detected under jit). A placeholder id outside
    the vocabulary (MiniGPT-4's) is looked up as id 0 before being overwritten.
    """
    image_id = self.cfg.image_token_id
    is_image = tokens == image_id
    if image_id >= self.cfg.text.vocab_size:
      x = self.language_model.embed(jnp.where(is_image, 0, tokens))
    else:
      x = self.language_model.embed(tokens)
    if pixel_values is None:
      return x
    feats = self.encode_images(pixel_values).astype(x.dtype)
    feats = feats.reshape(-1, feats.shape[-1])
    is_image = is_image.reshape(-1)
    source = jnp.clip(jnp.cumsum(is_image) - 1, 0, feats.shape[0] - 1)
    flat = jnp.where(is_image[:, None], feats[source], x.reshape(-1, x.shape[-1]))
    return flat.reshape(x.shape)

  def __call__(self, tokens: jax.Array, pixel_values: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """Full forward: tokens `[B, T]` (image placeholders expanded), pixels `[N_img, C, H, W]`,
    padding mask `[B, T]` -> logits `[B, T, V]` (float32)."""
    x = self.embed_image_and_text(tokens, pixel_values)
    positions, mask = positions_and_mask(attention_mask, tokens.shape)
    hidden, _ = self.language_model.decode_hidden(x, positions, mask,
                                                  segment_ids=segments(attention_mask, tokens.shape))
    return self.language_model.logits(hidden)


__all__ = ["VLM"]
