r"""Convert a transformers LLaVA checkpoint directory into a self-contained c3l-jax model directory.

    python -m c3l_jax.convert --hf_path=llava-1.5-7b-hf --out=checkpoints/llava15-7b [--dtype=bfloat16]

Reads `config.json` and the (single or sharded) `*.safetensors` files, maps every tensor onto the Flax
parameter tree (`c3l_jax.models.vlm.LlavaVLM`, layers stacked on axis 0), writes it with orbax, and copies
the tokenizer / processor / chat-template files so the output is all a run needs.

Streaming: each Flax parameter is assembled from its tensors (layers stacked), saved and freed before the
next, so peak memory is about twice the largest stacked parameter, a fraction of the model. Accepted key layouts:
`vision_tower.vision_model.*` / `vision_tower.*` / `model.vision_tower.*`, `language_model.model.*` /
`model.language_model.*`, and `lm_head.*` / `language_model.lm_head.*` (transformers 4.x, 5.x and the
original llava-hf uploads).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from typing import Callable, Iterator, NamedTuple

import ml_dtypes
import numpy as np
import tqdm
from absl import app, flags, logging

from c3l_jax import checkpoint
from c3l_jax.models.configs import LlavaConfig, from_hf_config

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


def conversion_plan(cfg: LlavaConfig) -> dict[str, tuple[tuple[str, ...], int | None, Transform]]:
  """canonical HF name -> (parameter path, layer index or None, transform)."""
  plan: dict[str, tuple[tuple[str, ...], int | None, Transform]] = {}
  v, t = cfg.vision, cfg.text
  vt, lm = ("vision_tower",), ("language_model",)
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
  missing = sorted(set(plan) - set(refs))
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing tensors ({len(missing)}): {_list(missing)}")
    if unexpected:
      parts.append(f"unexpected tensors ({len(unexpected)}): {_list(sorted(unexpected))}")
    raise ConversionError(f"{hf_path}: " + "; ".join(parts))

  expected = _expected_shapes(cfg)
  leaves: dict[tuple[str, ...], list[tuple[int | None, str]]] = {}
  for name, (path, layer, _) in plan.items():
    leaves.setdefault(path, []).append((layer, name))
  partial = out.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  target_dtype = None if dtype is None else np.dtype(getattr(ml_dtypes, dtype, dtype))
  for path, sources in tqdm.tqdm(sorted(leaves.items()), desc="convert", unit="param"):
    value = _assemble(path, sources, plan, refs, expected[path], target_dtype)
    checkpoint.save_param(partial, path, value)
    del value
  checkpoint.save_model_config(partial, cfg)
  _copy_processor_files(hf_path, partial)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(partial, out)
  return cfg


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


def _expected_shapes(cfg: LlavaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Parameter path -> shape, from `jax.eval_shape` of the Flax model (nothing allocated)."""
  import jax
  from flax import nnx

  from c3l_jax.models.vlm import LlavaVLM

  abstract = nnx.state(nnx.eval_shape(lambda: LlavaVLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract))[0]
  return {tuple(k.key for k in keys): tuple(v.shape) for keys, v in flat}


def _copy_processor_files(hf_path: str, out: str) -> None:
  """Copy tokenizer, processor, chat template and HF config files (everything but the weights)."""
  for name in os.listdir(hf_path):
    src = os.path.join(hf_path, name)
    if (os.path.isfile(src) and not name.endswith(_WEIGHT_SUFFIXES)
        and name != "model.safetensors.index.json"):
      shutil.copy2(src, os.path.join(out, name))


FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("hf_path", None, "transformers LLaVA checkpoint directory")
  flags.DEFINE_string("out", None, "output model directory")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "storage dtype (default: keep the checkpoint's)")
  flags.DEFINE_enum("family", "llava15", ["llava15"], "model family")


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS.hf_path or not FLAGS.out:
    raise app.UsageError("both --hf_path and --out are required")
  try:
    cfg = convert(FLAGS.hf_path, FLAGS.out, FLAGS.dtype)
  except (ConversionError, checkpoint.CheckpointError) as e:
    raise SystemExit(f"error: {e}")
  logging.info("converted %s -> %s (%d text layers, %d vision layers)", FLAGS.hf_path, FLAGS.out,
               cfg.text.num_hidden_layers, cfg.vision.num_hidden_layers)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
