"""The published checkpoints' own files: llava-hf/llava-1.5-7b-hf, liuhaotian/llava-v1.5-7b (original
LLaVA format) and the Llama tokenizer, from `tests/fixtures/` (SOURCES.md there says where each is from).

A checkpoint written by `save_pretrained` spells out every config field; a published one does not (the
7B `text_config` omits hidden size, layers, heads, rope...). These tests read the real files: configs
against transformers' own reading, the 7B dry run over headers shaped by transformers, and tiny models
that carry the real tokenizer, processor and chat template, converted and compared with transformers
(llava-hf) and with the LLaVA repository's own forward (original format).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest

import llava_original_reference as orig
import real_files
from c3l_jax import sampling, scoring, sharding
from c3l_jax.convert import ConversionError, conversion_plan, llava_original, read_hf_config
from c3l_jax.convert.common import expected_shapes
from c3l_jax.data.prompts import LLAVA15_CHAT_TEMPLATE, PromptBuilder, load_processor
from hf_reference import REPO, torch_i2c

PARAMS_7B = 7_063_427_072  # the index's total_size (14,126,854,144 fp16 bytes) / 2


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "c3l_jax.convert", *args], cwd=REPO, capture_output=True,
                        text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _mesh():
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


# --------------------------------------------------------------------------------------------------
# The published 7B configs and indexes.

def test_published_7b_config_reads_as_transformers_does():
  """The partial `text_config` takes LlamaConfig's defaults, as transformers fills them (hand-checked
  against Llama-2-7B's published architecture: 4096 wide, 32 layers of 32 heads, MLP 11008)."""
  from transformers import AutoConfig

  ours = read_hf_config(real_files.LLAVA_HF_7B)
  hf = AutoConfig.from_pretrained(real_files.LLAVA_HF_7B)
  t = hf.text_config
  assert (ours.text.hidden_size, ours.text.num_hidden_layers, ours.text.num_attention_heads,
          ours.text.num_key_value_heads, ours.text.intermediate_size) == (4096, 32, 32, 32, 11008)
  assert (ours.text.hidden_size, ours.text.intermediate_size, ours.text.num_hidden_layers,
          ours.text.num_key_value_heads, ours.text.rms_norm_eps, ours.text.vocab_size) == (
              t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_key_value_heads,
              t.rms_norm_eps, t.vocab_size)
  assert ours.text.rope.theta == 10000.0 and ours.text.rope.rope_type == "default"
  assert ours.vision.hidden_act == hf.vision_config.hidden_act == "quick_gelu"
  assert (ours.vision.image_size, ours.vision.patch_size, ours.image_seq_length) == (336, 14, 576)
  assert ours.image_token_id == 32000 and ours.prompt_format == "chat_template"


def test_dry_run_of_the_published_7b(tmp_path):
  """`--dry_run` over the real config + index + shard headers (shaped by transformers from the real
  config; data regions sparse): the parameter count of the index's total_size, bytes, nothing written;
  exit 2 with the reason for a wrong shape, a truncated shard and a missing shard."""
  hf = str(tmp_path / "7b")
  assert real_files.published_7b_headers(hf) == 2 * PARAMS_7B
  out = tmp_path / "out"
  proc = _cli(f"--hf_path={hf}", f"--out={out}", "--dtype=bfloat16", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert "parameters: 7,063,427,072" in lines
  assert "input float16: 14,126,854,144 bytes" in lines
  assert "output: 14,126,854,144 bytes (bfloat16)" in lines
  assert ("language model: Llama, 32 layers, width 4096, 32 heads (32 kv), mlp 11008, vocab 32064, "
          "rope default theta 10000, 4096 positions") in lines
  assert "connector: 2-layer MLP (gelu), features of layer(s) [-2], 576 image tokens" in lines
  assert not out.exists() and not (tmp_path / "out.partial").exists()
  f32 = _cli(f"--hf_path={hf}", "--dtype=float32", "--dry_run")
  assert "output: 28,253,708,288 bytes (float32)" in f32.stdout.splitlines()

  bad = str(tmp_path / "bad-shape")
  real_files.published_7b_headers(bad, shape_override={
      "language_model.model.layers.7.mlp.up_proj.weight": (11000, 4096)})
  proc = _cli(f"--hf_path={bad}", "--dry_run")
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.startswith("error: tensor text.layers.7.mlp.up_proj.weight has shape (11000, 4096)")
  assert "Traceback" not in proc.stderr

  shard = os.path.join(hf, "model-00002-of-00003.safetensors")
  os.truncate(shard, os.path.getsize(shard) - 1)
  proc = _cli(f"--hf_path={hf}", "--dry_run")
  assert proc.returncode == 2 and "model-00002-of-00003.safetensors: truncated" in proc.stderr
  os.remove(shard)
  proc = _cli(f"--hf_path={hf}", "--dry_run")
  assert proc.returncode == 2 and "missing: ['model-00002-of-00003.safetensors']" in proc.stderr


def _clip_l336(path: str) -> str:
  """A CLIP ViT-L/14-336 config directory in the published spelling (sizes only)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
               "vision_config": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=336, patch_size=14,
                                     projection_dim=768)}, f)
  return path


def test_published_original_7b_config_and_index(tmp_path):
  """liuhaotian/llava-v1.5-7b: the same LLaVA-1.5 architecture as the -hf model except its vocabulary
  (32000, an out-of-vocabulary image placeholder), its plan covers exactly the index's tensors but the
  rotary buffers, and its parameters are the index's total_size less those fp32 buffers (32 x 64 x 4
  bytes), halved."""
  clip = _clip_l336(str(tmp_path / "clip"))
  ours = llava_original.read_config(real_files.LLAVA_ORIGINAL_7B, clip)
  hf = read_hf_config(real_files.LLAVA_HF_7B)
  assert ours.vision == hf.vision
  assert ours.text.vocab_size == 32000 and ours.image_token_id == 32000
  assert ours.text.hidden_size == hf.text.hidden_size and ours.text.num_hidden_layers == 32
  assert (ours.prompt_format, ours.image_aspect_ratio) == ("vicuna_v1", "pad")
  assert (ours.feature_layers, ours.vision_feature_select_strategy) == ((-2,), "default")
  with open(os.path.join(real_files.LLAVA_ORIGINAL_7B, "pytorch_model.bin.index.json")) as f:
    index = json.load(f)
  names = {llava_original._canonical(k) for k in index["weight_map"]}
  buffers = {n for n in names if n.endswith("rotary_emb.inv_freq")}
  assert len(buffers) == 32
  plan = conversion_plan(ours)
  assert names - buffers == {n for n in plan if not n.startswith("vision.")}
  shapes = expected_shapes(ours)
  params = sum(int(np.prod(s)) for p, s in shapes.items() if p[0] != "vision_tower")
  assert 2 * params + 32 * 64 * 4 == index["metadata"]["total_size"]

  # Without --clip_path the converter names what to download; the index's shards are not here.
  proc = _cli(f"--hf_path={real_files.LLAVA_ORIGINAL_7B}", "--dry_run")
  assert proc.returncode == 2 and "--clip_path" in proc.stderr
  assert "openai/clip-vit-large-patch14-336" in proc.stderr
  proc = _cli(f"--hf_path={real_files.LLAVA_ORIGINAL_7B}", f"--clip_path={clip}", "--dry_run")
  assert proc.returncode == 2 and "weight files listed in the index are missing" in proc.stderr


def test_library_chat_template_is_the_published_one():
  with open(os.path.join(real_files.LLAVA_HF_7B, "chat_template.json")) as f:
    assert json.load(f)["chat_template"] == LLAVA15_CHAT_TEMPLATE
  with open(os.path.join(real_files.LLAVA_HF_7B, "chat_template.jinja")) as f:
    assert f.read() == LLAVA15_CHAT_TEMPLATE


# --------------------------------------------------------------------------------------------------
# A tiny llava-hf checkpoint with the real tokenizer, processor and chat template.

TINY_TEXT, TINY_VISION = real_files.TINY_REAL_TEXT, real_files.TINY_REAL_VISION
QA = [("What is in the image?", "A red square on a grey background."),
      ("Describe the picture in detail.", "There is one small object near the top left corner.")]


def _images():
  rng = np.random.default_rng(0)
  return [PIL.Image.fromarray(rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)),
          PIL.Image.fromarray(rng.integers(0, 255, (500, 260, 3), dtype=np.uint8))]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  """transformers' LLaVA with the published config.json's spelling (partial text / vision configs, tiny
  sizes added), vocab 32064, CLIP 336 px / patch 14, and every real tokenizer / processor file."""
  return real_files.tiny_real_llava(tmp_path_factory.mktemp("real-tiny"), TINY_TEXT, TINY_VISION)


def _reference_ids(hf_dir: str, question: str, image):
  """transformers' own processor on the published files: ids and pixels."""
  from transformers import AutoProcessor

  processor = AutoProcessor.from_pretrained(hf_dir)
  content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
  text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
  if image is None:
    return processor.tokenizer(text).input_ids, None
  out = processor(images=image, text=text, return_tensors="np")
  return out["input_ids"][0].tolist(), out["pixel_values"][0]


def test_real_files_convert_score_and_generate_like_transformers(tiny_hf):
  """Prompt ids and pixels equal transformers' processor on the published files; greedy generation equals
  `generate` token for token; S(I2C) / log-probs equal transformers' (fp32, 1e-3) for the QA texts and
  for the model's own continuations (where p_t^v is large, so S(I2C) is far from 0)."""
  import torch

  model = sharding.load_model(tiny_hf["ours"], _mesh())
  builder = PromptBuilder(load_processor(tiny_hf["ours"]), model.cfg.image_token_id,
                          model.cfg.image_seq_length)
  encoded = []
  for i, image in enumerate(_images()):
    for q, a in QA:
      enc = builder.encode_qa(q, a, image)
      ref_ids, ref_pixels = _reference_ids(tiny_hf["hf"], q, image)
      assert enc.prompt_image == ref_ids and ref_ids.count(32000) == 576
      assert enc.prompt_text == _reference_ids(tiny_hf["hf"], q, None)[0]
      np.testing.assert_allclose(enc.pixel_values, ref_pixels, atol=1e-6)
      assert enc.answer == builder.tokenizer(a, add_special_tokens=False).input_ids
      encoded.append((i, enc))

  prompts = [enc.prompt_image for _, enc in encoded]
  tokens, mask = sampling.pad_prompts(prompts, 8, builder.pad_id)
  stacked = np.stack([enc.pixel_values for _, enc in encoded])
  out, _ = sampling.generate(model, tokens, mask, stacked,
                             sampling.SamplingConfig(max_new_tokens=8, eos_ids=()))
  continuations = []
  for row, prompt in enumerate(prompts):
    ref = tiny_hf["torch"].generate(input_ids=torch.as_tensor([prompt]),
                                    pixel_values=torch.as_tensor(stacked[row:row + 1]),
                                    max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out[row].tolist() == ref[0, len(prompt):].tolist()
    continuations.append(out[row].tolist())

  items, pixels, want = [], {}, []
  for (i, enc), continuation in zip(encoded, continuations):
    pixels[i] = enc.pixel_values
    for answer in (enc.answer, continuation):
      items.append(scoring.ScoreInput(i, enc.prompt_image, enc.prompt_text, answer))
      want.append(torch_i2c(tiny_hf["torch"], enc.prompt_image, enc.prompt_text, answer,
                            enc.pixel_values))
  got = scoring.Scorer(model, _mesh(), scoring.ScoringConfig(), model.cfg.image_token_id,
                       builder.pad_id).score(items, pixels)
  for g, w in zip(got, want):
    for key in ("i2c", "logp_image", "logp_text"):
      np.testing.assert_allclose(g[key], w[key], atol=1e-3, rtol=1e-4)
  assert max(abs(w["i2c"]) for w in want) > 0.1  # not vacuous


def _processor_variant(tiny_hf, name: str) -> str:
  """The converted directory's processor files as older / other snapshots ship them."""
  d = tiny_hf["root"] / f"variant-{name}"
  if d.exists():
    shutil.rmtree(d)
  d.mkdir()
  for f in os.listdir(tiny_hf["ours"]):
    if f != "params":
      shutil.copy(os.path.join(tiny_hf["ours"], f), d / f)
  if name == "no-num-additional-image-tokens":  # before transformers#36002: 575 image tokens
    cfg = json.loads((d / "processor_config.json").read_text())
    del cfg["num_additional_image_tokens"]
    (d / "processor_config.json").write_text(json.dumps(cfg))
  elif name == "no-processor-config":
    (d / "processor_config.json").unlink()
  elif name == "template-json-only":
    (d / "chat_template.jinja").unlink()
  elif name == "template-jinja-only":
    (d / "chat_template.json").unlink()
  elif name == "template-in-tokenizer-config":
    (d / "chat_template.jinja").unlink()
    (d / "chat_template.json").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = LLAVA15_CHAT_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
  return str(d)


@pytest.mark.parametrize("name", ["no-num-additional-image-tokens", "no-processor-config",
                                  "template-json-only", "template-jinja-only",
                                  "template-in-tokenizer-config"])
def test_processor_snapshots_users_have(tiny_hf, name):
  """Each snapshot gives the ids transformers' processor gives on the current published files."""
  from c3l_jax.checkpoint import load_model_config

  d = _processor_variant(tiny_hf, name)
  cfg = load_model_config(tiny_hf["ours"])
  builder = PromptBuilder(load_processor(d), cfg.image_token_id, cfg.image_seq_length)
  image = _images()[0]
  ids, pixels = builder.encode_prompt(QA[0][0], image)
  ref_ids, ref_pixels = _reference_ids(tiny_hf["hf"], QA[0][0], image)
  assert ids == ref_ids and ids.count(32000) == 576
  np.testing.assert_allclose(pixels, ref_pixels, atol=1e-6)
  assert builder.encode_prompt(QA[0][0], None)[0] == _reference_ids(tiny_hf["hf"], QA[0][0], None)[0]


def test_a_checkpoint_without_chat_template_gets_the_published_one(tiny_hf, tmp_path):
  hf = tmp_path / "hf"
  shutil.copytree(tiny_hf["hf"], hf)
  (hf / "chat_template.json").unlink()
  (hf / "chat_template.jinja").unlink()
  dry = _cli(f"--hf_path={hf}", "--dry_run")
  assert "none found: the LLaVA-1.5 template llava-hf publishes will be written" in dry.stdout
  proc = _cli(f"--hf_path={hf}", f"--out={tmp_path / 'ours'}")
  assert proc.returncode == 0, proc.stderr
  assert (tmp_path / "ours" / "chat_template.jinja").read_text() == LLAVA15_CHAT_TEMPLATE


# --------------------------------------------------------------------------------------------------
# The original LLaVA format (LlavaLlamaForCausalLM + a CLIP directory).

@pytest.fixture(scope="module")
def tiny_original(tmp_path_factory):
  root = tmp_path_factory.mktemp("original")
  ref = orig.OriginalLlava()
  ref.save(str(root / "llava"), str(root / "clip"))
  proc = _cli(f"--hf_path={root / 'llava'}", f"--clip_path={root / 'clip'}", f"--out={root / 'ours'}")
  assert proc.returncode == 0, proc.stderr
  return dict(root=root, ref=ref, llava=str(root / "llava"), clip=str(root / "clip"), ours=str(root / "ours"))


def test_original_format_matches_llavas_own_forward(tiny_original):
  """Prompt ids (conv_vicuna_v1 + tokenizer_image_token), padded pixels, logits, S(I2C) and greedy
  tokens equal the LLaVA repository's computation; the -hf conventions would differ in both."""
  from transformers import AutoTokenizer, CLIPImageProcessor

  ref = tiny_original["ref"]
  tokenizer = AutoTokenizer.from_pretrained(tiny_original["llava"], use_fast=False)
  image_processor = CLIPImageProcessor.from_pretrained(tiny_original["clip"])
  model = sharding.load_model(tiny_original["ours"], _mesh())
  assert model.cfg.image_token_id == 32000 == model.cfg.text.vocab_size
  builder = PromptBuilder(load_processor(tiny_original["ours"]), model.cfg.image_token_id,
                          model.cfg.image_seq_length)
  items, pixels, want = [], {}, []
  for i, image in enumerate(_images()):
    for q, a in QA:
      enc = builder.encode_qa(q, a, image)
      ref_ids = orig.tokenizer_image_token(orig.get_prompt(q, True), tokenizer)
      run = [j for j, t in enumerate(enc.prompt_image) if t == 32000]
      assert len(run) == 576 and run == list(range(run[0], run[0] + 576))
      assert enc.prompt_image[:run[0]] + [orig.IMAGE_TOKEN_INDEX] + enc.prompt_image[run[-1] + 1:] == ref_ids
      assert enc.prompt_text == tokenizer(orig.get_prompt(q, False)).input_ids
      ref_pixels = orig.process_image(image, image_processor)
      np.testing.assert_allclose(enc.pixel_values, ref_pixels, atol=1e-6)
      # Not the -hf conventions: its prompt has no system line, its preprocessing crops the centre.
      assert not tokenizer.decode(enc.prompt_image[:20]).startswith("USER")
      cropped = image_processor.preprocess(image, return_tensors="np")["pixel_values"][0]
      assert np.abs(cropped - ref_pixels).max() > 0.5

      got = np.asarray(model(np.asarray([enc.prompt_image], np.int32), ref_pixels[None]))[0]
      np.testing.assert_allclose(got, ref.logits(ref_ids, ref_pixels), atol=1e-4, rtol=0)
      continuation = ref.greedy(ref_ids, ref_pixels, 6)
      out, _ = sampling.generate(model, np.asarray([enc.prompt_image], np.int32),
                                 np.ones((1, len(enc.prompt_image)), np.int32), ref_pixels[None],
                                 sampling.SamplingConfig(max_new_tokens=6, eos_ids=()))
      assert out[0].tolist() == continuation
      pixels[i] = enc.pixel_values
      for answer in (enc.answer, continuation):
        lv = _answer_logprobs(ref.logits(ref_ids + answer, ref_pixels), len(ref_ids) + 575, answer)
        ld = _answer_logprobs(ref.logits(enc.prompt_text + answer, None), len(enc.prompt_text), answer)
        want.append(dict(i2c=float(np.sum(np.exp(lv) * (lv - ld))), logp_image=float(lv.sum()),
                         logp_text=float(ld.sum())))
        items.append(scoring.ScoreInput(i, enc.prompt_image, enc.prompt_text, answer))
  got = scoring.Scorer(model, _mesh(), scoring.ScoringConfig(), model.cfg.image_token_id,
                       builder.pad_id).score(items, pixels)
  for g, w in zip(got, want):
    for key in w:
      np.testing.assert_allclose(g[key], w[key], atol=1e-3, rtol=1e-4)
  assert max(abs(w["i2c"]) for w in want) > 0.1  # not vacuous


def _answer_logprobs(logits: np.ndarray, start: int, answer: list[int]) -> np.ndarray:
  """log p(answer_t | ...) from full-sequence logits whose answer begins at position `start`."""
  rows = logits[start - 1:start - 1 + len(answer)]
  rows = rows - rows.max(-1, keepdims=True)
  logp = rows - np.log(np.exp(rows).sum(-1, keepdims=True))
  return logp[np.arange(len(answer)), answer]


def test_original_format_dry_run_and_errors(tiny_original, tmp_path):
  proc = _cli(f"--hf_path={tiny_original['llava']}", f"--clip_path={tiny_original['clip']}", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  assert "prompt: LLaVA's conv_vicuna_v1 template, image placeholder id 32000 (outside the vocabulary), " \
         "image_aspect_ratio pad" in proc.stdout
  assert "input float16:" in proc.stdout and "input float32:" in proc.stdout  # LLaVA fp16, CLIP fp32

  bad = tmp_path / "bad"
  shutil.copytree(tiny_original["llava"], bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["mm_projector_type"] = "linear"
  (bad / "config.json").write_text(json.dumps(cfg))
  proc = _cli(f"--hf_path={bad}", f"--clip_path={tiny_original['clip']}", "--dry_run")
  assert proc.returncode == 2 and "unsupported mm_projector_type 'linear'" in proc.stderr
  with pytest.raises(ConversionError, match="original LLaVA repository's format"):
    read_hf_config(tiny_original["llava"])


def test_original_format_through_the_score_stage(tiny_original, tmp_path):
  """`launch.py --config.stages=score` on the converted original-format model: every record's S(I2C)
  and log-probs equal the LLaVA repository's computation (its prompt, padding and splicing)."""
  from transformers import AutoTokenizer, CLIPImageProcessor

  images = tmp_path / "images"
  images.mkdir()
  for i, image in enumerate(_images()):
    image.save(images / f"{i}.png")
  records = tmp_path / "records.jsonl"
  rows = [dict(id=f"{i}-{j}", image=f"{i}.png", question=q, answer=a)
          for i in range(2) for j, (q, a) in enumerate(QA)]
  records.write_text("".join(json.dumps(r) + "\n" for r in rows))
  proc = subprocess.run(
      [sys.executable, "launch.py", "--config=configs/llava15.py:tiny", f"--workdir={tmp_path / 'w'}",
       "--config.stages=score", f"--config.model.checkpoint={tiny_original['ours']}",
       f"--config.data.records={records}", f"--config.data.image_root={images}"],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  score_dir = tmp_path / "w" / "score"
  got = {r["id"]: r for p in sorted(os.listdir(score_dir)) if p.startswith("part-") and p.endswith(".jsonl")
         and not p.endswith(".rejected.jsonl") for r in map(json.loads, open(score_dir / p))}
  assert sorted(got) == sorted(r["id"] for r in rows)
  ref = tiny_original["ref"]
  tokenizer = AutoTokenizer.from_pretrained(tiny_original["llava"], use_fast=False)
  image_processor = CLIPImageProcessor.from_pretrained(tiny_original["clip"])
  for r in rows:
    image = PIL.Image.open(images / r["image"]).convert("RGB")
    ids = orig.tokenizer_image_token(orig.get_prompt(r["question"], True), tokenizer)
    text_ids = tokenizer(orig.get_prompt(r["question"], False)).input_ids
    answer = tokenizer(r["answer"], add_special_tokens=False).input_ids
    pixels = orig.process_image(image, image_processor)
    lv = _answer_logprobs(ref.logits(ids + answer, pixels), len(ids) + 575, answer)
    ld = _answer_logprobs(ref.logits(text_ids + answer, None), len(text_ids), answer)
    want = dict(i2c=float(np.sum(np.exp(lv) * (lv - ld))), logp_image=float(lv.sum()),
                logp_text=float(ld.sum()))
    for key, value in want.items():
      assert abs(got[r["id"]][key] - value) <= 1e-3 + 1e-3 * abs(value), (r["id"], key)
