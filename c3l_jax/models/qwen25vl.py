"""Qwen2.5-VL in Flax NNX (transformers' `Qwen2_5_VLForConditionalGeneration` semantics).

Vision tower (`visual`): every image is cut at its own resolution into patches of
`temporal_patch_size x 14 x 14` (a still image is its own frame twice), embedded by one matmul (the
Conv3d), given 2-D rotary positions (height, width), and run through pre-RMSNorm blocks (attention with
a fused qkv + biases, gated SiLU MLP with biases). Blocks attend inside windows of `window_size` pixels
(8 x 8 patches), except the `fullatt_block_indexes` blocks, which attend over the whole image. The
merger RMS-normalises each patch, concatenates each 2 x 2 group and maps it with a 2-layer GELU MLP to
the decoder's width: one image token per group.

transformers reorders the patches window by window before the blocks (so that each window is a
contiguous run for its variable-length attention) and back after the merger. Attention is invariant to
the order of its keys, and the reordering moves whole 2 x 2 groups, so here the patches keep the image
processor's order and each block's mask says which patches share a window (or an image): the same
function, with static shapes. Several images travel packed in one sequence (`QwenImages`), padded to a
bucket length; padding patches form their own segment and their merged tokens are never used.

Decoder: the shared Llama decoder with Qwen2's q/k/v biases (`LlamaConfig.qkv_bias`) and multimodal
RoPE: positions are `[B, T, 3]` (time, height, width). Text tokens carry the same position in all three
streams; an image's tokens carry (start, start + row, start + column), and the text after it continues
from `start + max(rows, columns)`. `mrope_positions` computes them on the host from the token ids and
each image's grid (`image_grid_thw`), as transformers' `get_rope_index` does; `decode_offsets` gives
each row's shift for decoding after the prompt.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from c3l_jax.models import layers as L
from c3l_jax.models.base import VLM
from c3l_jax.models.configs import Qwen25VLConfig, QwenVisionConfig
from c3l_jax.models.llama import LlamaForCausalLM, positions_and_mask, segments
from c3l_jax.models.pictures import QwenPicture


class QwenImages(NamedTuple):
  """The images of one batch packed into one patch sequence (a pytree: it passes through `jax.jit`).

  patches: `[N, C*T*p*p]` float, the image processor's `pixel_values` rows, images one after another,
    then padding rows (N a multiple of `spatial_merge_size**2`).
  hw: `[N, 2]` int32, each patch's (row, column) in its image's patch grid (the 2-D rotary position).
  window: `[N]` int32, the attention window each patch belongs to (unique over the batch).
  image: `[N]` int32, the image each patch belongs to.
  Padding patches have window = image = -1: they attend only each other.
  """

  patches: jax.Array
  hw: jax.Array
  window: jax.Array
  image: jax.Array


def image_tokens(grid_thw: Sequence[int], merge: int = 2) -> int:
  """Number of decoder tokens an image with patch grid `(t, h, w)` becomes."""
  t, h, w = (int(g) for g in grid_thw)
  return t * h * w // (merge * merge)


def patch_layout(grids: Sequence[Sequence[int]], cfg: QwenVisionConfig, pad_to: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(hw [N, 2], window [N], image [N])` for images with patch grids `grids` `(t, h, w)`, in the image
  processor's patch order (per image: frame, merged row, merged column, then the 2 x 2 group row-major),
  padded with -1 segments to `pad_to` patches."""
  m, ws = cfg.spatial_merge_size, cfg.window_tokens
  hw, window, image = [], [], []
  next_window = 0
  for index, (t, h, w) in enumerate(grids):
    t, h, w = int(t), int(h), int(w)
    if h % m or w % m:
      raise ValueError(f"patch grid {h}x{w} is not a multiple of the merge size {m}")
    mh, mw = h // m, w // m
    tt, bh, bw, ih, iw = np.meshgrid(np.arange(t), np.arange(mh), np.arange(mw), np.arange(m),
                                     np.arange(m), indexing="ij")
    rows, cols = (bh * m + ih).reshape(-1), (bw * m + iw).reshape(-1)
    hw.append(np.stack([rows, cols], -1))
    windows_w = -(-mw // ws)
    windows_per_frame = -(-mh // ws) * windows_w
    wid = tt * windows_per_frame + (bh // ws) * windows_w + bw // ws
    window.append(wid.reshape(-1) + next_window)
    next_window += t * windows_per_frame
    image.append(np.full(t * h * w, index))
  hw_a = np.concatenate(hw).astype(np.int32) if hw else np.zeros((0, 2), np.int32)
  win_a = np.concatenate(window).astype(np.int32) if window else np.zeros(0, np.int32)
  img_a = np.concatenate(image).astype(np.int32) if image else np.zeros(0, np.int32)
  n = len(img_a)
  if pad_to is not None:
    if pad_to < n or pad_to % (m * m):
      raise ValueError(f"cannot pad {n} patches to {pad_to} (a multiple of {m * m}, at least {n})")
    extra = pad_to - n
    hw_a = np.concatenate([hw_a, np.zeros((extra, 2), np.int32)])
    win_a = np.concatenate([win_a, np.full(extra, -1, np.int32)])
    img_a = np.concatenate([img_a, np.full(extra, -1, np.int32)])
  return hw_a, win_a, img_a


def pack_images(pixel_values: np.ndarray, grids: Sequence[Sequence[int]], cfg: QwenVisionConfig,
                pad_to: int | None = None) -> QwenImages:
  """`QwenImages` from the image processor's `pixel_values` `[sum t*h*w, C*T*p*p]` and
  `image_grid_thw`, padded to `pad_to` patches (zero rows)."""
  pixel_values = np.asarray(pixel_values)
  hw, window, image = patch_layout(grids, cfg, pad_to)
  if pixel_values.shape != (int(np.sum(image >= 0)), cfg.patch_dim):
    raise ValueError(f"pixel_values {pixel_values.shape} do not match the grids {list(map(list, grids))}"
                     f" ({int(np.sum(image >= 0))} patches of {cfg.patch_dim})")
  patches = np.zeros((len(image), cfg.patch_dim), pixel_values.dtype)
  patches[:len(pixel_values)] = pixel_values
  return QwenImages(patches, hw, window, image)


class QwenImageInputs:
  """How a batch's pictures enter the model, for a family whose pictures differ in size: their patches
  packed into one sequence padded to a bucketed multiple of `patch_bucket` (a few static shapes), and the
  prompts' M-RoPE positions computed on the host. `c3l_jax.models.vlm.FixedImageInputs` is the
  fixed-size families' counterpart (stacked pixels, no positions)."""

  variable = True

  def __init__(self, cfg: Qwen25VLConfig, patch_bucket: int = 256):
    self.cfg, self.patch_bucket = cfg, patch_bucket

  def batch(self, pictures: Sequence[QwenPicture]) -> QwenImages:
    total = sum(p.num_patches for p in pictures)
    # A multiple of `patch_bucket`, and at most 8 lengths per octave (as `data.batching.bucket`): a
    # run compiles a handful of shapes, the padding stays under 1/8.
    step = max(self.patch_bucket, (1 << max(total.bit_length() - 1, 0)) // 8)
    pad_to = max(1, -(-total // step)) * step
    return pack_images(np.concatenate([p.pixel_values for p in pictures]), [p.grid for p in pictures],
                       self.cfg.vision, pad_to=pad_to)

  def rope_positions(self, tokens: np.ndarray, mask: np.ndarray | None,
                     pictures: Sequence[QwenPicture]) -> np.ndarray:
    """`[B, T, 3]` positions of left- or right-padded rows whose image runs belong to `pictures`, in
    order."""
    return mrope_positions(tokens, mask, [p.grid for p in pictures], self.cfg)[0]


def mrope_positions(tokens: np.ndarray, attention_mask: np.ndarray | None,
                    grids: Sequence[Sequence[int]], cfg: Qwen25VLConfig
                    ) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE positions `[B, T, 3]` (int32) and each row's decode offset `[B]` (host side).

  Walking each row's real tokens: a text token at position p gets (p, p, p); a run of image tokens takes
  the next grid of `grids` (images in row-major batch order), its tokens get (p, p + row, p + column)
  over the merged grid, and the text after it starts at p + max(rows, columns). Padding gets 0. The
  offset is `max position + 1 - real tokens`: the k-th real token after the prompt sits at `k + offset`
  in all three streams.
  Raises:
    ValueError: a run of image tokens whose length does not match its grid, or too few grids.
  """
  tokens = np.asarray(tokens)
  b, t = tokens.shape
  mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  m = cfg.vision.spatial_merge_size
  positions = np.zeros((b, t, 3), np.int32)
  offsets = np.zeros(b, np.int32)
  grid_iter = iter(grids)
  for row in range(b):
    slots = np.flatnonzero(mask[row])
    ids = tokens[row, slots]
    pos = np.zeros((len(ids), 3), np.int64)
    i, p = 0, 0
    while i < len(ids):
      if ids[i] != cfg.image_token_id:
        pos[i] = p
        i, p = i + 1, p + 1
        continue
      j = i
      while j < len(ids) and ids[j] == cfg.image_token_id:
        j += 1
      try:
        gt, gh, gw = (int(g) for g in next(grid_iter))
      except StopIteration:
        raise ValueError(f"row {row}: more image-token runs than image grids") from None
      mh, mw = gh // m, gw // m
      if j - i != gt * mh * mw:
        raise ValueError(f"row {row}: a run of {j - i} image tokens, but its grid {gt}x{gh}x{gw} makes "
                         f"{gt * mh * mw}")
      tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(mh), np.arange(mw), indexing="ij")
      pos[i:j] = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)], -1) + p
      p += max(mh, mw)
      i = j
    positions[row, slots] = pos
    offsets[row] = (pos.max() + 1 - len(ids)) if len(ids) else 0
  if next(grid_iter, None) is not None:
    raise ValueError("more image grids than image-token runs")
  return positions, offsets


def vision_rope(cfg: QwenVisionConfig, hw: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`cos, sin` `[N, head_dim]` (float32) of 2-D positions `[N, 2]`: the first quarter of the
  frequencies turns with the row, the second with the column, then the half repeats (rotate-half)."""
  dim = cfg.head_dim // 2
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  freqs = hw.astype(jnp.float32)[..., None] * jnp.asarray(inv)  # [N, 2, dim / 2]
  freqs = freqs.reshape(hw.shape[0], -1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate-half RoPE on `[N, H, Dh]` in float32, cast back (transformers' vision rotary)."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


class QwenVisionBlock(nnx.Module):

  def __init__(self, cfg: QwenVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    d, m = cfg.hidden_size, cfg.intermediate_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = L.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.qkv = L.dense(d, 3 * d, ("vision_embed", "vision_heads"), bias=True, **kw)
    self.proj = L.dense(d, d, ("vision_heads", "vision_embed"), bias=True, **kw)
    self.norm2 = L.RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.gate_proj = L.dense(d, m, ("vision_embed", "vision_mlp"), bias=True, **kw)
    self.up_proj = L.dense(d, m, ("vision_embed", "vision_mlp"), bias=True, **kw)
    self.down_proj = L.dense(m, d, ("vision_mlp", "vision_embed"), bias=True, **kw)
    self.num_heads = cfg.num_heads
    self.act = cfg.hidden_act

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    """`x` `[N, D]`, `cos/sin` `[N, Dh]`, `mask` `[N, N]` -> `[N, D]`."""
    n, d = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    attn = L.attention(q[None], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None], mask[None])
    x = x + self.proj(attn.reshape(n, d))
    h = self.norm2(x)
    return x + self.down_proj(L.activation(self.act)(self.gate_proj(h)) * self.up_proj(h))


class QwenPatchMerger(nnx.Module):
  """`ln_q` (RMSNorm per patch) -> 2 x 2 groups concatenated -> Linear -> GELU -> Linear: the connector."""

  def __init__(self, cfg: QwenVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    wide = cfg.hidden_size * cfg.merge_unit
    kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_q = L.RMSNorm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
    self.mlp_0 = L.dense(wide, wide, ("vision_embed", "vision_mlp"), **kw)
    self.mlp_2 = L.dense(wide, cfg.out_hidden_size, ("vision_mlp", "embed"), **kw)
    self.wide = wide

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[N, Dv]` -> `[N / 4, D]`."""
    h = self.ln_q(x).reshape(-1, self.wide)
    return self.mlp_2(jax.nn.gelu(self.mlp_0(h), approximate=False))


class QwenVisionTower(nnx.Module):
  """Patch embedding, the blocks (windowed or full attention) and the merger."""

  def __init__(self, cfg: QwenVisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               scan: bool = True, remat: bool = False, rngs: nnx.Rngs):
    self.cfg = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # The Conv3d (kernel = stride = patch) as a matmul over flattened (C, T, p, p) patches.
    self.patch_embed = L.dense(cfg.patch_dim, cfg.hidden_size, (None, "vision_embed"), bias=False, **kw)
    self.blocks = L.stacked(lambda r: QwenVisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
                            cfg.depth, rngs)
    self.merger = QwenPatchMerger(cfg, **kw)
    self.dtype = dtype
    self.scan = scan
    self.remat = remat

  # True ignores the windows (every block attends over its whole image): not the model, a switch for
  # the test that shows the windows matter.
  full_attention_everywhere: bool = False

  def __call__(self, images: QwenImages) -> jax.Array:
    """Packed images -> image tokens `[N / 4, D]`, in the order of the image placeholders."""
    x = self.patch_embed(jnp.asarray(images.patches).astype(self.dtype))
    cos, sin = vision_rope(self.cfg, jnp.asarray(images.hw))
    window, image = jnp.asarray(images.window), jnp.asarray(images.image)
    full_mask = image[:, None] == image[None, :]
    window_mask = full_mask if self.full_attention_everywhere else window[:, None] == window[None, :]
    is_full = np.isin(np.arange(self.cfg.depth), self.cfg.fullatt_block_indexes)

    def body(block, h, full):
      return block(h, cos, sin, jnp.where(full, full_mask, window_mask)), None

    x, _ = L.scan_layers(self.blocks, body, x, jnp.asarray(is_full), scan=self.scan, remat=self.remat)
    return self.merger(x)


class Qwen25VLVLM(VLM):
  """`Qwen2_5_VLForConditionalGeneration` in Flax NNX (images only, no video)."""

  def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = L.dtype_of(cfg.dtype), L.dtype_of(cfg.param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    with nnx.use_eager_sharding(False):
      self.visual = QwenVisionTower(cfg.vision, scan=cfg.scan_layers, remat=cfg.remat, **kw)
      self.language_model = LlamaForCausalLM(cfg.text, scan=cfg.scan_layers, remat=cfg.remat,
                                             attention=cfg.attention, **kw)

  def encode_images(self, pixel_values: QwenImages) -> jax.Array:
    """Packed images -> image tokens `[N_patches / 4, D]` (padding's at the end, never scattered)."""
    return self.visual(pixel_values)

  def __call__(self, tokens: jax.Array, pixel_values: QwenImages | None = None,
               attention_mask: jax.Array | None = None, positions: jax.Array | None = None
               ) -> jax.Array:
    """Full forward: tokens `[B, T]` (image pads expanded), packed images, padding mask `[B, T]` and
    M-RoPE positions `[B, T, 3]` (`mrope_positions`; text-only positions when None) -> logits
    `[B, T, V]` (float32)."""
    x = self.embed_image_and_text(tokens, pixel_values)
    text_positions, mask = positions_and_mask(attention_mask, tokens.shape)
    if positions is None:
      positions = jnp.repeat(text_positions[..., None], 3, axis=-1)
    hidden, _ = self.language_model.decode_hidden(x, positions, mask,
                                                  segment_ids=segments(attention_mask, tokens.shape))
    return self.language_model.logits(hidden)


__all__ = ["Qwen25VLVLM", "QwenImageInputs", "QwenImages", "QwenPicture", "QwenPatchMerger", "QwenVisionTower", "image_tokens",
           "mrope_positions", "pack_images", "patch_layout", "vision_rope"]
