r"""Convert transformers checkpoints into a self-contained c3l-jax model directory.

    python -m c3l_jax.convert --hf_path=llava-1.5-7b-hf --out=checkpoints/llava15-7b [--dtype=bfloat16]
    python -m c3l_jax.convert --family=minigpt4 --blip2_path=blip2-flan-t5-xxl --llm_path=vicuna-7b-v0 \
        --proj_path=prerained_minigpt4_7b.pth --out=checkpoints/minigpt4-7b [--variant=llama2] [--image_size=N]

LLaVA-1.5 (`--family=llava15`, the default):

Reads `config.json` and the (single or sharded) `*.safetensors` files, maps every tensor onto the Flax
parameter tree (`c3l_jax.models.vlm.LlavaVLM`, layers stacked on axis 0), writes it with orbax, and copies
the tokenizer / processor / chat-template files so the output is all a run needs.

Streaming: each Flax parameter is assembled from its tensors (layers stacked), saved and freed before the
next, so peak memory is about twice the largest stacked parameter, a fraction of the model. Accepted key layouts:
`vision_tower.vision_model.*` / `vision_tower.*` / `model.vision_tower.*`, `language_model.model.*` /
`model.language_model.*`, and `lm_head.*` / `language_model.lm_head.*` (transformers 4.x, 5.x and the
original llava-hf uploads).

MiniGPT-4 (`--family=minigpt4`, `convert_minigpt4`) reads three sources:
- `--blip2_path`: a transformers BLIP-2 directory (`model_type: blip-2`, any language model): the EVA ViT-g
  (`vision_model.*`, its `post_layernorm` being MiniGPT-4's `ln_vision`), the Q-Former (`qformer.*`) and
  `query_tokens`. Its language model / projection and the Q-Former's text-only feed-forward are ignored.
- `--llm_path`: a transformers Llama directory (Vicuna v0 / Llama-2-chat): the decoder and the tokenizer.
- `--proj_path`: MiniGPT-4's released checkpoint (`.pth`, `{"model": {...}}` or flat, read with torch
  `weights_only=True`; or `.safetensors`) holding `llama_proj.weight` / `llama_proj.bias`.
`--variant` is `vicuna0` (Q-Former, `###Human:` prompts) or `llama2` (no Q-Former, 4 adjacent patches
concatenated, `[INST]` prompts); by default it follows `llama_proj`'s input width. `--image_size` (default:
the BLIP-2 config's, 224 as both released MiniGPT-4 checkpoints use) other than the checkpoint's resizes
the ViT's position embeddings as EVA's `interpolate_pos_embed` does (bicubic, `align_corners=False`).
The output holds `c3l_model.json`, `params/`, the LLM's tokenizer files and a BLIP image processor
(`preprocessor_config.json`: bicubic resize to the image size, BLIP-2 mean / std).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from typing import Any, Callable, Iterator, NamedTuple

import ml_dtypes
import numpy as np
import tqdm
from absl import app, flags, logging

from c3l_jax import checkpoint
from c3l_jax.models.configs import (LlamaConfig, LlavaConfig, MiniGPT4Config, ModelConfig,
                                    from_hf_config, minigpt4_from_hf)

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_IGNORED = (
    re.compile(r"vision\.embeddings\.position_ids"),  # buffer in old checkpoints
    re.compile(r"text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),  # buffer in old checkpoints
)


class ConversionError(ValueError):
  """The input directory cannot be converted; the message says why."""


class TensorRef(NamedTuple):
  """Where one tensor lives in a safetensors file."""

  file: str
  offset: int  # absolute byte offset of the data
  dtype: np.dtype
  shape: tuple[int, ...]

  def read(self) -> np.ndarray:
    """Read just this tensor (`np.fromfile`, no memory map: converted tensors leave no resident pages)."""
    with open(self.file, "rb") as f:
      f.seek(self.offset)
      data = np.fromfile(f, dtype=self.dtype, count=int(np.prod(self.shape, dtype=np.int64)))
    return data.reshape(self.shape)


class ArrayRef(NamedTuple):
  """A tensor already in memory (from a torch `.pth`); same interface as `TensorRef`."""

  array: np.ndarray

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.array.shape)

  def read(self) -> np.ndarray:
    return self.array


def read_safetensors_index(path: str) -> dict[str, TensorRef]:
  """Tensor name -> `TensorRef` from one safetensors file's header (bfloat16 included).

  `safetensors`' numpy backend cannot represent bfloat16, so the (tiny, documented) format is read
  directly: an 8-byte little-endian header size, a JSON header, then raw little-endian tensor bytes.
  """
  with open(path, "rb") as f:
    (header_size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_size))
  header.pop("__metadata__", None)
  refs = {}
  for name, info in header.items():
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    refs[name] = TensorRef(path, 8 + header_size + info["data_offsets"][0],
                           np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"]))
  return refs


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yield `(name, array)` for every tensor of one safetensors file, one at a time."""
  for name, ref in sorted(read_safetensors_index(path).items(), key=lambda kv: kv[1].offset):
    yield name, ref.read()


def canonical_name(key: str) -> str | None:
  """Map any accepted layout to `vision.*`, `projector.*`, `text.*` or `lm_head.*`; None if unknown."""
  k = key[len("model."):] if key.startswith("model.") else key
  for prefix, out in (("vision_tower.vision_model.", "vision."), ("vision_tower.", "vision."),
                      ("multi_modal_projector.", "projector."), ("language_model.model.", "text."),
                      ("language_model.lm_head.", "lm_head."), ("language_model.", "text."),
                      ("lm_head.", "lm_head.")):
    if k.startswith(prefix):
      return out + k[len(prefix):]
  return None


Transform = Callable[[np.ndarray], np.ndarray]
_T: Transform = lambda w: w.T  # torch Linear [out, in] -> Flax kernel [in, out]
_ID: Transform = lambda w: w


Plan = dict[str, tuple[tuple[str, ...], int | None, Transform]]


def _text_plan(t: LlamaConfig) -> Plan:
  """`text.*` / `lm_head.*` -> `language_model.*` (the Llama decoder, every family)."""
  plan: Plan = {}
  lm = ("language_model",)
  plan["text.embed_tokens.weight"] = (lm + ("embed_tokens", "embedding"), None, _ID)
  plan["text.norm.weight"] = (lm + ("norm", "weight"), None, _ID)
  if not t.tie_word_embeddings:
    plan["lm_head.weight"] = (lm + ("lm_head", "kernel"), None, _T)
  for i in range(t.num_hidden_layers):
    src = f"text.layers.{i}."
    for hf, ours, has_bias in (
        ("self_attn.q_proj", "q_proj", t.attention_bias), ("self_attn.k_proj", "k_proj", t.attention_bias),
        ("self_attn.v_proj", "v_proj", t.attention_bias), ("self_attn.o_proj", "o_proj", t.attention_bias),
        ("mlp.gate_proj", "gate_proj", t.mlp_bias), ("mlp.up_proj", "up_proj", t.mlp_bias),
        ("mlp.down_proj", "down_proj", t.mlp_bias)):
      plan[src + hf + ".weight"] = (lm + ("layers", ours, "kernel"), i, _T)
      if has_bias:
        plan[src + hf + ".bias"] = (lm + ("layers", ours, "bias"), i, _ID)
    for n in ("input_layernorm", "post_attention_layernorm"):
      plan[src + n + ".weight"] = (lm + ("layers", n, "weight"), i, _ID)
  return plan


def conversion_plan(cfg: LlavaConfig) -> Plan:
  """canonical HF name -> (parameter path, layer index or None, transform)."""
  plan: Plan = {}
  v = cfg.vision
  vt = ("vision_tower",)
  plan["vision.embeddings.patch_embedding.weight"] = (
      vt + ("patch_embedding", "kernel"), None, lambda w: w.reshape(w.shape[0], -1).T)
  plan["vision.embeddings.class_embedding"] = (vt + ("class_embedding",), None, _ID)
  plan["vision.embeddings.position_embedding.weight"] = (vt + ("position_embedding",), None, _ID)
  plan["vision.pre_layrnorm.weight"] = (vt + ("pre_layrnorm", "scale"), None, _ID)
  plan["vision.pre_layrnorm.bias"] = (vt + ("pre_layrnorm", "bias"), None, _ID)
  plan["vision.post_layernorm.weight"] = (vt + ("post_layernorm", "scale"), None, _ID)
  plan["vision.post_layernorm.bias"] = (vt + ("post_layernorm", "bias"), None, _ID)
  for i in range(v.num_hidden_layers):
    src = f"vision.encoder.layers.{i}."
    for hf, ours in (("self_attn.q_proj", "q_proj"), ("self_attn.k_proj", "k_proj"),
                     ("self_attn.v_proj", "v_proj"), ("self_attn.out_proj", "out_proj"),
                     ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
      plan[src + hf + ".weight"] = (vt + ("layers", ours, "kernel"), i, _T)
      plan[src + hf + ".bias"] = (vt + ("layers", ours, "bias"), i, _ID)
    for n in ("layer_norm1", "layer_norm2"):
      plan[src + n + ".weight"] = (vt + ("layers", n, "scale"), i, _ID)
      plan[src + n + ".bias"] = (vt + ("layers", n, "bias"), i, _ID)
  for n in ("linear_1", "linear_2"):
    plan[f"projector.{n}.weight"] = (("multi_modal_projector", n, "kernel"), None, _T)
    if cfg.multimodal_projector_bias:
      plan[f"projector.{n}.bias"] = (("multi_modal_projector", n, "bias"), None, _ID)
  plan.update(_text_plan(cfg.text))
  return plan


def _weight_files(hf_path: str) -> list[str]:
  index = os.path.join(hf_path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(n for n in os.listdir(hf_path) if n.endswith(".safetensors"))
  if not files:
    other = [n for n in os.listdir(hf_path) if n.endswith(_WEIGHT_SUFFIXES)]
    hint = (f" (found {other}: re-save them as safetensors with transformers' "
            "save_pretrained(safe_serialization=True))" if other else "")
    raise ConversionError(f"no *.safetensors weights in {hf_path!r}{hint}")
  missing = [n for n in files if not os.path.exists(os.path.join(hf_path, n))]
  if missing:
    raise ConversionError(f"weight files listed in the index are missing: {missing}")
  return [os.path.join(hf_path, n) for n in files]


def read_hf_config(hf_path: str) -> LlavaConfig:
  if not os.path.isdir(hf_path):
    raise ConversionError(f"--hf_path {hf_path!r} is not a directory")
  path = os.path.join(hf_path, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"{hf_path!r} has no config.json: not a transformers checkpoint")
  with open(path) as f:
    raw = json.load(f)
  try:
    return from_hf_config(raw)
  except (ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{path}: {e}") from e


def _list(names: list[str], limit: int = 20) -> str:
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def convert(hf_path: str, out: str, dtype: str | None = None) -> LlavaConfig:
  """Convert `hf_path` into the model directory `out` (replaced if present); returns the model config.

  Every tensor name is checked against the plan before any data is read. Then each parameter of the
  Flax tree is assembled (layers stacked), shape-checked against the model and saved on its own, so
  peak memory is about twice the largest stacked parameter, not the model. The output is written to
  `out.partial` and renamed into place when complete.

  Args:
    dtype: storage dtype of the parameters (`float32`, `bfloat16`, `float16`); None keeps each tensor's.
  Raises:
    ConversionError: missing directory / config / weights, a non-LLaVA config, missing or unexpected
      tensors (all of them listed), or a tensor whose shape disagrees with the config.
  """
  cfg = read_hf_config(hf_path)
  plan = conversion_plan(cfg)
  refs: dict[str, TensorRef] = {}
  unexpected: list[str] = []
  for file in _weight_files(hf_path):
    for key, ref in read_safetensors_index(file).items():
      name = canonical_name(key)
      if name in plan:
        refs[name] = ref
      elif name is None or not any(p.fullmatch(name) for p in _IGNORED):
        unexpected.append(key)
  _check_complete(hf_path, plan, refs, unexpected)
  _write_model(cfg, plan, refs, out, dtype, lambda partial: _copy_processor_files(hf_path, partial))
  return cfg


def _check_complete(where: str, plan: Plan, refs: dict, unexpected: list[str]) -> None:
  """One `ConversionError` listing every missing and every unexpected tensor, if any."""
  missing = sorted(set(plan) - set(refs))
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing tensors ({len(missing)}): {_list(missing)}")
    if unexpected:
      parts.append(f"unexpected tensors ({len(unexpected)}): {_list(sorted(unexpected))}")
    raise ConversionError(f"{where}: " + "; ".join(parts))


def _write_model(cfg: ModelConfig, plan: Plan, refs: dict, out: str, dtype: str | None,
                 add_files: Callable[[str], None]) -> None:
  """Assemble, shape-check and save every parameter one at a time into `out.partial`, add the config
  and `add_files(partial)`, then rename into `out`."""
  expected = _expected_shapes(cfg)
  leaves: dict[tuple[str, ...], list[tuple[int | None, str]]] = {}
  for name, (path, layer, _) in plan.items():
    leaves.setdefault(path, []).append((layer, name))
  if set(leaves) != set(expected):
    raise ConversionError(f"internal: the plan covers {sorted(set(leaves) ^ set(expected))} wrongly")
  partial = out.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  target_dtype = None if dtype is None else np.dtype(getattr(ml_dtypes, dtype, dtype))
  for path, sources in tqdm.tqdm(sorted(leaves.items()), desc="convert", unit="param"):
    value = _assemble(path, sources, plan, refs, expected[path], target_dtype)
    checkpoint.save_param(partial, path, value)
    del value
  checkpoint.save_model_config(partial, cfg)
  add_files(partial)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(partial, out)


def _assemble(path: tuple[str, ...], sources: list[tuple[int | None, str]], plan, refs,
              shape: tuple[int, ...], dtype: np.dtype | None) -> np.ndarray:
  """One Flax parameter from its HF tensor(s): transformed, stacked over layers, shape-checked."""
  value = None
  for layer, name in sources:
    part = plan[name][2](refs[name].read())
    want = shape if layer is None else shape[1:]
    if part.shape != want:
      raise ConversionError(f"tensor {name} has shape {refs[name].shape}: after conversion "
                            f"{part.shape}, but the config implies {want} for {'.'.join(path)}")
    if layer is None:
      return np.asarray(part, dtype=dtype or part.dtype)
    if value is None:
      value = np.empty(shape, dtype or part.dtype)
    value[layer] = part
  return value


def _expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Parameter path -> shape, from `jax.eval_shape` of the Flax model (nothing allocated)."""
  import jax
  from flax import nnx

  from c3l_jax.models.vlm import build_vlm

  abstract = nnx.state(nnx.eval_shape(lambda: build_vlm(cfg, nnx.Rngs(0))), nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract))[0]
  return {tuple(k.key for k in keys): tuple(v.shape) for keys, v in flat}


def _copy_processor_files(hf_path: str, out: str) -> None:
  """Copy tokenizer, processor, chat template and HF config files (everything but the weights)."""
  for name in os.listdir(hf_path):
    src = os.path.join(hf_path, name)
    if (os.path.isfile(src) and not name.endswith(_WEIGHT_SUFFIXES)
        and name != "model.safetensors.index.json"):
      shutil.copy2(src, os.path.join(out, name))


# ---------------------------------------------------------------------------------------------------
# MiniGPT-4: BLIP-2 (EVA ViT-g + Q-Former) + Llama + MiniGPT-4's llama_proj.

_BLIP2_IGNORED = (
    re.compile(r"(language_model|language_projection|text_projection|vision_projection|itm_head)\..*"),
    re.compile(r"qformer\.embeddings\..*"),  # text embeddings (retrieval checkpoints)
    re.compile(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..*"),  # text feed-forward
    re.compile(r"vision_model\.embeddings\.position_ids"),
)
_LLM_IGNORED = (re.compile(r"text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)


def bicubic_resize_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
  """`[size_out, size_in]` weights of torch's 1-D bicubic interpolation (`align_corners=False`).

  As `torch.nn.functional.interpolate(mode="bicubic")`: source coordinate `(o + 0.5) * in / out - 0.5`
  (not clamped), Keys' cubic convolution with `a = -0.75`, out-of-range taps clamped to the border.
  """
  def cubic(x):
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))

  m = np.zeros((size_out, size_in), np.float64)
  for o in range(size_out):
    src = (o + 0.5) * size_in / size_out - 0.5
    base = int(np.floor(src))
    t = src - base
    for k, offset in enumerate((-1, 0, 1, 2)):
      m[o, min(max(base + offset, 0), size_in - 1)] += cubic(t - offset)
  return m


def interpolate_position_embedding(pos: np.ndarray, grid_out: int) -> np.ndarray:
  """`[1 + g*g, D]` (CLS first) -> `[1 + grid_out^2, D]`: EVA's `interpolate_pos_embed` (bicubic)."""
  n, d = pos.shape
  g = int(round((n - 1) ** 0.5))
  if g * g != n - 1:
    raise ConversionError(f"position embedding of {n - 1} patches is not a square grid")
  if g == grid_out:
    return pos
  m = bicubic_resize_matrix(g, grid_out)
  grid = pos[1:].astype(np.float64).reshape(g, g, d)
  out = np.einsum("ih,jw,hwd->ijd", m, m, grid).reshape(grid_out * grid_out, d)
  return np.concatenate([pos[:1], out.astype(pos.dtype)], axis=0)


def _eva_plan(cfg: MiniGPT4Config) -> Plan:
  """`vision.*` (BLIP-2 `vision_model.*`) -> `vision_tower.*` (`EVAViT`)."""
  v = cfg.vision
  vt = ("vision_tower",)
  grid = v.image_size // v.patch_size
  plan: Plan = {
      "vision.embeddings.patch_embedding.weight": (
          vt + ("patch_embedding", "kernel"), None, lambda w: w.reshape(w.shape[0], -1).T),
      "vision.embeddings.patch_embedding.bias": (vt + ("patch_embedding", "bias"), None, _ID),
      "vision.embeddings.class_embedding": (vt + ("class_embedding",), None, lambda w: w.reshape(-1)),
      "vision.embeddings.position_embedding": (
          vt + ("position_embedding",), None,
          lambda w: interpolate_position_embedding(w.reshape(-1, w.shape[-1]), grid)),
      "vision.post_layernorm.weight": (vt + ("post_layernorm", "scale"), None, _ID),
      "vision.post_layernorm.bias": (vt + ("post_layernorm", "bias"), None, _ID),
  }
  for i in range(v.num_hidden_layers):
    src = f"vision.encoder.layers.{i}."
    biased = [("self_attn.projection", "projection"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")]
    plan[src + "self_attn.qkv.weight"] = (vt + ("layers", "qkv", "kernel"), i, _T)
    if v.qkv_bias:
      plan[src + "self_attn.qkv.bias"] = (vt + ("layers", "qkv", "bias"), i, _ID)
    for hf, ours in biased:
      plan[src + hf + ".weight"] = (vt + ("layers", ours, "kernel"), i, _T)
      plan[src + hf + ".bias"] = (vt + ("layers", ours, "bias"), i, _ID)
    for n in ("layer_norm1", "layer_norm2"):
      plan[src + n + ".weight"] = (vt + ("layers", n, "scale"), i, _ID)
      plan[src + n + ".bias"] = (vt + ("layers", n, "bias"), i, _ID)
  return plan


def _qformer_plan(cfg: MiniGPT4Config) -> Plan:
  """`qformer.*` and `query_tokens` (BLIP-2) -> `qformer.*` (`QFormer`)."""
  q = cfg.qformer
  assert q is not None
  qf = ("qformer",)
  plan: Plan = {
      "query_tokens": (qf + ("query_tokens",), None, lambda w: w.reshape(-1, w.shape[-1])),
      "qformer.layernorm.weight": (qf + ("layernorm", "scale"), None, _ID),
      "qformer.layernorm.bias": (qf + ("layernorm", "bias"), None, _ID),
  }

  def attention(src: str, dst: tuple[str, ...], layer: int) -> None:
    for hf, ours in (("attention.query", "query"), ("attention.key", "key"),
                     ("attention.value", "value"), ("output.dense", "dense")):
      plan[f"{src}.{hf}.weight"] = (dst + (ours, "kernel"), layer, _T)
      plan[f"{src}.{hf}.bias"] = (dst + (ours, "bias"), layer, _ID)
    plan[f"{src}.output.LayerNorm.weight"] = (dst + ("layer_norm", "scale"), layer, _ID)
    plan[f"{src}.output.LayerNorm.bias"] = (dst + ("layer_norm", "bias"), layer, _ID)

  for i in range(q.num_hidden_layers):
    src = f"qformer.encoder.layer.{i}"
    attention(f"{src}.attention", qf + ("layers", "attention"), i)
    if i % q.cross_attention_frequency == 0:
      attention(f"{src}.crossattention", qf + ("crossattention",), i // q.cross_attention_frequency)
    for hf, ours in (("intermediate_query.dense", "intermediate"), ("output_query.dense", "output")):
      plan[f"{src}.{hf}.weight"] = (qf + ("layers", ours, "kernel"), i, _T)
      plan[f"{src}.{hf}.bias"] = (qf + ("layers", ours, "bias"), i, _ID)
    plan[f"{src}.output_query.LayerNorm.weight"] = (qf + ("layers", "output_layer_norm", "scale"), i, _ID)
    plan[f"{src}.output_query.LayerNorm.bias"] = (qf + ("layers", "output_layer_norm", "bias"), i, _ID)
  return plan


def minigpt4_conversion_plan(cfg: MiniGPT4Config) -> Plan:
  """canonical name -> (parameter path, layer index or None, transform) for a MiniGPT-4 model.

  Canonical names: `vision.*` (BLIP-2 `vision_model.*`), `qformer.*` / `query_tokens` (BLIP-2), `text.*` /
  `lm_head.*` (the Llama directory) and `llama_proj.*` (MiniGPT-4's checkpoint).
  """
  plan = _eva_plan(cfg)
  if cfg.qformer is not None:
    plan.update(_qformer_plan(cfg))
  plan["llama_proj.weight"] = (("llama_proj", "kernel"), None, _T)
  plan["llama_proj.bias"] = (("llama_proj", "bias"), None, _ID)
  plan.update(_text_plan(cfg.text))
  return plan


def _canonical_blip2(key: str) -> str:
  k = key[len("model."):] if key.startswith("model.") else key
  return "vision." + k[len("vision_model."):] if k.startswith("vision_model.") else k


def _canonical_llama(key: str) -> str | None:
  k = key
  for prefix in ("language_model.", "model.language_model."):  # a Llama saved inside a wrapper
    if k.startswith(prefix):
      k = k[len(prefix):]
  if k.startswith("model."):
    return "text." + k[len("model."):]
  if k.startswith("lm_head."):
    return k
  return None


def _read_json(path: str, what: str) -> dict:
  if not os.path.exists(path):
    raise ConversionError(f"{os.path.dirname(path)!r} has no config.json: not a transformers {what} "
                          "directory")
  with open(path) as f:
    return json.load(f)


def read_llama_proj(path: str) -> dict[str, np.ndarray]:
  """`{"llama_proj.weight", "llama_proj.bias"}` from MiniGPT-4's checkpoint (`.pth` or safetensors).

  `.pth` files are read with `torch.load(weights_only=True)` (torch is needed only here); the state dict
  may sit under `"model"` (as MiniGPT-4 saves it) and keys may carry a module prefix. Only `llama_proj`
  is taken: MiniGPT-4 trains nothing else.
  """
  if not os.path.isfile(path):
    raise ConversionError(f"--proj_path {path!r} is not a file")
  if path.endswith(".safetensors"):
    tensors = {k: ref.read() for k, ref in read_safetensors_index(path).items()}
  else:
    try:
      import torch
    except ImportError:
      raise ConversionError(f"reading {path!r} needs torch (pip install torch), or re-save it as "
                            "safetensors with llama_proj.weight / llama_proj.bias") from None
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f"cannot read {path!r} as a torch checkpoint: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
      state = state["model"]
    if not isinstance(state, dict):
      raise ConversionError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    tensors = {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
               for k, v in state.items() if isinstance(v, torch.Tensor)}
  out = {}
  for part in ("weight", "bias"):
    keys = [k for k in tensors if k == f"llama_proj.{part}" or k.endswith(f".llama_proj.{part}")]
    if len(keys) != 1:
      raise ConversionError(f"{path!r}: expected one llama_proj.{part} tensor, found {keys or 'none'} "
                            f"(keys: {_list(sorted(tensors))})")
    out[f"llama_proj.{part}"] = np.asarray(tensors[keys[0]])
  ignored = len(tensors) - 2
  if ignored:
    logging.info("%s: ignored %d tensors that are not llama_proj", path, ignored)
  return out


def read_minigpt4_config(blip2_path: str, llm_path: str, proj_in: int, variant: str | None = None,
                         image_size: int | None = None) -> MiniGPT4Config:
  """The `MiniGPT4Config` of the three sources; `variant=None` follows `llama_proj`'s input width
  `proj_in` (the Q-Former's width: vicuna0; 4x the ViT's: llama2)."""
  for flag, path in (("--blip2_path", blip2_path), ("--llm_path", llm_path)):
    if not os.path.isdir(path):
      raise ConversionError(f"{flag} {path!r} is not a directory")
  blip2 = _read_json(os.path.join(blip2_path, "config.json"), "BLIP-2")
  llm = _read_json(os.path.join(llm_path, "config.json"), "Llama")
  try:
    if variant is None:
      guess = minigpt4_from_hf(blip2, llm, "vicuna0", image_size)
      variant = "vicuna0" if proj_in == guess.projector_input_size else "llama2"
    cfg = minigpt4_from_hf(blip2, llm, variant, image_size)
  except (ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{blip2_path} / {llm_path}: {e}") from e
  if proj_in != cfg.projector_input_size:
    raise ConversionError(
        f"llama_proj takes {proj_in} features but the {variant} variant feeds it "
        f"{cfg.projector_input_size} ({'the Q-Former width' if cfg.qformer else '4 x the ViT width'})")
  return cfg


def convert_minigpt4(blip2_path: str, llm_path: str, proj_path: str, out: str, dtype: str | None = None,
                     variant: str | None = None, image_size: int | None = None) -> MiniGPT4Config:
  """Convert BLIP-2 + Llama + MiniGPT-4's `llama_proj` into the model directory `out` (see the module
  docstring). Streams one parameter at a time like `convert`; writes `out.partial`, then renames.

  Raises:
    ConversionError: a missing directory / file / config, a config of the wrong kind, missing or
      unexpected tensors (all listed), or a shape that disagrees with the configs.
  """
  proj = read_llama_proj(proj_path)
  if proj["llama_proj.weight"].ndim != 2:
    raise ConversionError(f"llama_proj.weight has shape {proj['llama_proj.weight'].shape}, not 2-D")
  cfg = read_minigpt4_config(blip2_path, llm_path, int(proj["llama_proj.weight"].shape[1]), variant,
                             image_size)
  plan = minigpt4_conversion_plan(cfg)
  refs: dict[str, Any] = {k: ArrayRef(v) for k, v in proj.items()}
  unexpected: list[str] = []
  for file in _weight_files(blip2_path):
    for key, ref in read_safetensors_index(file).items():
      name = _canonical_blip2(key)
      if name in plan:
        refs[name] = ref
      elif cfg.qformer is None and (name.startswith("qformer.") or name == "query_tokens"):
        continue  # the Llama-2 variant has no Q-Former
      elif not any(p.fullmatch(name) for p in _BLIP2_IGNORED):
        unexpected.append(f"{key} (in --blip2_path)")
  for file in _weight_files(llm_path):
    for key, ref in read_safetensors_index(file).items():
      name = _canonical_llama(key)
      if name in plan:
        refs[name] = ref
      elif name is None or not any(p.fullmatch(name) for p in _LLM_IGNORED):
        unexpected.append(f"{key} (in --llm_path)")
  _check_complete(f"{blip2_path} + {llm_path} + {proj_path}", plan, refs, unexpected)

  def add_files(partial: str) -> None:
    for name in os.listdir(llm_path):  # tokenizer (and the LLM's own config / generation config)
      src = os.path.join(llm_path, name)
      if (os.path.isfile(src) and not name.endswith(_WEIGHT_SUFFIXES)
          and name not in ("model.safetensors.index.json", "preprocessor_config.json",
                           "processor_config.json", "chat_template.json", "chat_template.jinja")):
        shutil.copy2(src, os.path.join(partial, name))
    from c3l_jax.data.prompts import blip2_image_processor

    blip2_image_processor(cfg.vision.image_size).save_pretrained(partial)

  _write_model(cfg, plan, refs, out, dtype, add_files)
  return cfg


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("hf_path", None, "transformers LLaVA checkpoint directory (--family=llava15)")
  flags.DEFINE_string("out", None, "output model directory")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "storage dtype (default: keep the checkpoint's)")
  flags.DEFINE_enum("family", "llava15", ["llava15", "minigpt4"], "model family")
  flags.DEFINE_string("blip2_path", None, "minigpt4: transformers BLIP-2 directory (ViT + Q-Former)")
  flags.DEFINE_string("llm_path", None, "minigpt4: transformers Llama / Vicuna directory")
  flags.DEFINE_string("proj_path", None, "minigpt4: MiniGPT-4 checkpoint with llama_proj (.pth or "
                      ".safetensors)")
  flags.DEFINE_enum("variant", None, ["vicuna0", "llama2"],
                    "minigpt4: vicuna0 (Q-Former) or llama2 (4-patch concat); default: from llama_proj")
  flags.DEFINE_integer("image_size", None, "minigpt4: input resolution (default: the BLIP-2 "
                       "config's, 224); another size interpolates the position embeddings")


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  try:
    if FLAGS.family == "minigpt4":
      if not (FLAGS.blip2_path and FLAGS.llm_path and FLAGS.proj_path):
        raise app.UsageError("--family=minigpt4 needs --blip2_path, --llm_path and --proj_path")
      cfg = convert_minigpt4(FLAGS.blip2_path, FLAGS.llm_path, FLAGS.proj_path, FLAGS.out, FLAGS.dtype,
                             FLAGS.variant, FLAGS.image_size)
    else:
      if not FLAGS.hf_path:
        raise app.UsageError("--hf_path is required (or --family=minigpt4 with its three paths)")
      cfg = convert(FLAGS.hf_path, FLAGS.out, FLAGS.dtype)
  except (ConversionError, checkpoint.CheckpointError) as e:
    raise SystemExit(f"error: {e}")
  logging.info("converted %s -> %s (%d text layers, %d vision layers)", FLAGS.hf_path, FLAGS.out,
               cfg.text.num_hidden_layers, cfg.vision.num_hidden_layers)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
