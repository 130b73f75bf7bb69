"""`python -m c3l_jax.convert`: see the package docstring. Exit status 2 with one `error:` line when the
input cannot be converted (`--dry_run` included)."""

from __future__ import annotations

import os
import sys

from absl import app, flags

from c3l_jax import checkpoint
from c3l_jax.convert import ConversionError, dry_run_report, minigpt4, prepare_hf, write_model

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_path", None, "checkpoint directory: LLaVA-1.5 in transformers' format "
                    "(llava-hf/llava-1.5-7b-hf) or the LLaVA repository's (liuhaotian/llava-v1.5-7b), "
                    "or Qwen2.5-VL (Qwen/Qwen2.5-VL-7B-Instruct; found by its config's model_type)")
flags.DEFINE_string("clip_path", None, "original LLaVA format: the CLIP vision tower's transformers "
                    "directory (openai/clip-vit-large-patch14-336), named by the config's mm_vision_tower")
flags.DEFINE_enum("conv_mode", "vicuna_v1", ["vicuna_v1", "llava_v1"],
                  "original LLaVA format: the conversation template (LLaVA-1.5 trains and evaluates with "
                  "vicuna_v1)")
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
flags.DEFINE_bool("dry_run", False, "read the configs and every tensor header (no tensor data), check "
                  "every name and shape, print the architecture, parameter count, bytes per dtype and "
                  "output size; write nothing")


def main(argv: list[str]) -> None:
  del argv
  if not FLAGS.out and not FLAGS.dry_run:
    raise app.UsageError("--out is required (or --dry_run)")
  try:
    if FLAGS.family == "minigpt4":
      if not (FLAGS.blip2_path and FLAGS.llm_path and FLAGS.proj_path):
        raise app.UsageError("--family=minigpt4 needs --blip2_path, --llm_path and --proj_path")
      conv = minigpt4.prepare(FLAGS.blip2_path, FLAGS.llm_path, FLAGS.proj_path, FLAGS.variant,
                              FLAGS.image_size)
    else:
      if not FLAGS.hf_path:
        raise app.UsageError("--hf_path is required (or --family=minigpt4 with its three paths)")
      conv = prepare_hf(FLAGS.hf_path, FLAGS.clip_path, FLAGS.conv_mode)
    if FLAGS.dry_run:
      for line in dry_run_report(conv, FLAGS.dtype):
        print(line)
      print("dry run: the conversion would succeed; nothing was written")
      return
    write_model(conv, FLAGS.out, FLAGS.dtype)
  except (ConversionError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  vision = conv.cfg.vision
  depth = getattr(vision, "num_hidden_layers", None) or getattr(vision, "depth")
  print(f"wrote {os.path.abspath(FLAGS.out)} ({conv.cfg.family}, {conv.cfg.text.num_hidden_layers} "
        f"text layers, {depth} vision layers)")


if __name__ == "__main__":
  app.run(main)
