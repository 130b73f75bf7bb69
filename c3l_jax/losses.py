r"""Training losses: token cross-entropy (L_r), the C3L contrastive loss (eq. 2-3), CG-VLM alignment.

Pure JAX functions over arrays (no model knowledge); the only module here is the projection ξ of eq. 2
and the CG-VLM temperature. Everything is computed in float32 whatever the input dtype.

L_r (C3L Sec. 3.2): the standard next-token cross-entropy on the answer tokens of the top-S(I2C)
samples (`token_cross_entropy`).

C3L contrastive learning module (Sec. 3.3). For an image I with scored samples S, the positive s+ is
the sample with the highest S(I2C), the others are negatives (`select_groups`). A sample [Q, A] is
embedded by the LVLM's text embeddings, e_s = Embedding(Q, A) `[l, d]`, and projected

    h_s = AvgPool(ReLU(ξ(e_s)))                                                          (2)

with ξ a trainable affine map d -> d (`ProjectionHead`, `pooled_representation`). The anchor h_y is
the same projection of what the model produces for the image + instruction, and

    L_c = -log( exp(sim(h_{s+}, h_y)/τ) / Σ_{s ∈ S} exp(sim(h_s, h_y)/τ) )               (3)

with sim = cosine similarity (`contrastive_loss`).

Readings of the paper where it is not explicit:
  * Eq. 3's denominator runs over ŝ ∈ S. The text calls "the remaining data samples ŝ ∈ S" the
    negatives, so as printed the denominator sums over the negatives only (`denominator="negatives"`;
    L_c can then be negative, and it is unbounded below as the positive outgrows the negatives). The
    InfoNCE form of the cited framework (Lee et al. 2020) sums over the positive and the negatives
    (`denominator="all"`, the default: L_c >= 0, and L_c = log|S| when all similarities are equal).
    `config.train.contrastive_denominator` picks the reading.
  * The text writes both "ξ(·) = AvgPool(ReLU(·))" and "affine transformation ξ with the ReLU and
    AvgPool"; we read it as affine -> ReLU -> mean over the sequence (valid positions only).
  * The paper defines L_c per image; over a batch we average it over the images (groups) that have
    a valid positive and at least one valid negative.
  * τ is not given in the paper; it is `config.train.tau`.

CG-VLM (Liu et al. 2023, "Contrastive Vision-Language Alignment Makes Efficient Instruction
Learner"): the contrastive half of its alignment objective, "maximize the averaged similarity between
pooled image-patch features and text-token embeddings", as a symmetric CLIP-style InfoNCE over the
image-caption pairs of a batch (`cgvlm_alignment_loss`, `CGVLMTemperature`).
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

_EPS = 1e-8
_MASKED = -1e30  # logit of a sample outside the denominator (exp underflows to exactly 0)

CGVLM_INIT_TEMPERATURE = 0.07
CGVLM_MIN_TEMPERATURE = 0.01
CGVLM_MAX_TEMPERATURE = 1.0


# --------------------------------------------------------------------------------------------- L_r


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """L_r (C3L Sec. 3.2): mean next-token cross-entropy over the target tokens only.

  Args:
    logits: `[B, T, V]` any float dtype; the log-softmax is computed in float32.
    targets: `[B, T]` int token ids. Ids at weight-0 positions are ignored (they may be out of range,
      e.g. -100 padding).
    weights: `[B, T]` 1 on target (answer) tokens, 0 on prompt and padding (bool or float).
  Returns:
    `(loss, n_tokens)`: float32 scalars, loss = Σ weights·CE / max(Σ weights, 1), n_tokens = Σ weights.
  """
  weights = weights.astype(jnp.float32)
  targets = jnp.where(weights != 0, targets, 0)  # out-of-range ids at masked positions give NaN CE
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  n = jnp.sum(weights)
  return jnp.sum(ce * weights) / jnp.maximum(n, 1.0), n


# ------------------------------------------------------------------------------ C3L, eq. 2 and 3


class ProjectionHead(nnx.Module):
  """ξ in eq. 2: a trainable affine map `[..., D] -> [..., D]` (kernel `[D, D]` + bias `[D]`).

  The kernel carries logical axes `("embed", "mlp")` and the bias `("mlp",)` as `out_sharding`
  metadata (placement is left to `c3l_jax.sharding`, as for the model weights).
  """

  def __init__(self, features: int, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    with nnx.use_eager_sharding(False):
      self.proj = nnx.Linear(features, features, param_dtype=param_dtype, rngs=rngs,
                             kernel_metadata={"out_sharding": ("embed", "mlp")},
                             bias_metadata={"out_sharding": ("mlp",)})

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [..., D]` -> `ξ(x) [..., D]` in the parameter dtype."""
    return self.proj(x.astype(self.proj.kernel[...].dtype))


def pooled_representation(head: ProjectionHead, x: jax.Array, mask: jax.Array) -> jax.Array:
  """Eq. 2: h = AvgPool(ReLU(ξ(x))), the mean over the valid positions only.

  Args:
    head: ξ.
    x: `[..., T, D]` embeddings e_s (samples) or hidden states (anchor).
    mask: `[..., T]` 1/True on valid positions, 0/False on padding.
  Returns:
    `[..., D]` float32; rows with no valid position give zeros (no NaN).
  """
  y = jax.nn.relu(head(x).astype(jnp.float32))
  m = mask.astype(jnp.float32)[..., None]
  y = jnp.where(m > 0, y, 0.0)  # padding values never reach the forward value
  return jnp.sum(y * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1.0)


def cosine(a: jax.Array, b: jax.Array, eps: float = _EPS) -> jax.Array:
  """sim(·, ·) of eq. 3: cosine similarity over the last axis, `[..., D] x [..., D] -> [...]`.

  The norms are sqrt(|x|^2 + eps^2): differentiable at 0, so zero (all-padding) representations give
  similarity 0 and finite gradients.
  """
  return jnp.sum(_normalize(a, eps) * _normalize(b, eps), axis=-1)


def _normalize(x: jax.Array, eps: float = _EPS) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps * eps)


CONTRASTIVE_DENOMINATORS = ("all", "negatives")


def contrastive_loss(h_samples: jax.Array, sample_valid: jax.Array, positive_index: jax.Array,
                     h_anchor: jax.Array, tau: float | jax.Array, group_valid: jax.Array,
                     denominator: str = "all") -> jax.Array:
  """L_c of eq. 3, averaged over the valid image groups.

  Per group g (one image), with sim_s = cos(h_s, h_y)/τ, h_y = h_anchor[g] and s+ = positive_index[g]:
  L_c(g) = -sim_{s+} + log Σ_s exp(sim_s), the sum over the group's valid samples s — the positive
  and the negatives with `denominator="all"` (= -log softmax(sim)[s+], InfoNCE), the negatives only
  with `denominator="negatives"` (eq. 3 as printed). Padding samples are excluded. A group counts when
  group_valid[g], its positive is a valid sample and it has >= 2 valid samples; the loss is the mean
  of L_c over counted groups, exactly 0 (with finite gradients) when none counts. Padding samples and
  uncounted groups receive zero gradient.

  Args:
    h_samples: `[G, N, D]` sample representations (eq. 2), positive and negatives, per group.
    sample_valid: `[G, N]` bool.
    positive_index: `[G]` int index into N of s+.
    h_anchor: `[G, D]` anchor representations h_y.
    tau: temperature τ > 0.
    group_valid: `[G]` bool.
    denominator: "all" or "negatives" (which samples eq. 3's denominator sums over).
  Returns:
    scalar float32.
  """
  if denominator not in CONTRASTIVE_DENOMINATORS:
    raise ValueError(f"contrastive_loss: denominator must be one of {CONTRASTIVE_DENOMINATORS}, "
                     f"got {denominator!r}")
  sample_valid = sample_valid.astype(bool)
  sims = cosine(h_samples.astype(jnp.float32), h_anchor.astype(jnp.float32)[:, None, :]) / tau
  positive_index = positive_index.astype(jnp.int32)[:, None]
  sim_pos = jnp.take_along_axis(sims, positive_index, axis=-1)[:, 0]
  in_denominator = sample_valid
  if denominator == "negatives":
    in_denominator &= jnp.arange(sims.shape[-1])[None, :] != positive_index
  # Stable log-sum-exp; samples outside the denominator get a logit whose exp underflows to 0.
  log_denominator = jax.nn.logsumexp(jnp.where(in_denominator, sims, _MASKED), axis=-1)
  log_p_pos = sim_pos - log_denominator
  positive_valid = jnp.take_along_axis(sample_valid, positive_index, axis=-1)[:, 0]
  use = group_valid.astype(bool) & positive_valid & (jnp.sum(sample_valid, axis=-1) >= 2)
  per_group = jnp.where(use, -log_p_pos, 0.0)
  return jnp.sum(per_group) / jnp.maximum(jnp.sum(use), 1).astype(jnp.float32)


def select_groups(i2c: Sequence[float], group_ids: Sequence[Hashable], max_negatives: int
                  ) -> list[tuple[int, list[int]]]:
  """Positive and negative pseudo-labels per image from S(I2C) (C3L Sec. 3.3; host side, no JAX).

  Samples are grouped by `group_ids` (the image). For each group with >= 2 samples the positive is its
  highest-S(I2C) sample and the negatives are its other samples ranked by S(I2C) descending, truncated
  to `max_negatives`. Ties go to the earlier sample (original order), so the result is deterministic.
  Groups of one sample have no negative and are left out.

  Args:
    i2c: `[S]` S(I2C) per sample (eq. 1); must be finite.
    group_ids: `[S]` hashable group key per sample (e.g. the image path).
    max_negatives: >= 1, the most negatives kept per group.
  Returns:
    `[(positive, members), ...]` in order of each group's first appearance: `positive` is an index
    into the inputs, `members` the indices of the positive (first) then the kept negatives.
  Raises:
    ValueError: lengths differ, a score is not finite, or `max_negatives < 1`.
  """
  if len(i2c) != len(group_ids):
    raise ValueError(f"select_groups: {len(i2c)} scores but {len(group_ids)} group ids")
  if max_negatives < 1:
    raise ValueError(f"select_groups: max_negatives must be >= 1, got {max_negatives}")
  scores = [float(s) for s in i2c]
  bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
  if bad:
    raise ValueError(f"select_groups: non-finite S(I2C) at sample index(es) {bad[:10]}")
  groups: dict[Hashable, list[int]] = {}
  for i, g in enumerate(group_ids):
    groups.setdefault(g, []).append(i)
  out = []
  for members in groups.values():
    if len(members) < 2:
      continue
    ranked = sorted(members, key=lambda i: (-scores[i], i))
    out.append((ranked[0], ranked[:1 + max_negatives]))
  return out


# ------------------------------------------------------------------------------------------ CG-VLM


def cgvlm_temperature(log_temperature: jax.Array | float) -> jax.Array:
  """The CG-VLM temperature exp(log_temperature), clipped to [0.01, 1] (float32 scalar).

  As CLIP clamps its logit scale: outside the range the temperature is held at the bound and the
  gradient w.r.t. log_temperature is 0 (so it cannot run off).
  """
  return jnp.clip(jnp.exp(jnp.asarray(log_temperature, jnp.float32)),
                  CGVLM_MIN_TEMPERATURE, CGVLM_MAX_TEMPERATURE)


class CGVLMTemperature(nnx.Module):
  """The learnable temperature of `cgvlm_alignment_loss`, stored as its log (init log 0.07).

  Pass `module.log_temperature[...]` to the loss; the loss (and `temperature()`) clip the temperature
  to [0.01, 1] when it is used, the stored log itself is not clipped.
  """

  def __init__(self, init: float = CGVLM_INIT_TEMPERATURE):
    self.log_temperature = nnx.Param(jnp.asarray(math.log(init), jnp.float32))

  def temperature(self) -> jax.Array:
    """The clipped temperature, a float32 scalar."""
    return cgvlm_temperature(self.log_temperature[...])


def cgvlm_alignment_loss(patch_features: jax.Array, patch_mask: jax.Array | None,
                         token_embeddings: jax.Array, token_mask: jax.Array,
                         log_temperature: jax.Array | float) -> jax.Array:
  """CG-VLM contrastive alignment ("Contrastive Vision-Language Alignment Makes Efficient Instruction
  Learner", 2023): symmetric InfoNCE over the image-caption pairs of a batch.

      v_i     = mean over image i's valid patches of the projected patch features
      s(i, j) = mean over caption j's valid tokens t of cos(v_i, e_{j,t})
      L       = ½ [CE_rows(s / temp, diag) + CE_cols(s / temp, diag)],  temp = cgvlm_temperature(.)

  Because the mean of cosines is linear in the unit token vectors, s = v̂ · mean_t(ê_{j,t}) is
  computed as a `[B, D] x [D, B]` product (no `[B, B, T]` tensor).

  Args:
    patch_features: `[B, P, D]` projected image patch features (the connector's output).
    patch_mask: `[B, P]` valid patches, or None for all.
    token_embeddings: `[B, T, D]` caption token embeddings (the LLM's input embeddings).
    token_mask: `[B, T]` valid caption tokens.
    log_temperature: scalar log of the temperature (learnable; see `CGVLMTemperature`).
  Returns:
    scalar float32. A caption with no valid token has similarity 0 to every image.
  """
  pf = patch_features.astype(jnp.float32)
  pm = (jnp.ones(pf.shape[:2], jnp.float32) if patch_mask is None
        else patch_mask.astype(jnp.float32))[..., None]
  v = jnp.sum(jnp.where(pm > 0, pf, 0.0), axis=1) / jnp.maximum(jnp.sum(pm, axis=1), 1.0)  # [B, D]
  tm = token_mask.astype(jnp.float32)[..., None]
  e_hat = jnp.where(tm > 0, _normalize(token_embeddings.astype(jnp.float32)), 0.0)  # [B, T, D]
  e_bar = jnp.sum(e_hat, axis=1) / jnp.maximum(jnp.sum(tm, axis=1), 1.0)  # [B, D]
  sim = jnp.einsum("id,jd->ij", _normalize(v), e_bar, precision=jax.lax.Precision.HIGHEST)
  logits = sim / cgvlm_temperature(log_temperature)
  labels = jnp.arange(sim.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))
