"""A tiny world for whole-pipeline tests: a converted random LLaVA taught to answer in QA format, and an
image corpus with one of every kind of bad input.

A random tiny model never writes "Question: ... Answer: ...", so every sample would be quarantined as
unparsable and later stages would get nothing. `teach_qa_format` fine-tunes the converted checkpoint
(the project's own trainer, CE only, a few seconds) to answer every prompt the pipeline sends — caption
instructions and VIGC instructions with the image, and the text-only QA-from-caption prompts — with a
QA pair that depends on the instruction type.
"""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image

from hf_reference import convert_cli, make_hf_llava, make_tiny_processor

# What the taught model answers, per instruction type (its tiny tokenizer knows these words).
TARGETS = {
    "conversation": "Question: what color is the circle? Answer: the circle is red",
    "detailed_description": "Question: describe the image Answer: a small blue square is on the left",
    "complex_reasoning": "Question: why is the dog next to the car? Answer: because the dog is with "
                         "the car",
}
CAPTION = "a red circle and a blue square"

GOOD_IMAGES = 6
# Bad inputs of the image list, with the reason each must be quarantined with.
BAD_LINES = {
    b'{"id": "x1", "image": "im0.png"': "malformed JSON",
    b'{"id": "x2"}': "missing field 'image'",
    b'{"id": "x3", "image": "  "}': "empty field 'image'",
    b'{"id": "im1", "image": "im2.png"}': "duplicate id",
    b'{"id": "x4", "image": "\xff\xfe.png"}': "not valid UTF-8",
}
BAD_IMAGES = {
    "missing.png": "missing image",
    "corrupt.jpg": "corrupt or truncated",
    "truncated.png": "corrupt or truncated",
    "empty.png": "zero-byte",
    "notes.jpg": "not an image",
    "huge.png": "over the limit",
}
MAX_PIXELS = 3000  # huge.png (80x80) is over it, the good 40x40 images are not


def make_images(root: str) -> str:
  """`root/images/` + `root/images.jsonl` (good and bad lines); returns the JSONL path."""
  images = os.path.join(root, "images")
  os.makedirs(images, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(GOOD_IMAGES):
    PIL.Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(f"{images}/im{i}.png")
  PIL.Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(f"{images}/huge.png")
  with open(f"{images}/im0.png", "rb") as f:
    png = f.read()
  with open(f"{images}/truncated.png", "wb") as f:
    f.write(png[:len(png) // 2])
  with open(f"{images}/corrupt.jpg", "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  open(f"{images}/empty.png", "wb").close()
  with open(f"{images}/notes.jpg", "w") as f:
    f.write("plain text\n")
  lines = [json.dumps({"id": f"im{i}", "image": f"im{i}.png"}).encode() for i in range(GOOD_IMAGES)]
  lines[2:2] = list(BAD_LINES)
  lines.append(json.dumps({"id": "im0_again", "image": "im0.png"}).encode())  # generated for once
  lines += [json.dumps({"id": f"bad_{name}", "image": name}).encode() for name in BAD_IMAGES]
  path = os.path.join(root, "images.jsonl")
  with open(path, "wb") as f:
    f.write(b"\n".join(lines) + b"\n")
  return path


def teach_qa_format(model_dir: str, images_dir: str, steps: int = 40) -> None:
  """Fine-tune `model_dir` in place so it answers the pipeline's prompts with `TARGETS`."""
  import jax
  from flax import nnx

  from c3l_jax import checkpoint, sharding
  from c3l_jax import train as T
  from c3l_jax.data import instructions as ins
  from c3l_jax.data.images import load_image
  from c3l_jax.data.prompts import VIGC_INSTRUCTIONS, PromptBuilder, load_processor
  from c3l_jax.models.vlm import image_inputs

  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  vlm = sharding.load_model(model_dir, mesh)
  builder = PromptBuilder(load_processor(model_dir), vlm.cfg.image_token_id, vlm.cfg.image_seq_length)
  answer = lambda text: builder.encode_answer(text) + list(builder.eos_ids)  # noqa: E731
  image = load_image(os.path.join(images_dir, "im0.png"))
  with_image, text_only = [], []
  for instruction in ins.CAPTION_INSTRUCTIONS:
    prompt, pixels = builder.encode_prompt(instruction, image)
    with_image.append({"prompt": prompt, "target": answer(CAPTION), "pixels": pixels})
  for kind, target in TARGETS.items():
    prompt, pixels = builder.encode_prompt(VIGC_INSTRUCTIONS[kind], image)
    with_image.append({"prompt": prompt, "target": answer(target), "pixels": pixels})
    for instruction in ins.QA_FROM_CAPTION[kind]:
      prompt, _ = builder.encode_prompt(ins.qa_from_caption_prompt(CAPTION, instruction), None)
      text_only.append({"prompt": prompt, "target": answer(target), "pixels": None})
  cfg = T.TrainConfig(learning_rate=3e-3, steps=steps, contrastive_weight=0.0, warmup_steps=0,
                      trainable=("connector", "decoder"))
  trainer = T.Trainer(T.Generator(vlm, rngs=nnx.Rngs(0)), mesh, cfg)

  def batch(step: int) -> dict:
    pool = with_image if step % 2 == 0 else text_only
    rng = np.random.default_rng(step)
    return {"ce": T.ce_batch([pool[i] for i in rng.choice(len(pool), 8)], builder.pad_id,
                             images=image_inputs(vlm.cfg))}

  trainer.run(batch)
  params = nnx.to_pure_dict(nnx.state(trainer.model().vlm, nnx.Param))
  checkpoint.save_params(model_dir, jax.device_get(params))


def make_world(root: str) -> dict:
  """Model (converted, then taught the QA format) + image corpus under `root`."""
  make_hf_llava(os.path.join(root, "hf"), logit_scale=8.0)
  make_tiny_processor(os.path.join(root, "hf"))
  model = os.path.join(root, "model")
  assert convert_cli(os.path.join(root, "hf"), model).returncode == 0
  records = make_images(root)
  teach_qa_format(model, os.path.join(root, "images"))
  return {"root": root, "model": model, "records": records, "images": os.path.join(root, "images")}


def rows(path) -> list[dict]:
  """The records of a JSONL file."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def parts(workdir, stage: str) -> list[dict]:
  """Every record a stage wrote to its part files, in part order (not the quarantine)."""
  d = os.path.join(workdir, stage)
  return [r for p in sorted(os.listdir(d)) if p.startswith("part-") and p.endswith(".jsonl")
          and "rejected" not in p for r in rows(os.path.join(d, p))]


def tree(directory, workdir) -> dict[str, bytes]:
  """Every file under `directory` (relative path -> bytes), the workdir's path replaced by "W"."""
  out = {}
  for base, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read().replace(str(workdir).encode(), b"W")
  return out
