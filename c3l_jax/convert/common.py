"""What every converter shares: the error type, the conversion plan, the checks and the streaming writer.

A converter (one module per family) reads its sources' configs and tensor headers into a `Conversion`:
the model config, a `Plan` (canonical tensor name -> Flax parameter path, layer index, transform) and a
`Ref` per planned tensor (where its bytes are; nothing read yet). `check_complete` lists every missing
and unexpected tensor at once; `check_shapes` checks every tensor's shape after its transform against
the Flax model's abstract shapes (headers only). Then either `write_model` streams the parameters into a
model directory, or `dry_run_report` describes what would be written (`--dry_run`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Callable, Protocol

import ml_dtypes
import numpy as np
import tqdm

from c3l_jax import checkpoint
from c3l_jax.models.configs import ModelConfig


class ConversionError(ValueError):
  """The input cannot be converted; the message says why."""


class Ref(Protocol):
  """Where one source tensor lives; `read()` returns it as a numpy array."""

  shape: tuple[int, ...]
  dtype: np.dtype

  def read(self) -> np.ndarray: ...


Transform = Callable[[np.ndarray], np.ndarray]
T: Transform = lambda w: w.T  # torch Linear [out, in] -> Flax kernel [in, out]
ID: Transform = lambda w: w

# canonical source name -> (Flax parameter path, layer index or None, transform)
Plan = dict[str, tuple[tuple[str, ...], int | None, Transform]]


def add_linear(plan: Plan, src: str, dst: tuple[str, ...], layer: int | None, bias: bool = True) -> None:
  """torch Linear `src.{weight,bias}` -> Flax Dense `dst.{kernel,bias}`."""
  plan[src + ".weight"] = (dst + ("kernel",), layer, T)
  if bias:
    plan[src + ".bias"] = (dst + ("bias",), layer, ID)


def add_layer_norm(plan: Plan, src: str, dst: tuple[str, ...], layer: int | None) -> None:
  """torch LayerNorm `src.{weight,bias}` -> Flax LayerNorm `dst.{scale,bias}`."""
  plan[src + ".weight"] = (dst + ("scale",), layer, ID)
  plan[src + ".bias"] = (dst + ("bias",), layer, ID)


@dataclasses.dataclass
class Conversion:
  """Everything needed to write (or describe) one converted model; built by a family's `prepare_*`."""

  cfg: ModelConfig
  plan: Plan
  refs: dict[str, Ref]
  sources: str  # what was read, for messages
  add_files: Callable[[str], None]  # copies tokenizer / processor files into the output directory
  notes: list[str] = dataclasses.field(default_factory=list)  # format facts the dry run prints


def listing(names: list[str], limit: int = 20) -> str:
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check_complete(where: str, plan: Plan, refs: dict, unexpected: list[str]) -> None:
  """One `ConversionError` listing every missing and every unexpected tensor, if any."""
  missing = sorted(set(plan) - set(refs))
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing tensors ({len(missing)}): {listing(missing)}")
    if unexpected:
      parts.append(f"unexpected tensors ({len(unexpected)}): {listing(sorted(unexpected))}")
    raise ConversionError(f"{where}: " + "; ".join(parts))


def expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Parameter path -> shape, from `jax.eval_shape` of the Flax model (nothing allocated)."""
  import jax
  from flax import nnx

  from c3l_jax.models.vlm import build_vlm

  abstract = nnx.state(nnx.eval_shape(lambda: build_vlm(cfg, nnx.Rngs(0))), nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract))[0]
  return {tuple(k.key for k in keys): tuple(v.shape) for keys, v in flat}


def _leaves(conv: Conversion, expected: dict) -> dict[tuple[str, ...], list[tuple[int | None, str]]]:
  leaves: dict[tuple[str, ...], list[tuple[int | None, str]]] = {}
  for name, (path, layer, _) in conv.plan.items():
    leaves.setdefault(path, []).append((layer, name))
  if set(leaves) != set(expected):
    raise ConversionError(f"internal: the plan covers {sorted(set(leaves) ^ set(expected))} wrongly")
  return leaves


def _shape_error(name: str, ref: Ref, got: tuple, want: tuple, path: tuple[str, ...]) -> ConversionError:
  return ConversionError(f"tensor {name} has shape {tuple(ref.shape)}: after conversion {got}, but the "
                         f"config implies {want} for {'.'.join(path)}")


def _transformed_shape(transform: Transform, ref: Ref) -> tuple[int, ...]:
  """The shape `transform` gives the tensor, computed on a zero-stride stand-in (no data read)."""
  stand_in = np.lib.stride_tricks.as_strided(np.zeros(1, ref.dtype), shape=tuple(ref.shape),
                                             strides=(0,) * len(ref.shape), writeable=False)
  return tuple(transform(stand_in).shape)


def check_shapes(conv: Conversion) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Check every planned tensor's converted shape against the model (headers only); returns the
  parameter shapes."""
  expected = expected_shapes(conv.cfg)
  for path, sources in _leaves(conv, expected).items():
    for layer, name in sources:
      want = expected[path] if layer is None else expected[path][1:]
      got = _transformed_shape(conv.plan[name][2], conv.refs[name])
      if got != want:
        raise _shape_error(name, conv.refs[name], got, want, path)
  return expected


def target_dtype(dtype: str | None) -> np.dtype | None:
  return None if dtype is None else np.dtype(getattr(ml_dtypes, dtype, dtype))


def write_model(conv: Conversion, out: str, dtype: str | None) -> None:
  """Assemble, shape-check and save every parameter one at a time into `out.partial`, add the config
  and the tokenizer / processor files, then rename into `out` (replaced if present).

  Streaming: each Flax parameter is assembled from its tensors (layers stacked), saved and freed before
  the next, so peak memory is about twice the largest stacked parameter, a fraction of the model.
  """
  expected = expected_shapes(conv.cfg)
  leaves = _leaves(conv, expected)
  partial = out.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  want_dtype = target_dtype(dtype)
  for path, sources in tqdm.tqdm(sorted(leaves.items()), desc="convert", unit="param"):
    value = _assemble(conv, path, sources, expected[path], want_dtype)
    checkpoint.save_param(partial, path, value)
    del value
  checkpoint.save_model_config(partial, conv.cfg)
  conv.add_files(partial)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(partial, out)


def _assemble(conv: Conversion, path: tuple[str, ...], sources: list[tuple[int | None, str]],
              shape: tuple[int, ...], dtype: np.dtype | None) -> np.ndarray:
  """One Flax parameter from its source tensor(s): transformed, stacked over layers, shape-checked."""
  value = None
  for layer, name in sources:
    part = conv.plan[name][2](conv.refs[name].read())
    want = shape if layer is None else shape[1:]
    if part.shape != want:
      raise _shape_error(name, conv.refs[name], part.shape, want, path)
    if layer is None:
      return np.asarray(part, dtype=dtype or part.dtype)
    if value is None:
      value = np.empty(shape, dtype or part.dtype)
    value[layer] = part
  return value


def describe_architecture(cfg: ModelConfig) -> list[str]:
  """A few lines naming the model's parts and sizes."""
  t = cfg.text
  v = cfg.vision
  lines = [f"family: {cfg.family}"]
  if cfg.family == "qwen25vl":
    lines.append(f"vision: Qwen2.5-VL ViT, {v.depth} blocks, width {v.hidden_size}, {v.num_heads} heads, "
                 f"patch {v.patch_size}, windows of {v.window_size} px, full attention in blocks "
                 f"{list(v.fullatt_block_indexes)}")
    lines.append(f"connector: {v.spatial_merge_size}x{v.spatial_merge_size} patch merger (MLP), one "
                 f"image token per {v.spatial_merge_size * v.patch_size} px square "
                 f"({cfg.min_pixels:,} .. {cfg.max_pixels:,} pixels per image)")
    lines.append(f"language model: Qwen2, {t.num_hidden_layers} layers, width {t.hidden_size}, "
                 f"{t.num_attention_heads} heads ({t.num_key_value_heads} kv), mlp {t.intermediate_size}, "
                 f"vocab {t.vocab_size}, M-RoPE {list(t.rope.mrope_section)} theta {t.rope.theta:g}, "
                 f"{'tied' if t.tie_word_embeddings else 'untied'} head")
    return lines
  vision_kind = "CLIP ViT" if cfg.family == "llava15" else "EVA ViT"
  lines.append(f"vision: {vision_kind}, {v.num_hidden_layers} layers, width {v.hidden_size}, "
               f"{v.num_attention_heads} heads, {v.image_size} px / patch {v.patch_size}")
  if cfg.family == "llava15":
    lines.append(f"connector: 2-layer MLP ({cfg.projector_hidden_act}), features of layer(s) "
                 f"{list(cfg.feature_layers)}, {cfg.image_seq_length} image tokens")
  else:
    q = cfg.qformer
    lines.append(f"connector: {'Q-Former, ' + str(q.num_hidden_layers) + ' layers' if q else '4-patch concat'}"
                 f" + llama_proj, {cfg.image_seq_length} image tokens")
  lines.append(f"language model: Llama, {t.num_hidden_layers} layers, width {t.hidden_size}, "
               f"{t.num_attention_heads} heads ({t.num_key_value_heads} kv), mlp {t.intermediate_size}, "
               f"vocab {t.vocab_size}, rope {t.rope.rope_type} theta {t.rope.theta:g}, "
               f"{t.max_position_embeddings} positions")
  return lines


def dry_run_report(conv: Conversion, dtype: str | None) -> list[str]:
  """What `write_model` would write, from the headers alone: architecture, parameter count, bytes per
  source dtype and the output size. Raises `ConversionError` where the conversion would fail."""
  expected = check_shapes(conv)
  planned = sum(int(np.prod(s, dtype=np.int64)) for s in expected.values())
  by_dtype: dict[str, int] = {}
  source_params = 0
  for ref in conv.refs.values():
    n = int(np.prod(ref.shape, dtype=np.int64))
    source_params += n
    name = np.dtype(ref.dtype).name
    by_dtype[name] = by_dtype.get(name, 0) + n * np.dtype(ref.dtype).itemsize
  want = target_dtype(dtype)
  out_bytes = 0
  for path, shape in expected.items():
    n = int(np.prod(shape, dtype=np.int64))
    if want is not None:
      out_bytes += n * want.itemsize
    else:  # a stacked parameter keeps its first tensor's dtype
      name = next(k for k, (p, _, _) in conv.plan.items() if p == path)
      out_bytes += n * np.dtype(conv.refs[name].dtype).itemsize
  lines = [f"sources: {conv.sources}", *describe_architecture(conv.cfg), *conv.notes,
           f"tensors: {len(conv.refs):,} read -> {len(expected):,} parameters (layers stacked)",
           f"parameters: {source_params:,}"]
  if planned != source_params:  # e.g. a resized position embedding
    lines.append(f"parameters after conversion: {planned:,}")
  for name in sorted(by_dtype):
    lines.append(f"input {name}: {by_dtype[name]:,} bytes")
  lines.append(f"output: {out_bytes:,} bytes ({dtype or 'dtypes kept'})")
  return lines
