r"""Training losses: token cross-entropy, the C3L contrastive loss (eq. 2-3), CG-VLM alignment.

C3L (Sec. 3.3). For an image I with scored samples S, the positive s+ is the sample with the highest
S(I2C), the others are negatives. A sample's text "Question: q Answer: a" is embedded by the LVLM's
input embeddings, e_s = Embedding(Q, A), and projected

    h_s = AvgPool(ReLU(ξ(e_s)))                                                          (2)

with ξ a trainable affine map. The anchor h_y is the same projection of the model's final hidden
states over the generation prompt (image + instruction), and

    L_c = -log( exp(sim(h_{s+}, h_y)/τ) / Σ_{s ∈ S} exp(sim(h_s, h_y)/τ) )               (3)

with sim = cosine and S = {s+} ∪ negatives (the positive is in the denominator, as in InfoNCE).
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

_EPS = 1e-8


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """L_r: mean next-token cross-entropy over target tokens only.

  Args:
    logits: `[B, T, V]` (any float dtype; computed in float32).
    targets: `[B, T]` int token ids.
    weights: `[B, T]` 1 on target tokens, 0 on prompt and padding.
  Returns:
    the loss (sum of weighted CE / max(sum of weights, 1)) and the number of target tokens.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  n = jnp.sum(weights)
  return jnp.sum(ce * weights) / jnp.maximum(n, 1.0), n


class ProjectionHead(nnx.Module):
  """ξ in eq. 2: a trainable affine map d -> d."""

  def __init__(self, features: int, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    with nnx.use_eager_sharding(False):
      self.proj = nnx.Linear(features, features, param_dtype=param_dtype, rngs=rngs,
                             kernel_metadata={"out_sharding": ("embed", "mlp")},
                             bias_metadata={"out_sharding": ("mlp",)})

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(x.astype(self.proj.kernel[...].dtype))


def pooled_representation(head: ProjectionHead, x: jax.Array, mask: jax.Array) -> jax.Array:
  """Eq. 2: h = AvgPool(ReLU(ξ(x))) over the valid positions of `x [..., T, D]` (`mask [..., T]`).

  All-masked rows give zeros (no NaN).
  """
  y = jax.nn.relu(head(x)).astype(jnp.float32)
  m = mask.astype(jnp.float32)[..., None]
  return jnp.sum(y * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1.0)


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity over the last axis. The norms are sqrt(|x|^2 + eps^2): differentiable at 0, so
  all-padding (zero) representations give 0 and finite gradients."""
  norm = lambda x: jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _EPS ** 2)
  return jnp.sum((a / norm(a)) * (b / norm(b)), axis=-1)


def contrastive_loss(h_samples: jax.Array, sample_valid: jax.Array, positive_index: jax.Array,
                     h_anchor: jax.Array, tau: float, group_valid: jax.Array) -> jax.Array:
  """Eq. 3, averaged over the valid image groups.

  Args:
    h_samples: `[G, N, D]` sample representations (eq. 2) of each group (image).
    sample_valid: `[G, N]` bool; padding samples are excluded from the denominator.
    positive_index: `[G]` int, which sample of the group is s+.
    h_anchor: `[G, D]` anchor representations h_y.
    tau: temperature τ.
    group_valid: `[G]` bool; a group also needs >= 2 valid samples to count.
  Returns:
    scalar float32 loss; 0 (with finite gradients) when no group counts.
  """
  sims = cosine(h_samples.astype(jnp.float32), h_anchor.astype(jnp.float32)[:, None, :]) / tau
  sims = jnp.where(sample_valid, sims, -1e30)  # padding samples leave the denominator
  log_norm = jax.nn.logsumexp(sims, axis=-1)
  positive = jnp.take_along_axis(sims, positive_index[:, None], axis=-1)[:, 0]
  counts = jnp.sum(sample_valid, axis=-1)
  use = group_valid & (counts >= 2)
  per_group = jnp.where(use, log_norm - positive, 0.0)
  return jnp.sum(per_group) / jnp.maximum(jnp.sum(use), 1)


def select_groups(i2c: Sequence[float], group_ids: Sequence[Hashable], max_negatives: int
                  ) -> list[tuple[int, list[int]]]:
  """Per-image positives and negatives from S(I2C) (host side).

  For each group (image) with >= 2 samples: the positive is its highest-S(I2C) sample, the negatives
  its other samples by S(I2C) descending, at most `max_negatives`; ties go to the earlier sample.
  Returns `(positive, members)` per group in order of first appearance, where `members` lists the
  positive first, then the negatives (indices into the inputs).
  """
  groups: dict[Hashable, list[int]] = {}
  for i, g in enumerate(group_ids):
    groups.setdefault(g, []).append(i)
  out = []
  for members in groups.values():
    if len(members) < 2:
      continue
    ranked = sorted(members, key=lambda i: (-float(i2c[i]), i))
    out.append((ranked[0], ranked[:1 + max_negatives]))
  return out


class CGVLMTemperature(nnx.Module):
  """The learnable temperature of the CG-VLM alignment loss, stored as a log, init 0.07."""

  def __init__(self, init: float = 0.07):
    self.log_temperature = nnx.Param(jnp.asarray(np.log(init), jnp.float32))

  def __call__(self) -> jax.Array:
    """The temperature, clipped to [0.01, 1]."""
    return jnp.clip(jnp.exp(self.log_temperature[...]), 0.01, 1.0)


def cgvlm_alignment_loss(patch_features: jax.Array, patch_mask: jax.Array | None,
                         token_embeddings: jax.Array, token_mask: jax.Array,
                         temperature: jax.Array) -> jax.Array:
  """CG-VLM contrastive alignment ("Contrastive Vision-Language Alignment Makes Efficient
  Instruction Learner", 2023): symmetric InfoNCE over image-caption pairs of a batch.

  s(i, j) = mean over caption j's valid tokens t of cos(v_i, e_{j,t}), v_i the mean-pooled projected
  patch features of image i; logits = s / temperature; CE image->text and text->image with the
  diagonal as targets, averaged.

  Args:
    patch_features: `[B, P, D]` projected patches.  patch_mask: `[B, P]` or None.
    token_embeddings: `[B, T, D]` caption token embeddings.  token_mask: `[B, T]`.
    temperature: scalar (see `CGVLMTemperature`).
  """
  pf = patch_features.astype(jnp.float32)
  pm = (jnp.ones(pf.shape[:2]) if patch_mask is None else patch_mask).astype(jnp.float32)[..., None]
  v = jnp.sum(pf * pm, axis=1) / jnp.maximum(jnp.sum(pm, axis=1), 1.0)  # [B, D]
  cos = cosine(v[:, None, None, :], token_embeddings.astype(jnp.float32)[None, :, :, :])  # [Bi, Bj, T]
  tm = token_mask.astype(jnp.float32)[None]
  sim = jnp.sum(cos * tm, axis=-1) / jnp.maximum(jnp.sum(tm, axis=-1), 1.0)  # [Bi, Bj]
  logits = sim / temperature
  labels = jnp.arange(sim.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))
