r"""Device-memory plan: per stage, the bytes one device holds, computed before anything is allocated.

    python -m c3l_jax.memory --config=configs/llava15.py:7b --arch=llava15-7b --devices=8 \
        --device_memory_gb=40                       # a plan without a checkpoint (known architectures)
    python launch.py --config=... --dry_run         # the plan of the run's checkpoint and mesh

For each stage that loads a model the plan counts, per device:
- `params`: every parameter's shard (its shape over the mesh axes its logical axes map to,
  `c3l_jax.sharding.LOGICAL_RULES`; a dimension that does not divide stays whole), in the dtype the
  stage loads it in: `model.param_dtype`, and in the train stage `train.param_dtype` for the trainable
  parameters (fp32 master weights) and `model.param_dtype` for the frozen ones;
- `optimizer`: AdamW's two moments of the trainable parameters, their gradients (and MultiSteps'
  accumulator when `train.grad_accum > 1`), sharded like the parameters;
- `kv_cache`: generation's cache `[L, B, K, prompt + new tokens, Dh]` / scoring's prefix cache;
- `activations`: the largest live set of the stage's biggest program: one layer's transient (q/k/v,
  scores in float32 per key block of `attention.KV_BLOCK`, MLP) on top of the residual stream, the
  vision tower on the batch's images, the LM head's float32 logits; in the train stage every layer's
  saved residuals for the backward pass (one `[B, T, D]` per layer with `model.remat`); with fsdp, the
  token embedding and LM head gathered whole for generation and training.

Shapes come from the checkpoint's architecture (`jax.eval_shape`, nothing allocated) and the config's
batch sizes and lengths; text lengths are bounded by the config (`generation.max_new_tokens` for
answers) plus `PROMPT_TOKENS` for the chat template and the question. Per-device batch rows are the
configured rows over `data x fsdp`. The activation formulas are checked against XLA's own buffer
assignment (`compile().memory_analysis()`) in tests/test_memory.py and bench/memory.py.

`check` turns a plan that does not fit `device_memory_gb` (0 = what the backend reports, when it
does: `bytes_limit` of `jax.Device.memory_stats()`) into one line naming the stage and a remedy.

The inference mesh chooses itself (`config.inference.auto_mesh`, default on) when the device memory is
known: one data-parallel replica per device when a replica with its KV cache and activations fits,
else the smallest `fsdp` over the host's devices that fits, else the smallest `fsdp x tensor` replica
that does (`choose_inference_mesh`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

GiB = 1024 ** 3
PROMPT_TOKENS = 96  # chat template + instruction / question tokens of one text prompt (beyond the image)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KV_BLOCK = 1024  # c3l_jax.models.attention.KV_BLOCK (kept jax-free here; tests check they agree)
SUFFIX_BUCKET = 8  # c3l_jax.scoring.ScoringConfig.suffix_bucket (likewise)
BACKWARD_LAYERS = 2  # the train step's backward pass of one layer, in forward transients of a layer
AUTO_HEADROOM = 0.9  # the share of a device's memory the automatic inference mesh plans to fill
# Stages whose biggest program is generation / scoring / training (`select` only with method=vigc).
GENERATE_STAGES = ("initial", "final", "eval", "select")
SCORE_STAGES = ("score", "curate")
TRAIN_STAGES = ("train", "ablation")

# A few known architectures, for plans before a checkpoint is converted (the fields of
# llava-hf/llava-1.5-{7b,13b}-hf's config.json).
_CLIP_L336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
_LLAMA = dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
              rope_theta=10000.0, pad_token_id=32001)
KNOWN_ARCHS: dict[str, dict] = {
    "llava15-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32),
    "llava15-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40),
}
# Qwen/Qwen2.5-VL-{3B,7B,72B}-Instruct's config.json (the flat schema; one vision tower but for its
# output width); min / max pixels of their preprocessor_config.json.
_QWEN_VISION = dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                    in_chans=3, patch_size=14, spatial_merge_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], temporal_patch_size=2)
_QWEN_TEXT = dict(model_type="qwen2_5_vl", hidden_act="silu", max_position_embeddings=128000,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, image_token_id=151655,
                  rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
KNOWN_QWEN_ARCHS: dict[str, dict] = {
    "qwen25vl-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                        tie_word_embeddings=True),
    "qwen25vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                        tie_word_embeddings=False),
    "qwen25vl-72b": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                         tie_word_embeddings=False),
}


def known_arch(name: str):
  """The model config of a `KNOWN_ARCHS` / `KNOWN_QWEN_ARCHS` name."""
  from c3l_jax.models.configs import from_hf_config, qwen25vl_from_hf
  if name in KNOWN_QWEN_ARCHS:
    text = {**_QWEN_TEXT, **KNOWN_QWEN_ARCHS[name]}
    vision = {**_QWEN_VISION, "out_hidden_size": text["hidden_size"]}
    return qwen25vl_from_hf({**text, "vision_config": vision},
                            {"min_pixels": 3136, "max_pixels": 12845056})
  if name not in KNOWN_ARCHS:
    raise ValueError(f"unknown architecture {name!r} (known: "
                     f"{', '.join([*KNOWN_ARCHS, *KNOWN_QWEN_ARCHS])})")
  return from_hf_config(dict(model_type="llava", image_token_index=32000, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", projector_hidden_act="gelu",
                             vision_config=_CLIP_L336, text_config={**_LLAMA, **KNOWN_ARCHS[name]}))


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """Bytes per device of one stage."""

  stage: str
  kind: str  # generate | score | train
  mesh: dict[str, int]
  rows: int  # batch rows per device
  tokens: int  # the longest sequence the stage runs (prompt + new tokens / prefix + packed suffixes)
  params: int
  optimizer: int
  kv_cache: int
  activations: int

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.kv_cache + self.activations


@dataclasses.dataclass(frozen=True)
class Plan:
  device_bytes: int  # 0 = unknown
  stages: tuple[StagePlan, ...]
  # The inference stages' mesh when `config.inference.auto_mesh` chose it ({} = the configured one) and
  # one line saying why.
  inference_mesh: dict[str, int] = dataclasses.field(default_factory=dict)
  mesh_choice: str = ""

  def table(self) -> str:
    """The plan as a fixed-width table (GiB per device), one row per stage."""
    size = f"{self.device_bytes / GiB:.1f} GiB per device" if self.device_bytes else "device size unknown"
    lines = [f"memory plan, GiB per device ({size}); rows = batch rows per device",
             f"{'stage':<9}{'mesh d/f/t':>11}{'rows':>5}{'tokens':>7}{'params':>8}{'optim':>8}{'kv':>8}"
             f"{'activ':>8}{'total':>8}"]
    for s in self.stages:
      fits = "" if not self.device_bytes else ("  fits" if s.total <= self.device_bytes else "  DOES NOT FIT")
      mesh = "/".join(str(s.mesh[a]) for a in ("data", "fsdp", "tensor"))
      lines.append(f"{s.stage:<9}{mesh:>11}{s.rows:>5}{s.tokens:>7}" + "".join(
          f"{x / GiB:>8.2f}" for x in (s.params, s.optimizer, s.kv_cache, s.activations, s.total))
          + fits)
    return "\n".join(lines)


# -- parameters ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def param_leaves(cfg: Any, with_head: bool = False) -> list[tuple[str, tuple[int, ...], tuple]]:
  """`(path, shape, logical axes)` of every parameter of `cfg`'s model (`jax.eval_shape`: no memory;
  cached, do not modify the list).

  Paths are the trainer's (`vlm/...`, and `head/...`, `temperature/...` with `with_head`), which
  `train.trainable` patterns match.
  """
  import jax
  from flax import nnx

  from c3l_jax.models.vlm import build_vlm

  if with_head:
    from c3l_jax import train as trainer_lib

    def make():
      return trainer_lib.Generator(build_vlm(cfg, nnx.Rngs(0)), rngs=nnx.Rngs(1))
  else:
    def make():
      return build_vlm(cfg, nnx.Rngs(0))

  state = nnx.state(nnx.eval_shape(make), nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  out = []
  for path, v in leaves:
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    name = "/".join(str(k) for k in keys if str(k) != "value")
    if not with_head:
      name = "vlm/" + name
    axes = v.get_metadata().get("out_sharding") or (None,) * len(v.shape)
    out.append((name, tuple(v.shape), tuple(axes)))
  return out


def shard_elements(shape: Sequence[int], axes: Sequence[str | None], mesh: dict[str, int]) -> int:
  """Elements of one device's shard: a dimension splits over its mesh axes when it divides (as
  `c3l_jax.sharding.logical_to_spec` places it), else stays whole."""
  from c3l_jax.sharding import LOGICAL_RULES

  rules = dict(LOGICAL_RULES)
  n = 1
  for dim, name in zip(shape, axes):
    mesh_axes = rules.get(name) if name is not None else None
    size = 1
    if mesh_axes is not None:
      size = math.prod(mesh[a] for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes))
    n *= dim // size if dim % size == 0 else dim
  return n


# -- activations -----------------------------------------------------------------------------------

def _decoder_layer(text, b: int, t: int, s: int, cb: int, tp: int) -> int:
  """Transient bytes of one decoder layer's forward: `b` rows of `t` queries over `s` keys."""
  d, m, dh = text.hidden_size, text.intermediate_size, text.head_dim
  h, k = text.num_attention_heads, text.num_key_value_heads
  hp, kp = max(h // tp, 1) if h % tp == 0 else h, max(k // tp, 1) if k % tp == 0 else k
  mp = m // tp if m % tp == 0 else m
  block = min(s, KV_BLOCK)
  scores = b * hp * t * block * (4 + cb)  # float32 logits (exp fuses into them), compute-dtype probabilities
  qkv = b * t * (hp + 2 * kp) * dh * cb * 2  # projections and their RoPE'd copies
  mlp = b * t * mp * cb * 3  # gate, up, gate*up
  return scores + qkv + mlp + b * t * d * cb * 2


def _layer_weights(cfg, mesh, pb: int, tower: str, stack: str = "layers") -> int:
  """One layer of `tower`'s (`language_model` / `vision_tower` / `visual`) stacked layers (`stack`)
  gathered whole over fsdp (still split over `tensor`) while the tower runs, in `pb`-byte parameters;
  0 without fsdp."""
  prefix = f"vlm/{tower}/{stack}/"
  stacked = [(shape, axes) for path, shape, axes in param_leaves(cfg) if path.startswith(prefix)]
  if not stacked or mesh["fsdp"] == 1:
    return 0
  whole = dict(mesh, data=1, fsdp=1)
  return sum(shard_elements(s, a, whole) for s, a in stacked) // stacked[0][0][0] * pb


def _vision(cfg, images: int, cb: int, tp: int, mesh=None, pb: int = 4) -> int:
  """Transient bytes of the vision tower (+ connector) on `images` images, and (with `mesh`) one of its
  layers gathered whole over fsdp."""
  v = cfg.vision
  if getattr(cfg, "family", "") == "qwen25vl":
    return _qwen_vision(cfg, images, cb, tp, mesh, pb)
  n = v.num_patches + 1
  h = v.num_attention_heads
  hp = h // tp if h % tp == 0 else h
  mp = v.intermediate_size // tp if v.intermediate_size % tp == 0 else v.intermediate_size
  # float32 scores and compute-dtype probabilities, as the decoder's (`_decoder_layer`)
  layer = images * (hp * n * n * (4 + cb) + n * (3 * v.hidden_size * 2 + mp * 2) * cb
                    + n * v.hidden_size * cb * 3)
  pixels = images * v.num_channels * v.image_size ** 2 * 4
  features = images * cfg.image_seq_length * cfg.text.hidden_size * cb * 2
  weights = _layer_weights(cfg, mesh, pb, "vision_tower") if mesh is not None else 0
  return layer + pixels + features + weights


def _qwen_vision(cfg, images: int, cb: int, tp: int, mesh=None, pb: int = 4) -> int:
  """Qwen2.5-VL's tower on `images` pictures at the image-token budget (`max_pixels`), packed into one
  sequence of N patches: one block's transient (float32 scores per key block, the qkv and MLP), the two
  N x N window / image masks, the patches, the merged features, and one block gathered over fsdp."""
  v = cfg.vision
  n = images * cfg.image_seq_length * v.merge_unit
  hp = v.num_heads // tp if v.num_heads % tp == 0 else v.num_heads
  mp = v.intermediate_size // tp if v.intermediate_size % tp == 0 else v.intermediate_size
  layer = (hp * n * min(n, KV_BLOCK) * (4 + cb) + n * (3 * v.hidden_size * 2 + mp * 3) * cb
           + n * v.hidden_size * cb * 3)
  masks = 2 * n * n
  pixels = n * v.patch_dim * 4
  features = images * cfg.image_seq_length * cfg.text.hidden_size * cb * 2
  weights = _layer_weights(cfg, mesh, pb, "visual", "blocks") if mesh is not None else 0
  return layer + masks + pixels + features + weights


def _lm_head(text, rows: int, positions: int, tp: int, copies: int = 2) -> int:
  """float32 logits (and log-softmax) of `rows x positions` positions."""
  vocab = text.vocab_size // tp if text.vocab_size % tp == 0 else text.vocab_size
  return rows * positions * vocab * 4 * copies


def _gathered(cfg, mesh, pb: int) -> int:
  """fsdp: the token embedding and the LM head, which a device gathers whole to use them (the decoder
  layers' weights are gathered one layer at a time: small next to the activations), in
  parameter-dtype bytes `pb`, over `tensor`."""
  if mesh["fsdp"] == 1:
    return 0
  text = cfg.text
  tables = text.vocab_size * text.hidden_size * (1 if text.tie_word_embeddings else 2)
  return tables * pb // mesh["tensor"]


def _kv(text, b: int, s: int, cb: int, tp: int) -> int:
  k = text.num_key_value_heads
  kp = k // tp if k % tp == 0 else k
  return 2 * text.num_hidden_layers * b * kp * s * text.head_dim * cb


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


# -- the plan --------------------------------------------------------------------------------------

def plan(model_cfg: Any, config: Any, stages: Sequence[str], mesh: dict[str, int],
         device_bytes: int = 0, train_mesh: dict[str, int] | None = None) -> Plan:
  """The memory plan of `stages` for the architecture `model_cfg` on a `{data, fsdp, tensor}` mesh
  (sizes resolved; `train_mesh`, default `mesh`, for the training stages), with the run settings of
  `config` (an ml_collections config: model.*, data.*, generation.*, scoring.*, train.*)."""
  from c3l_jax.models.configs import with_runtime
  m = config.model
  cfg = with_runtime(model_cfg, dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                     remat=m.remat, attention=m.attention)
  if getattr(cfg, "family", "") == "qwen25vl" and m.get("max_pixels", 0):
    cfg = dataclasses.replace(cfg, max_pixels=int(m.max_pixels))  # the run's image-token budget
  out = []
  for stage in stages:
    if stage in TRAIN_STAGES:
      out.append(_train_plan(stage, cfg, config, train_mesh or mesh))
    elif stage in SCORE_STAGES:
      out.append(_score_plan(stage, cfg, config, mesh))
    elif stage in GENERATE_STAGES:
      out.append(_generate_plan(stage, cfg, config, mesh))
  return Plan(int(device_bytes), tuple(out))


def _params_bytes(cfg, mesh, dtype: str, trainable=None, train_dtype: str = "float32",
                  with_head: bool = False) -> tuple[int, int]:
  """(parameter bytes, trainable parameter elements) per device."""
  total, trained = 0, 0
  for path, shape, axes in param_leaves(cfg, with_head=with_head):
    n = shard_elements(shape, axes, mesh)
    if trainable is not None and trainable(path):
      total += n * DTYPE_BYTES[train_dtype]
      trained += n
    else:
      total += n * DTYPE_BYTES[dtype]
  return total, trained


def _shards(mesh) -> int:
  return mesh["data"] * mesh["fsdp"]


def _generate_plan(stage, cfg, config, mesh) -> StagePlan:
  cb, tp = DTYPE_BYTES[cfg.dtype], mesh["tensor"]
  rows = config.data.eval_batch_size if stage == "eval" else config.data.batch_size
  b = _round_up(rows, _shards(mesh)) // _shards(mesh)
  new = config.generation.max_new_tokens
  if stage == "initial":
    new = max(new, config.generation.caption_max_new_tokens)
  if stage == "eval":
    new = max(config.eval.max_new_tokens, config.eval.long_max_new_tokens
              if "llava_bench" in str(config.eval.benchmarks) else 0)
  t = _round_up(cfg.image_seq_length + PROMPT_TOKENS, config.generation.prompt_bucket)
  s = t + new
  params, _ = _params_bytes(cfg, mesh, cfg.param_dtype)
  kv = _kv(cfg.text, b, s, cb, tp)
  d, pb = cfg.text.hidden_size, DTYPE_BYTES[cfg.param_dtype]
  layer_weights = _layer_weights(cfg, mesh, pb, "language_model")
  activations = max(_vision(cfg, b, cb, tp, mesh, pb),
                    _decoder_layer(cfg.text, b, t, s, cb, tp) + b * t * d * cb * 2 + layer_weights)
  activations += _gathered(cfg, mesh, pb)
  return StagePlan(stage, "generate", dict(mesh), b, s, params, 0, kv, activations)


def _score_plan(stage, cfg, config, mesh) -> StagePlan:
  from c3l_jax.data.batching import bucket

  cb, tp = DTYPE_BYTES[cfg.dtype], mesh["tensor"]
  text = cfg.text
  q = config.generation.per_image if config.scoring.prefix_sharing else 1
  g = _round_up(max(1, config.scoring.batch_size // q), _shards(mesh)) // _shards(mesh)
  answer = _round_up(config.generation.max_new_tokens, 16)
  # eq. 1 reads each answer token's logit and the logsumexp (one float32 logits array); the full KL
  # also keeps the log-softmax.
  logit_copies = 1 if config.scoring.mode == "eq1" else 2
  qa = PROMPT_TOKENS + config.generation.max_new_tokens
  params, _ = _params_bytes(cfg, mesh, cfg.param_dtype)
  d, pb = text.hidden_size, DTYPE_BYTES[cfg.param_dtype]
  layer_weights = _layer_weights(cfg, mesh, pb, "language_model")
  vision = _vision(cfg, g, cb, tp, mesh, pb)
  if config.scoring.prefix_sharing:
    p = cfg.image_seq_length + PROMPT_TOKENS // 2
    w = bucket(q * qa, SUFFIX_BUCKET)
    kv = _kv(text, g, p, cb, tp)  # the prefix cache, read by the suffix pass without a copy
    suffix = (_decoder_layer(text, g, w, p + w, cb, tp) + g * w * d * cb * 2
              + _lm_head(text, g, q * answer, tp, copies=logit_copies))
    prefix = _decoder_layer(text, g, p, p, cb, tp) + g * p * d * cb * 2
    activations = max(suffix + layer_weights, prefix + layer_weights, vision)
    tokens = p + w
  else:
    t = _round_up(cfg.image_seq_length + qa, 32)
    kv = 0
    activations = max(_decoder_layer(text, g, t, t, cb, tp) + g * t * d * cb * 2
                      + _lm_head(text, g, answer, tp, copies=logit_copies) + layer_weights, vision)
    tokens = t
  return StagePlan(stage, "score", dict(mesh), g * q, tokens, params, 0, kv, activations)


def _train_plan(stage, cfg, config, mesh) -> StagePlan:
  cb, tp = DTYPE_BYTES[cfg.dtype], mesh["tensor"]
  text = cfg.text
  from c3l_jax.train import trainable_paths
  tr = config.train
  aux = ("temperature",) if tr.objective == "align" else ("head",)
  patterns = tuple(tr.trainable) + aux
  train_dtype = getattr(tr, "param_dtype", cfg.param_dtype)
  params, trained = _params_bytes(cfg, mesh, cfg.param_dtype, trainable_paths(patterns), train_dtype,
                                  with_head=True)
  tb = DTYPE_BYTES[train_dtype]
  # AdamW's mu and nu, the gradients, and MultiSteps' accumulator.
  optimizer = trained * tb * (3 + (1 if tr.grad_accum > 1 else 0))
  b = _round_up(tr.batch_size, _shards(mesh)) // _shards(mesh)
  t = _round_up(cfg.image_seq_length + PROMPT_TOKENS + config.generation.max_new_tokens, 32)
  d, layers = text.hidden_size, text.num_hidden_layers
  rows = b * (2 if tr.contrastive_weight and tr.ce_weight else 1)  # the CE rows and the anchors
  layer = _decoder_layer(text, rows, t, t, cb, tp)
  hp = text.num_attention_heads // tp if text.num_attention_heads % tp == 0 else text.num_attention_heads
  if cfg.remat:  # each layer's input; one layer's residuals at a time, recomputed in its backward
    saved = layers * rows * t * d * cb + 2 * layer
  else:  # every layer's residuals for the backward pass (its forward transient and float32 scores);
    # the backward pass of one layer holds about BACKWARD_LAYERS times its forward transient.
    saved = layers * (layer + rows * hp * t * min(t, KV_BLOCK) * 4) + BACKWARD_LAYERS * layer
  pb = DTYPE_BYTES[cfg.param_dtype]
  decoder = (saved + _lm_head(text, b, t, tp, copies=3) + _gathered(cfg, mesh, DTYPE_BYTES[train_dtype])
             + _layer_weights(cfg, mesh, pb, "language_model"))
  vision = _vision(cfg, rows, cb, tp, mesh, pb)
  trained_tower = trainable_paths(patterns)
  if any(trained_tower(p) for p, _, _ in param_leaves(cfg, with_head=True) if "/vision_tower/" in p):
    activations = decoder + vision  # its activations kept for its backward pass (roughly)
  else:  # a frozen tower runs before the decoder: nothing of it is alive when the residuals are
    activations = max(decoder, vision)
  return StagePlan(stage, "train", dict(mesh), b, t, params, optimizer, 0, activations)


# -- what XLA says ---------------------------------------------------------------------------------

def _program_bytes(compiled) -> int:
  """Peak bytes per device of a compiled program: live arguments, outputs not aliased to a donated
  argument, and XLA's temporaries."""
  a = compiled.memory_analysis()
  return (a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes
          + a.temp_size_in_bytes)


def _abstract_state(tree, mesh):
  """ShapeDtypeStructs of an abstract NNX state, each with its `c3l_jax.sharding` placement."""
  import jax
  from flax import nnx

  from c3l_jax import sharding
  shardings = sharding.state_shardings(tree, mesh)
  nnx.replace_by_pure_dict(tree, jax.tree.map(
      lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), nnx.to_pure_dict(tree),
      nnx.to_pure_dict(shardings)))
  return tree


def xla_bytes(stage: str, model_cfg: Any, config: Any, mesh) -> int:
  """Peak bytes per device XLA assigns to `stage`'s biggest program at the plan's shapes, from
  `jax.jit(...).lower(abstract inputs).compile().memory_analysis()`: nothing is allocated. `mesh` is
  a `jax.sharding.Mesh` (e.g. 8 simulated CPU devices)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from c3l_jax import sampling, scoring, sharding
  from c3l_jax import train as trainer_lib
  from c3l_jax.models.configs import with_runtime
  from c3l_jax.models.vlm import build_vlm

  m = config.model
  cfg = with_runtime(model_cfg, dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
                     remat=m.remat, attention=m.attention)
  sizes = {a: mesh.shape[a] for a in ("data", "fsdp", "tensor")}
  sp = plan(model_cfg, config, (stage,), sizes).stages[0]
  shards = _shards(sizes)
  v = cfg.vision

  def batch(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

  def pixels(n):
    return batch((n, v.num_channels, v.image_size, v.image_size), jnp.float32)

  if sp.kind == "generate":
    graphdef, state = sharding.abstract_model(cfg)
    state = _abstract_state(state, mesh)
    b = sp.rows * shards
    new = sp.tokens - _round_up(cfg.image_seq_length + PROMPT_TOKENS, config.generation.prompt_bucket)
    t = sp.tokens - new
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=sharding.batch_sharding(mesh, 1))
    scfg = sampling.SamplingConfig(max_new_tokens=new, eos_ids=(2,), pad_id=0)
    with jax.set_mesh(mesh):
      compiled = sampling._generate.lower(graphdef, state, batch((b, t), jnp.int32),
                                          batch((b, t), jnp.int32), pixels(b), keys, scfg).compile()
    return _program_bytes(compiled)

  if sp.kind == "score":
    graphdef, state = sharding.abstract_model(cfg)
    state = _abstract_state(state, mesh)
    q = config.generation.per_image
    g = sp.rows // q * shards
    p = cfg.image_seq_length + PROMPT_TOKENS // 2
    w = sp.tokens - p
    # Answer tokens per data shard (`scoring._answer_index`): every QA of the shard's groups.
    from c3l_jax.data.batching import bucket

    a = bucket(q * (g // shards) * config.generation.max_new_tokens, scoring.ScoringConfig.answer_bucket)
    i32 = jnp.int32
    with jax.set_mesh(mesh):
      prefix = scoring._prefix_cache.lower(graphdef, state, batch((g, p), i32), batch((g, p), i32),
                                           pixels(g)).compile()
    text = cfg.text
    kp = jax.ShapeDtypeStruct((text.num_hidden_layers, g, text.num_key_value_heads, p, text.head_dim),
                              jnp.dtype(cfg.dtype), sharding=jax.sharding.NamedSharding(
                                  mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES,
                                                                   "tensor", None, None)))
    from c3l_jax.models.llama import KVCache
    with jax.set_mesh(mesh):
      suffix = scoring._suffix_pass.lower(graphdef, state, KVCache(kp, kp), batch((g, p), i32),
                                          batch((g, w), i32),
                                          batch((g, w), i32), batch((g, w), i32), batch((shards, a), i32),
                                          full=config.scoring.mode == "full_kl").compile()
    return max(_program_bytes(prefix), _program_bytes(suffix))

  # train
  tcfg = trainer_lib.TrainConfig.from_config(config.train)
  train_dtype = getattr(config.train, "param_dtype", cfg.param_dtype)
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: trainer_lib.Generator(build_vlm(cfg, nnx.Rngs(0)), rngs=nnx.Rngs(1))))
  state = _abstract_state(state, mesh)
  model = nnx.merge(graphdef, state)
  graphdef, trainable, frozen = nnx.split(model, trainer_lib.trainable_filter(tcfg.trainable), ...)
  trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(train_dtype),
                                                          sharding=x.sharding), trainable)
  optimizer = trainer_lib.make_optimizer(tcfg)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_state = jax.eval_shape(optimizer.init, trainable)
  opt_state = optax_shardings(optimizer, opt_state, trainable, replicated)
  b = sp.rows * shards
  t = sp.tokens
  i32 = jnp.int32
  data = {}
  if tcfg.ce_weight:
    data["ce"] = {"tokens": batch((b, t), i32), "mask": batch((b, t), i32),
                  "weights": batch((b, t), jnp.float32), "pixels": pixels(b)}
  if tcfg.contrastive_weight and tcfg.objective != "align":
    n = config.train.max_negatives + 1
    ts = _round_up(PROMPT_TOKENS + config.generation.max_new_tokens, 32)
    data["con"] = {"anchor_tokens": batch((b, t), i32), "anchor_mask": batch((b, t), i32),
                   "anchor_pixels": pixels(b), "sample_tokens": batch((b, n, ts), i32),
                   "sample_mask": batch((b, n, ts), i32), "sample_valid": batch((b, n), jnp.bool_),
                   "positive": batch((b,), i32), "group_valid": batch((b,), jnp.bool_)}
  with jax.set_mesh(mesh):
    compiled = trainer_lib.train_step.lower(graphdef, trainable, opt_state, frozen, data,
                                            optimizer=optimizer, cfg=tcfg).compile()
  return _program_bytes(compiled)


def optax_shardings(optimizer, opt_state, params, other):
  """`opt_state` (ShapeDtypeStructs) with the parameters' shardings on per-parameter leaves and
  `other` on the rest (step counts)."""
  import jax
  import optax
  placed = optax.tree_utils.tree_map_params(
      optimizer, lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding), opt_state,
      params, transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=other),
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return placed


# -- checks ----------------------------------------------------------------------------------------

def backend_device_bytes() -> int:
  """The memory of this process's first device as the backend reports it (0 when it does not, e.g.
  CPU)."""
  import jax
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  (backends without memory stats)
    return 0
  return int(stats.get("bytes_limit", 0))


def remedy(stage: StagePlan, plan_: Plan, config: Any) -> str:
  """What to change so that `stage` fits."""
  mesh = stage.mesh
  hints = []
  if config.model.param_dtype == "float32" and stage.kind != "train":
    hints.append("load the parameters in bf16 (--config.model.param_dtype=bfloat16)")
  n = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
  if stage.params + stage.optimizer > plan_.device_bytes / 2 and mesh["fsdp"] * mesh["tensor"] < n:
    m = "train.mesh" if stage.kind == "train" else "inference.mesh"
    how = (f"--config.{m}.fsdp={n}" if stage.kind == "train" else
           f"--config.{m}.tensor={n} or --config.{m}.fsdp={n}")
    hints.append(f"shard the parameters over the devices (--config.{m}.data=1 {how})")
  if stage.kind == "train":
    if config.model.param_dtype == "float32":
      hints.append("keep frozen parameters in bf16 (--config.model.param_dtype=bfloat16)")
    if not config.model.remat:
      hints.append("rematerialise activations (--config.model.remat=True)")
    if stage.rows > 1:
      hints.append("a smaller --config.train.batch_size with --config.train.grad_accum")
    hints.append("fewer trainable parameters (e.g. --config.train.trainable=\"('connector',)\")")
  elif stage.rows > 1:
    what = {"score": "--config.scoring.batch_size", "generate": "--config.data.batch_size"}[stage.kind]
    if stage.stage == "eval":
      what = "--config.data.eval_batch_size"
    hints.append(f"a smaller {what}")
  if not hints:
    hints.append("more devices per model replica")
  return "; or ".join(hints)


def _size(n: int) -> str:
  return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MiB"


def misfit(plan_: Plan, config: Any) -> str | None:
  """One line for the first stage that does not fit `plan_.device_bytes` (None when all fit or the
  device size is unknown)."""
  for s in plan_.stages:
    shards = _shards(s.mesh)
    if s.kind == "train" and config.train.batch_size % shards:
      return (f"stage {s.stage}: train.batch_size={config.train.batch_size} does not split over the "
              f"{shards} batch shards of mesh {s.mesh} (data x fsdp): a batch size that is a multiple "
              f"of {shards}, or fewer batch shards (shard the parameters over --config.train.mesh.tensor "
              "instead, e.g. --config.train.mesh.fsdp=2 --config.train.mesh.tensor=-1)")
  if not plan_.device_bytes:
    return None
  for s in plan_.stages:
    if s.total > plan_.device_bytes:
      return (f"stage {s.stage} needs {_size(s.total)} per device (params {_size(s.params)}, "
              f"optimizer {_size(s.optimizer)}, kv cache {_size(s.kv_cache)}, activations "
              f"{_size(s.activations)}) on mesh {s.mesh}, more than the {_size(plan_.device_bytes)} a "
              f"device has: {remedy(s, plan_, config)}")
  return None


def _mesh_candidates(model_cfg: Any, devices: int) -> list[dict[str, int]]:
  """Inference meshes over `devices`, in the order `choose_inference_mesh` tries them: `fsdp` alone,
  replicas of fewer devices first (more replicas, more throughput; fsdp needs no fast interconnect),
  then, for a model no fsdp replica holds, `fsdp x tensor` replicas, again the smallest first and the
  smaller `tensor` first (tensor sizes that divide the decoder's attention and key/value heads)."""
  text = model_cfg.text
  divisors = [n for n in range(1, devices + 1) if devices % n == 0]
  out = [dict(data=devices // f, fsdp=f, tensor=1) for f in divisors]
  for size in divisors:
    for tensor in divisors[1:]:
      if size % tensor == 0 and text.num_attention_heads % tensor == 0 \
          and text.num_key_value_heads % tensor == 0:
        out.append(dict(data=devices // size, fsdp=size // tensor, tensor=tensor))
  return out


def choose_inference_mesh(model_cfg: Any, config: Any, stages: Sequence[str], local_devices: int,
                          device_bytes: int) -> tuple[dict[str, int], str]:
  """The inference stages' mesh over a host's `local_devices`: `data` replicas of `fsdp x tensor`
  devices each, the first of `_mesh_candidates` (fsdp alone, smallest replica first) at which
  every inference stage of `stages` fits `AUTO_HEADROOM` of `device_bytes` (the plan is an estimate:
  about +-20 %; a slower sharded replica beats running out of memory mid-run); the largest `fsdp`
  when none does (the plan's check then says whether it fits at all and what to change). Rows per
  device do not depend on `fsdp` (the batch splits over data x fsdp = every device): only the
  parameters' share and the gathered embedding / LM head change; a `tensor` split also splits each
  layer's activations, the KV cache and the gathered tables (a 72B model on 16 GB chips needs it).
  Returns the mesh and one line saying what was chosen and why."""
  inference = [s for s in stages if s not in TRAIN_STAGES]
  budget = int(AUTO_HEADROOM * device_bytes)
  first = fitting = None
  for mesh in _mesh_candidates(model_cfg, local_devices):
    worst = max(plan(model_cfg, config, inference, mesh).stages, key=lambda s: s.total)
    first = first or worst
    if worst.total <= budget:
      fitting = (mesh, worst)
      break
  if fitting is None:
    mesh = dict(data=1, fsdp=local_devices, tensor=1)
    worst = max(plan(model_cfg, config, inference, mesh).stages, key=lambda s: s.total)
  else:
    mesh, worst = fitting
  name = f"data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}"
  have = f"{AUTO_HEADROOM:.0%} of a device's {_size(device_bytes)} is {_size(budget)}"
  if fitting is None:
    why = (f"no mesh fits: {worst.stage} needs {_size(worst.total)} even at fsdp={mesh['fsdp']} "
           f"(and with any tensor split); {have}")
  elif mesh["fsdp"] * mesh["tensor"] == 1:
    why = f"one replica per device fits: {worst.stage} needs {_size(worst.total)}, {have}"
  else:
    how = f"fsdp={mesh['fsdp']}" + (f", tensor={mesh['tensor']}" if mesh["tensor"] > 1 else "")
    why = (f"one replica per device does not fit ({first.stage} needs {_size(first.total)}, {have}); "
           f"sharded over {how}: {worst.stage} needs {_size(worst.total)}")
  return mesh, f"inference mesh {name} (chosen from the memory plan): {why}"


def run_plan(config: Any, stages: Sequence[str], model_cfg: Any = None, devices: int = 0,
             local_devices: int = 0) -> Plan | None:
  """The plan of a pipeline run: the checkpoint's architecture (or `model_cfg`); `config.inference.mesh`
  over this host's devices for the inference stages (each process loads its own replica), or the mesh
  `choose_inference_mesh` picks when `config.inference.auto_mesh` is on and the device memory is known,
  and `config.train.mesh` over all devices for training (default: jax's counts); `device_memory_gb`
  (0: the backend's). None when there is no architecture to plan from (no checkpoint yet)."""
  from c3l_jax import checkpoint
  from c3l_jax.sharding import mesh_shape

  if model_cfg is None:
    try:
      model_cfg = checkpoint.load_model_config(config.model.checkpoint)
    except (checkpoint.CheckpointError, OSError):
      return None
  if not devices:
    import jax
    devices, local_devices = jax.device_count(), jax.local_device_count()
  from c3l_jax.pipeline import needs_model
  planned = needs_model(stages, config)
  axes = ("data", "fsdp", "tensor")
  local = dict(zip(axes, mesh_shape({a: config.inference.mesh[a] for a in axes},
                                    local_devices or devices)))
  train = None
  if any(s in TRAIN_STAGES for s in planned):
    train = dict(zip(axes, mesh_shape({a: config.train.mesh[a] for a in axes}, devices)))
  gb = float(config.device_memory_gb or 0)
  device_bytes = int(gb * GiB) if gb else backend_device_bytes()
  chosen, why = {}, ""
  if (getattr(config.inference, "auto_mesh", False) and device_bytes
      and any(s not in TRAIN_STAGES for s in planned)):
    chosen, why = choose_inference_mesh(model_cfg, config, planned, local_devices or devices,
                                        device_bytes)
    local = chosen
  return dataclasses.replace(plan(model_cfg, config, planned, local, device_bytes, train_mesh=train),
                             inference_mesh=chosen, mesh_choice=why)


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags
  f = flags.FLAGS
  config = f.config
  arch = known_arch(f.arch) if f.arch else None
  if f.device_memory_gb:
    config.device_memory_gb = f.device_memory_gb
  from ml_collections import config_flags
  overrides = config_flags.get_override_values(f["config"])
  if (any(k.startswith("inference.mesh.") for k in overrides)
      and "inference.auto_mesh" not in overrides):
    config.inference.auto_mesh = False  # as launch.py: a mesh on the command line is kept
  from c3l_jax import pipeline
  stages = pipeline.parse_stages(f.stages or config.stages)
  p = run_plan(config, stages, model_cfg=arch, devices=f.devices)
  if p is None:
    raise SystemExit("error: no architecture: pass --arch (one of "
                     f"{', '.join(KNOWN_ARCHS)}) or --config.model.checkpoint=DIR")
  if p.mesh_choice:
    print(p.mesh_choice)
  print(p.table())
  problem = misfit(p, config)
  if problem:
    print(f"error: {problem}")
    raise SystemExit(2)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]", lock_config=False)
  flags.DEFINE_string("arch", "", "a known architecture instead of a checkpoint: "
                      f"{', '.join([*KNOWN_ARCHS, *KNOWN_QWEN_ARCHS])}")
  flags.DEFINE_integer("devices", 0, "devices of the mesh (0: jax's)")
  flags.DEFINE_float("device_memory_gb", 0.0, "memory per device (0: the config's / the backend's)")
  flags.DEFINE_string("stages", "", "stages to plan (default: the config's)")
  app.run(main)
