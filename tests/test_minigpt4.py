"""MiniGPT-4 (issue 7): EVA ViT-g / Q-Former / whole-model parity with transformers after the converter
CLI, the Llama-2 variant, MiniGPT-4's prompts, generation with the "###" stop string, and the score stage.

One tiny random BLIP-2 + Llama + llama_proj world is built and converted once (module fixture); every
reference is a torch composition of transformers modules (`minigpt4_reference.TorchMiniGPT4`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest

from c3l_jax import sampling, sharding
from c3l_jax.convert import ConversionError, convert_minigpt4
from c3l_jax.data.images import load_image
from c3l_jax.data.prompts import PromptBuilder, load_processor
from hf_reference import REPO
from minigpt4_reference import (IMAGE, LLAMA2_TEMPLATE, NUM_QUERY, STOP, TINY_EVA, TINY_QFORMER, VICUNA_TEMPLATE,
                                VOCAB, TorchMiniGPT4, make_hf_blip2, make_hf_llama, make_llama_proj,
                                make_tiny_tokenizer, save_llama_proj)

GEN_QUESTIONS = ("what color is the circle?", "how many objects are there in the image?")
RECORDS = [
    ("g1", "grey.png", "what color is the circle?", "the circle is red"),
    ("g2", "grey.png", "how many objects are there?", "three"),
    ("r1", "rgba.png", "describe the image", "a small blue square is on the left"),
    ("o1", "odd.jpg", "where is the dog?", "next to the car"),
]
# BLIP-2 / CLIP normalisation (MiniGPT-4's blip2_image_eval).
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _pixels(image: PIL.Image.Image, size: int) -> np.ndarray:
  """MiniGPT-4's `blip2_image_eval` by hand: bicubic resize, ToTensor, Normalize -> `[C, H, W]`."""
  x = np.asarray(image.convert("RGB").resize((size, size), PIL.Image.BICUBIC), np.float32) / 255.0
  return ((x - MEAN) / STD).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("minigpt4")
  images = root / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  PIL.Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L").save(images / "grey.png")
  PIL.Image.fromarray(rng.integers(0, 255, (32, 48, 4), dtype=np.uint8), mode="RGBA").save(images / "rgba.png")
  PIL.Image.fromarray(rng.integers(0, 255, (37, 23, 3), dtype=np.uint8)).save(images / "odd.jpg")

  blip2 = make_hf_blip2(str(root / "blip2"))
  tokenizer = make_tiny_tokenizer(str(root / "llm"))
  llama = make_hf_llama(str(root / "llm"), logit_scale=8.0)
  proj = make_llama_proj(TINY_QFORMER["hidden_size"])
  ref = TorchMiniGPT4(blip2, llama, proj, tokenizer)
  stop_id = tokenizer.convert_tokens_to_ids(STOP)

  # Make "###" the greedy choice a few tokens into the reply to GEN_QUESTIONS[0]: its LM-head row becomes
  # 1.05 x the row of the token greedily chosen at step 2 (whose logit there is positive).
  gen_pixels = _pixels(load_image(str(images / "grey.png")), TINY_EVA["image_size"])
  prompt = VICUNA_TEMPLATE.format(f"{IMAGE} {GEN_QUESTIONS[0]}")
  tokens, logits = ref.greedy(prompt, gen_pixels, 6, [], eos=-1)
  step = next(k for k in range(2, 6) if logits[k, tokens[k]] > 0 and tokens[k] not in (stop_id, 2))
  import torch
  with torch.no_grad():
    llama.lm_head.weight[stop_id] = 1.05 * llama.lm_head.weight[tokens[step]]
  llama.save_pretrained(str(root / "llm"))
  save_llama_proj(proj, str(root / "minigpt4.pth"))

  out = root / "model"
  proc = subprocess.run(
      [sys.executable, "-m", "c3l_jax.convert", "--family=minigpt4", f"--blip2_path={root / 'blip2'}",
       f"--llm_path={root / 'llm'}", f"--proj_path={root / 'minigpt4.pth'}", f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  model = sharding.load_model(str(out), mesh)
  return dict(root=root, images=images, blip2=blip2, llama=llama, tokenizer=tokenizer, ref=ref,
              model_dir=str(out), model=model, stop_id=stop_id)


def test_converted_config(world):
  cfg = world["model"].cfg
  assert cfg.family == "minigpt4" and cfg.variant == "vicuna0"
  assert cfg.image_seq_length == NUM_QUERY and cfg.image_token_id == VOCAB
  assert cfg.qformer.cross_attention_layers == (0, 2)
  assert cfg.vision.layer_norm_eps == 1e-6 and cfg.qformer.layer_norm_eps == 1e-12


def test_vision_tower_matches_blip2_vision_model(world):
  import torch

  px = np.random.default_rng(1).standard_normal((2, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    want = world["blip2"].vision_model(pixel_values=torch.as_tensor(px)).last_hidden_state.numpy()
  got = np.asarray(world["model"].vision_tower(px))
  assert got.shape == want.shape == (2, 5, TINY_EVA["hidden_size"])
  assert np.abs(got - want).max() < 1e-4


def test_qformer_matches_blip2_qformer_model(world):
  import torch

  rng = np.random.default_rng(2)
  enc = rng.standard_normal((2, 5, TINY_EVA["hidden_size"])).astype(np.float32)
  queries = rng.standard_normal((2, NUM_QUERY, TINY_QFORMER["hidden_size"])).astype(np.float32)
  with torch.no_grad():
    want = world["blip2"].qformer(query_embeds=torch.as_tensor(queries),
                                  encoder_hidden_states=torch.as_tensor(enc)).last_hidden_state.numpy()
  got = np.asarray(world["model"].qformer(enc, queries))
  assert np.abs(got - want).max() < 1e-4
  # The learned queries are BLIP-2's `query_tokens`.
  np.testing.assert_array_equal(np.asarray(world["model"].qformer.query_tokens[...]),
                                world["blip2"].query_tokens.detach().numpy()[0])


def _batch(n_img: int, image_id: int, seed: int = 3):
  """Two rows with one placeholder run each; row 1 left-padded by 3 pad tokens."""
  rng = np.random.default_rng(seed)
  rows = [np.concatenate([[1], rng.integers(4, 100, 3), np.full(n_img, image_id), rng.integers(4, 100, k)])
          for k in (5, 2)]
  width = max(map(len, rows)) + 3
  tokens = np.stack([np.pad(r, (width - len(r), 0), constant_values=3) for r in rows]).astype(np.int32)
  mask = np.stack([np.pad(np.ones(len(r)), (width - len(r), 0)) for r in rows]).astype(np.int32)
  return tokens, mask


def test_forward_matches_torch_composition(world):
  cfg = world["model"].cfg
  tokens, mask = _batch(cfg.image_seq_length, cfg.image_token_id)
  px = np.random.default_rng(4).standard_normal((2, 3, 28, 28)).astype(np.float32)
  want = world["ref"].logits_from_ids(tokens, mask, px, cfg.image_token_id)
  got = np.asarray(world["model"](tokens, px, mask))
  valid = mask.astype(bool)
  assert np.abs(got - want)[valid].max() < 1e-4


def test_llama2_variant_interpolated_positions_matches_torch(world, tmp_path):
  """No Q-Former: 4 adjacent patches concatenated -> llama_proj; converted at 56 px from a 28 px BLIP-2
  (position embeddings interpolated as EVA's interpolate_pos_embed = transformers'
  interpolate_pos_encoding); `--variant` follows llama_proj's input width; safetensors proj file."""
  root = world["root"]
  proj = make_llama_proj(4 * TINY_EVA["hidden_size"], seed=5)
  save_llama_proj(proj, str(tmp_path / "proj.safetensors"))
  cfg = convert_minigpt4(str(root / "blip2"), str(root / "llm"), str(tmp_path / "proj.safetensors"),
                         str(tmp_path / "model"), image_size=56)
  assert cfg.variant == "llama2" and cfg.qformer is None
  assert cfg.vision.image_size == 56 and cfg.image_seq_length == 16 // 4
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  model = sharding.load_model(str(tmp_path / "model"), mesh)
  ref = TorchMiniGPT4(world["blip2"], world["llama"], proj, world["tokenizer"], qformer=False)
  tokens, mask = _batch(cfg.image_seq_length, cfg.image_token_id)
  px = np.random.default_rng(6).standard_normal((2, 3, 56, 56)).astype(np.float32)
  want = ref.logits_from_ids(tokens, mask, px, cfg.image_token_id, interpolate=True)
  got = np.asarray(model(tokens, px, mask))
  assert np.abs(got - want)[mask.astype(bool)].max() < 1e-4

  processor = load_processor(str(tmp_path / "model"))
  builder = PromptBuilder(processor, cfg.image_token_id, cfg.image_seq_length)
  q = "what color is the circle?"
  assert builder.prompt(q, True) == LLAMA2_TEMPLATE.format(f"{IMAGE} {q}") == (
      "[INST] <Img><ImageHere></Img> what color is the circle? [/INST] ")
  assert builder.prompt(q, False) == "[INST] what color is the circle? [/INST] "
  assert builder.stop_strings == () and builder.stop_sequences == ()
  ids, pixels = builder.encode_prompt(q, load_image(str(world["images"] / "odd.jpg")))
  assert ids.count(cfg.image_token_id) == 4 and pixels.shape == (3, 56, 56)


def test_prompts_are_minigpt4s(world):
  tok = world["tokenizer"]
  cfg = world["model"].cfg
  builder = PromptBuilder(load_processor(world["model_dir"]), cfg.image_token_id, cfg.image_seq_length)
  q, a = "what color is the circle?", "the circle is red"
  assert builder.prompt(q, True) == "###Human: <Img><ImageHere></Img> what color is the circle? ###Assistant: "
  assert builder.prompt(q, False) == "###Human: what color is the circle? ###Assistant: "
  image = load_image(str(world["images"] / "odd.jpg"))
  enc = builder.encode_qa(q, a, image)
  # MiniGPT-4's get_context_emb: split at <ImageHere>, BOS on the first segment only.
  assert enc.prompt_image == (tok("###Human: <Img>").input_ids + [VOCAB] * NUM_QUERY
                              + tok(f"</Img> {q} ###Assistant: ", add_special_tokens=False).input_ids)
  assert enc.prompt_text == tok(f"###Human: {q} ###Assistant: ").input_ids
  assert enc.answer == tok(a, add_special_tokens=False).input_ids
  assert np.abs(enc.pixel_values - _pixels(image, 28)).max() < 1e-5
  assert builder.stop_strings == ("###",)
  assert builder.stop_sequences == ((world["stop_id"],),)


def test_generation_stops_at_hash(world):
  """Greedy generation with the builder's stop sequences equals a torch greedy loop that stops at "###"
  (MiniGPT-4's StoppingCriteriaSub); the text is cut before "###". Two rows of different lengths."""
  cfg = world["model"].cfg
  builder = PromptBuilder(load_processor(world["model_dir"]), cfg.image_token_id, cfg.image_seq_length)
  image = load_image(str(world["images"] / "grey.png"))
  prompts, pixels = zip(*(builder.encode_prompt(q, image) for q in GEN_QUESTIONS))
  max_new = 8
  scfg = sampling.SamplingConfig(max_new_tokens=max_new, eos_ids=builder.eos_ids,
                                 stop_sequences=builder.stop_sequences, pad_id=builder.pad_id)
  tokens, mask = sampling.pad_prompts(prompts, 8, builder.pad_id)
  out, lengths = sampling.generate(world["model"], tokens, mask, np.stack(pixels), scfg)
  texts = sampling.decode_texts(builder.tokenizer, out, lengths, builder.stop_strings)
  stop = world["stop_id"]
  for row, q in enumerate(GEN_QUESTIONS):
    want, _ = world["ref"].greedy(VICUNA_TEMPLATE.format(f"{IMAGE} {q}"), pixels[row], max_new,
                                  [list(s) for s in builder.stop_sequences], builder.eos_ids[0])
    assert out[row, :len(want)].tolist() == want
    assert (out[row, len(want):] == builder.pad_id).all()
    if row == 0:  # the fixture made "###" come out here
      assert want[-1] == stop and len(want) < max_new
      assert "###" not in texts[row]
      assert texts[row] == world["tokenizer"].decode(want[:-1], skip_special_tokens=True).strip()


def test_score_stage_matches_torch(world, tmp_path):
  records = tmp_path / "records.jsonl"
  records.write_text("".join(json.dumps(dict(id=i, image=im, question=q, answer=a)) + "\n"
                             for i, im, q, a in RECORDS))
  cmd = [sys.executable, "launch.py", "--config=configs/minigpt4.py:tiny", f"--workdir={tmp_path / 'w'}",
         "--config.stages=score", f"--config.model.checkpoint={world['model_dir']}",
         f"--config.data.records={records}", f"--config.data.image_root={world['images']}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  score_dir = tmp_path / "w" / "score"
  rows = [json.loads(line) for p in sorted(os.listdir(score_dir))
          if p.startswith("part-") and p.endswith(".jsonl") for line in open(score_dir / p)]
  assert [r["id"] for r in rows] == [r[0] for r in RECORDS]
  for row in rows:
    pixels = _pixels(load_image(str(world["images"] / row["image"])), 28)
    want = world["ref"].i2c(row["question"], row["answer"], pixels)
    assert row["n_tokens"] == want["n_tokens"]
    for k in ("i2c", "logp_image", "logp_text"):
      assert abs(row[k] - want[k]) <= 1e-3 + 1e-3 * abs(want[k]), (k, row[k], want[k])
  assert max(abs(r["i2c"]) for r in rows) > 1e-2  # the image matters: the comparison means something


def test_converter_errors(world, tmp_path):
  from safetensors.numpy import save_file

  root = world["root"]
  args = (str(root / "blip2"), str(root / "llm"))
  save_file({"llama_proj.weight": np.zeros((64, 32), np.float32)}, str(tmp_path / "w.safetensors"))
  with pytest.raises(ConversionError, match="llama_proj.bias"):
    convert_minigpt4(*args, str(tmp_path / "w.safetensors"), str(tmp_path / "o"))
  with pytest.raises(ConversionError, match="llama_proj takes 32 features but the llama2 variant"):
    convert_minigpt4(*args, str(root / "minigpt4.pth"), str(tmp_path / "o"), variant="llama2")
  with pytest.raises(ConversionError, match="not a BLIP-2 config"):
    convert_minigpt4(str(root / "llm"), str(root / "llm"), str(root / "minigpt4.pth"), str(tmp_path / "o"))
  assert not os.path.exists(tmp_path / "o")


def test_config_file_validates():
  from c3l_jax import pipeline
  from configs import minigpt4

  for arg in minigpt4.VALID_ARGS:
    config = minigpt4.get_config(arg)
    assert config.model.family == "minigpt4"
    pipeline.check_config(config)
  assert minigpt4.get_config("tiny").generation.max_new_tokens == 16
  with pytest.raises(ValueError, match="unknown arg"):
    minigpt4.get_config("13b")
