r"""Peak RAM of `python -m c3l_jax.convert` against the checkpoint's size.

Writes a random LLaVA-1.5-architecture checkpoint in the llava-hf layout (fp16, sharded safetensors,
transformers' key names), converts it in a subprocess and prints the child's peak RSS as a ratio of the
checkpoint bytes. Not a test.

    python bench/convert_memory.py --size=7b --workdir=/tmp/convmem    # 13.5 GB on disk, twice
    python bench/convert_memory.py --size=1b                            # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {  # text (hidden, intermediate, layers, heads); the vision tower is CLIP ViT-L/14-336.
    "7b": (4096, 11008, 32, 32),
    "3b": (3200, 8640, 26, 32),
    "1b": (2048, 5504, 16, 16),
}


def hf_config(size: str) -> dict:
  d, m, layers, heads = SIZES[size]
  return dict(
      model_type="llava", image_token_index=32000, vision_feature_layer=-2,
      vision_feature_select_strategy="default", projector_hidden_act="gelu", torch_dtype="float16",
      vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                         projection_dim=768),
      text_config=dict(model_type="llama", vocab_size=32064, hidden_size=d, intermediate_size=m,
                       num_hidden_layers=layers, num_attention_heads=heads, rms_norm_eps=1e-5))


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
  v, t = cfg["vision_config"], cfg["text_config"]
  dv, mv, d, m = v["hidden_size"], v["intermediate_size"], t["hidden_size"], t["intermediate_size"]
  shapes: dict[str, tuple[int, ...]] = {
      "vision_tower.vision_model.embeddings.patch_embedding.weight": (dv, 3, 14, 14),
      "vision_tower.vision_model.embeddings.class_embedding": (dv,),
      "vision_tower.vision_model.embeddings.position_embedding.weight": (577, dv),
      "vision_tower.vision_model.pre_layrnorm.weight": (dv,),
      "vision_tower.vision_model.pre_layrnorm.bias": (dv,),
      "vision_tower.vision_model.post_layernorm.weight": (dv,),
      "vision_tower.vision_model.post_layernorm.bias": (dv,),
      "multi_modal_projector.linear_1.weight": (d, dv), "multi_modal_projector.linear_1.bias": (d,),
      "multi_modal_projector.linear_2.weight": (d, d), "multi_modal_projector.linear_2.bias": (d,),
      "language_model.model.embed_tokens.weight": (t["vocab_size"], d),
      "language_model.model.norm.weight": (d,),
      "language_model.lm_head.weight": (t["vocab_size"], d),
  }
  for i in range(v["num_hidden_layers"]):
    p = f"vision_tower.vision_model.encoder.layers.{i}."
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
      shapes[p + f"self_attn.{n}.weight"], shapes[p + f"self_attn.{n}.bias"] = (dv, dv), (dv,)
    shapes[p + "mlp.fc1.weight"], shapes[p + "mlp.fc1.bias"] = (mv, dv), (mv,)
    shapes[p + "mlp.fc2.weight"], shapes[p + "mlp.fc2.bias"] = (dv, mv), (dv,)
    for n in ("layer_norm1", "layer_norm2"):
      shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (dv,), (dv,)
  for i in range(t["num_hidden_layers"]):
    p = f"language_model.model.layers.{i}."
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
      shapes[p + f"self_attn.{n}.weight"] = (d, d)
    shapes[p + "mlp.gate_proj.weight"] = shapes[p + "mlp.up_proj.weight"] = (m, d)
    shapes[p + "mlp.down_proj.weight"] = (d, m)
    shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (d,)
  return shapes


def write_checkpoint(path: str, size: str, shard_bytes: int = 2 << 30) -> int:
  """Random fp16 weights, streamed shard by shard (the writer never holds more than one shard)."""
  from safetensors.numpy import save_file

  os.makedirs(path, exist_ok=True)
  cfg = hf_config(size)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  rng = np.random.default_rng(0)
  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  weight_map, total = {}, 0
  names = []

  def flush():
    name = f"model-{len(names) + 1:05d}.safetensors"
    save_file(shards[-1], os.path.join(path, name))
    weight_map.update({k: name for k in shards[-1]})
    names.append(name)
    shards[-1], sizes[-1] = {}, 0

  for key, shape in tensor_shapes(cfg).items():
    arr = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
    shards[-1][key] = arr
    sizes[-1] += arr.nbytes
    total += arr.nbytes
    if sizes[-1] >= shard_bytes:
      flush()
  if shards[-1]:
    flush()
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  return total


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", choices=sorted(SIZES), default="1b")
  parser.add_argument("--workdir", default="/tmp/c3l_convert_memory")
  parser.add_argument("--keep", action="store_true")
  args = parser.parse_args()
  hf, out = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "out")
  shutil.rmtree(args.workdir, ignore_errors=True)
  t0 = time.time()
  total = write_checkpoint(hf, args.size)
  print(f"wrote {args.size} checkpoint: {total / 2**30:.2f} GiB in {time.time() - t0:.0f}s")
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-m", "c3l_jax.convert", f"--hf_path={hf}", f"--out={out}"],
                        cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if proc.returncode:
    sys.exit(proc.returncode)
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  print(f"convert: {time.time() - t0:.0f}s, peak RSS {peak / 2**30:.2f} GiB = "
        f"{peak / total:.2f}x the checkpoint ({total / 2**30:.2f} GiB)")
  if not args.keep:
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
