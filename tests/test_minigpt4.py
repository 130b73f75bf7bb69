"""MiniGPT-4: EVA ViT-g / Q-Former / whole-model parity with transformers after the converter
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
import real_files
from hf_reference import REPO
from minigpt4_reference import (IMAGE, LLAMA2_TEMPLATE, NUM_QUERY, STOP, TINY_EVA, TINY_QFORMER, VICUNA_TEMPLATE,
                                VOCAB, TorchMiniGPT4, make_hf_blip2, make_hf_llama, make_llama_proj,
                                make_sentencepiece_llama_tokenizer, make_tiny_tokenizer, save_llama_proj)

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


def test_dry_run(world, tmp_path):
  """`--dry_run` reads the three sources' headers only: the parameters MiniGPT-4 uses, counted in torch
  (EVA ViT, the Q-Former's query path and its queries, Llama, llama_proj; not the Q-Former's text-only
  feed-forward and embeddings), and writes nothing."""
  import re

  root = world["root"]
  proc = subprocess.run(
      [sys.executable, "-m", "c3l_jax.convert", "--family=minigpt4", f"--blip2_path={root / 'blip2'}",
       f"--llm_path={root / 'llm'}", f"--proj_path={root / 'minigpt4.pth'}", f"--out={tmp_path / 'o'}",
       "--dry_run"], cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  text_only = re.compile(r"qformer\.(embeddings\.|encoder\.layer\.\d+\.(intermediate|output)\.)")
  used = sum(p.numel() for n, p in world["blip2"].named_parameters()
             if n.split(".")[0] in ("vision_model", "qformer", "query_tokens") and not text_only.match(n))
  used += sum(p.numel() for p in world["llama"].parameters()) + sum(p.numel() for p in world["ref"].proj.parameters())
  assert f"parameters: {used:,}" in proc.stdout.splitlines()
  assert "prompt: MiniGPT-4 vicuna0 template" in proc.stdout
  assert not (tmp_path / "o").exists()


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


def _vicuna_tokenizer_dir(path: str, which: str) -> dict[str, int]:
  """A Vicuna-style tokenizer directory (`tokenizer.model` + a `LlamaTokenizer` config): the synthetic
  Llama-layout SentencePiece model, or the real Llama `tokenizer.model` (tests/fixtures, the file Vicuna
  and LLaVA ship); returns the ids of "▁###", "##" and "#"."""
  if which == "synthetic":
    return make_sentencepiece_llama_tokenizer(path)
  real_files.copy_files(real_files.LLAVA_ORIGINAL_7B, path, ("tokenizer_config.json", "special_tokens_map.json"))
  real_files.copy_files(real_files.LLAVA_HF_7B, path, ("tokenizer.model",))
  return {"▁###": 835, "##": 2277, "#": 29937}  # MiniGPT-4's stop list [[835], [2277, 29937]]


@pytest.mark.parametrize("which", ["synthetic", "real"])
def test_hash_stop_with_a_sentencepiece_llama_tokenizer(tmp_path, which):
  """With a Llama SentencePiece `tokenizer.model` (loaded as Vicuna's is: transformers converts it),
  "###" is "▁###" at a word start and "##" + "#" after a word, with no "###" token; the builder derives
  both spellings (MiniGPT-4's `[[835], [2277, 29937]]` on the real file), generation stops at either,
  and the text is cut before "###". Prompts tokenize exactly as SentencePiece itself (MiniGPT-4's slow
  LlamaTokenizer)."""
  import jax.numpy as jnp
  import sentencepiece as spm
  from transformers import AutoTokenizer

  from c3l_jax.data.prompts import MiniGPT4Processor, blip2_image_processor

  pieces = _vicuna_tokenizer_dir(str(tmp_path), which)
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
  tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  assert STOP not in tok.get_vocab() and tok.convert_tokens_to_ids("▁###") == pieces["▁###"]
  image_id, n_img = sp.get_piece_size(), 4
  builder = PromptBuilder(MiniGPT4Processor(tok, blip2_image_processor(28), "vicuna0", image_id, n_img),
                          image_id, n_img)
  assert builder.stop_sequences == ((pieces["▁###"],), (pieces["##"], pieces["#"]))

  q = "what color is the circle"
  ids, _ = builder.encode_prompt(q, PIL.Image.new("RGB", (40, 30)))
  assert ids == ([1] + sp.encode("###Human: <Img>") + [image_id] * n_img
                 + sp.encode(f"</Img> {q} ###Assistant: "))
  assert builder.encode_prompt(q, None)[0] == [1] + sp.encode(f"###Human: {q} ###Assistant: ")

  cfg = sampling.SamplingConfig(max_new_tokens=16, eos_ids=builder.eos_ids,
                                stop_sequences=builder.stop_sequences)
  for reply, spelled in (("the circle is red###Human: what", ["##", "#"]),
                         ("the circle is red ###Human: what", ["▁###"])):
    out = sp.encode(reply)
    end = next(i for i in range(len(out)) if "###" in sp.decode(out[:i + 1]))
    assert [sp.id_to_piece(t) for t in out[end + 1 - len(spelled):end + 1]] == spelled
    buf = jnp.asarray([out + [0] * (16 - len(out))], jnp.int32)
    stops = [i for i in range(len(out)) if bool(sampling._stopped(buf, jnp.int32(i), cfg)[0])]
    assert stops[0] == end, (reply, stops)
    text = sampling.decode_texts(tok, np.asarray(buf), np.asarray([end + 1]), builder.stop_strings)
    assert text == ["the circle is red"]


# What the pipeline run's model is taught to write (`TorchMiniGPT4.teach`) after each prompt the pipeline
# sends: a caption for the caption instructions, one QA pair per instruction type (for the VIGC
# instructions with the image and the text-only QA-from-caption prompts), each ended by MiniGPT-4's end
# of turn "###" and followed by the next turn's start, which the stop string must cut off.
CAPTION = "a dog and a cat"
TAUGHT = {"conversation": ("is there a dog", "yes"),
          "detailed_description": ("where is the dog", "in the tree"),
          "complex_reasoning": ("what is in the tree", "a cat")}
NEXT_TURN = "###Human: what"
PIPELINE_STAGES = "initial,filter,score,select,train,final,export,eval"
# POPE annotations of the world's images (5 object names: 2 present + 2 absent asked per image).
POPE_OBJECTS = {"grey.png": ["dog", "cat"], "rgba.png": ["car", "tree"], "odd.jpg": ["dog", "sky"]}


def _read_parts(stage_dir):
  """The records a stage wrote (its `part-*.jsonl`, not the `part-*.rejected.jsonl` quarantine)."""
  return [json.loads(line) for p in sorted(os.listdir(stage_dir))
          if p.startswith("part-") and p.endswith(".jsonl") and not p.endswith(".rejected.jsonl")
          for line in open(os.path.join(stage_dir, p))]


@pytest.fixture(scope="module")
def pipeline_run(world, tmp_path_factory):
  """One `launch.py --config=configs/minigpt4.py:tiny` run of every generation and training stage on a
  copy of the world's model taught (in torch) to answer in QA format, converted by the converter."""
  import copy

  from c3l_jax.data import instructions as ins
  from c3l_jax.data.prompts import VIGC_INSTRUCTIONS

  root = tmp_path_factory.mktemp("minigpt4_pipeline")
  tok = world["tokenizer"]
  ref = TorchMiniGPT4(world["blip2"], copy.deepcopy(world["llama"]), copy.deepcopy(world["ref"].proj), tok)
  images = sorted({im for _, im, _, _ in RECORDS})
  pixels = {im: _pixels(load_image(str(world["images"] / im)), TINY_EVA["image_size"]) for im in images}
  target = lambda text: tok(text + NEXT_TURN, add_special_tokens=False).input_ids  # noqa: E731
  qa = {kind: f"Q: {q} A: {a}" for kind, (q, a) in TAUGHT.items()}
  examples = []
  for im in images:
    examples += [(VICUNA_TEMPLATE.format(f"{IMAGE} {c}"), pixels[im], target(CAPTION))
                 for c in ins.CAPTION_INSTRUCTIONS]
    examples += [(VICUNA_TEMPLATE.format(f"{IMAGE} {VIGC_INSTRUCTIONS[k]}"), pixels[im], target(qa[k]))
                 for k in TAUGHT]
  examples += [(VICUNA_TEMPLATE.format(ins.qa_from_caption_prompt(CAPTION, i)), None, target(qa[k]))
               for k in TAUGHT for i in ins.QA_FROM_CAPTION[k]]
  # Within the tiny config's 16 new tokens, "###" and the next token ("Human") come out.
  assert max(target(t).index(world["stop_id"]) for t in [CAPTION, *qa.values()]) + 1 < 16
  assert ref.teach(examples) < 0.05
  ref.llama.save_pretrained(str(root / "llm"))
  tok.save_pretrained(str(root / "llm"))
  save_llama_proj(ref.proj, str(root / "minigpt4.pth"))
  model_dir = str(root / "model")
  convert_minigpt4(str(world["root"] / "blip2"), str(root / "llm"), str(root / "minigpt4.pth"), model_dir)

  records = root / "records.jsonl"
  records.write_text("".join(json.dumps(dict(id=i, image=im, question=q, answer=a)) + "\n"
                             for i, im, q, a in RECORDS))
  (root / "pope.jsonl").write_text("".join(json.dumps({"image": im, "objects": objs}) + "\n"
                                           for im, objs in POPE_OBJECTS.items()))
  workdir = root / "w"
  cmd = [sys.executable, "launch.py", "--config=configs/minigpt4.py:tiny", f"--workdir={workdir}",
         f"--config.stages={PIPELINE_STAGES}", f"--config.model.checkpoint={model_dir}",
         f"--config.data.records={records}", f"--config.data.image_root={world['images']}",
         "--config.generation.caption_max_new_tokens=16",
         "--config.generation.final_mode=direct",  # initial is two-step: both modes run
         f"--config.eval.pope_annotations={root / 'pope.jsonl'}", f"--config.eval.pope_images={world['images']}",
         "--config.eval.max_new_tokens=8"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(ref=ref, model_dir=model_dir, workdir=workdir, pixels=pixels, stdout=proc.stdout,
              metrics=json.load(open(workdir / "metrics.json")))


def test_score_stage_matches_torch(world, pipeline_run):
  """S(I2C), logp_image and logp_text of every generated sample equal the torch reference (the taught
  weights), in the score stage and in the final stage's scoring under the base model."""
  rows = _read_parts(pipeline_run["workdir"] / "score")
  final = _read_parts(pipeline_run["workdir"] / "final" / "filtered")
  assert [r["id"] for r in rows] == [r["id"] for r in _read_parts(pipeline_run["workdir"] / "filter")]
  assert rows and final
  for row in rows + final:
    want = pipeline_run["ref"].i2c(row["question"], row["answer"], pipeline_run["pixels"][row["image"]])
    assert row["n_tokens"] == want["n_tokens"]
    for k in ("i2c", "logp_image", "logp_text"):
      assert abs(row[k] - want[k]) <= 1e-3 + 1e-3 * abs(want[k]), (k, row[k], want[k])
  assert max(abs(r["i2c"]) for r in rows) > 1e-2  # the image matters: the comparison means something


def test_generation_stages_cut_at_hash_and_counts_add_up(pipeline_run):
  """initial (two_step: caption with the image, then QA from the caption without it) and final (direct,
  the trained generator) write exactly what the model was taught, cut before "###"; the filter drops
  exactly the repeated (image, instruction type) pairs."""
  workdir, metrics = pipeline_run["workdir"], pipeline_run["metrics"]
  initial = _read_parts(workdir / "initial")
  final_raw = _read_parts(workdir / "final")
  n_images = len({im for _, im, _, _ in RECORDS})
  assert len(initial) == 3 * n_images and len(final_raw) == 8  # tiny: per_image 3, num_final 8
  for row in initial + final_raw:
    assert "###" not in row["output"] and "Human" not in row["output"], row
    assert "###" not in row.get("caption", "")
    assert (row["question"], row["answer"]) == TAUGHT[row["instruction_type"]], row
  assert all(r["caption"] == CAPTION and r["mode"] == "two_step" for r in initial)
  assert all(r["mode"] == "direct" for r in final_raw)
  assert {r["image"] for r in final_raw} == {im for _, im, _, _ in RECORDS}

  filtered = _read_parts(workdir / "filter")
  final = _read_parts(workdir / "final" / "filtered")
  for raw, kept in ((initial, filtered), (final_raw, final)):
    firsts = {}
    for r in raw:
      firsts.setdefault((r["image"], r["instruction_type"]), r["id"])
    assert [r["id"] for r in kept] == list(firsts.values())
  assert metrics["initial"]["read"] == len(RECORDS) == n_images + metrics["initial"]["repeated"]
  assert metrics["initial"]["written"] == len(initial) and metrics["initial"]["unparsable"] == 0
  assert metrics["filter"]["written"] == len(filtered)
  assert metrics["filter"]["written"] + metrics["filter"]["rejected"] == len(initial)
  assert metrics["final"]["written"] == len(final_raw)
  assert metrics["final"]["kept"] == len(final)
  assert metrics["final"]["kept"] + metrics["final"]["filtered_out"] == len(final_raw)
  assert metrics["final"]["generator"] == str(workdir / "train" / "generator")


def test_train_stage_moves_llama_proj_and_decoder_only(pipeline_run):
  """Default `train.trainable` (connector, decoder): the exported generator's `llama_proj` and decoder
  moved, the EVA ViT and the Q-Former did not (MiniGPT-4 keeps them frozen)."""
  from flax import nnx

  metrics = pipeline_run["metrics"]["train"]
  assert metrics["steps"] == 4 and metrics["ce_examples"] >= 1 and metrics["groups"] >= 1
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  flat = lambda d: {"/".join(map(str, k)): np.asarray(v) for k, v in  # noqa: E731
                    jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(
                        sharding.load_model(d, mesh), nnx.Param)))[0]}
  before = flat(pipeline_run["model_dir"])
  after = flat(str(pipeline_run["workdir"] / "train" / "generator"))
  assert before.keys() == after.keys()
  groups = {}
  for k in before:
    groups.setdefault(k.split("/")[0].strip("[]'"), []).append(not np.array_equal(before[k], after[k]))
  assert set(groups) == {"vision_tower", "qformer", "llama_proj", "language_model"}, groups.keys()
  assert not any(groups["vision_tower"]) and not any(groups["qformer"])
  assert all(groups["llama_proj"]) and any(groups["language_model"])


def test_export_is_llava_json_of_the_final_data(pipeline_run):
  workdir = pipeline_run["workdir"]
  final = _read_parts(workdir / "final" / "filtered")
  data = json.load(open(workdir / "export" / "c3l_vlit.json"))
  assert data == [{"id": r["id"], "image": r["image"],
                   "conversations": [{"from": "human", "value": f"<image>\n{r['question']}"},
                                     {"from": "gpt", "value": r["answer"]}]} for r in final]
  stats = json.load(open(workdir / "export" / "stats.json"))
  assert stats["source"] == "final" and stats["instances"] == len(final)
  assert stats["images"] == len({r["image"] for r in final})
  assert sum(stats["instruction_types"].values()) == len(final)


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


def test_eval_stage_evaluates_the_trained_generator(pipeline_run):
  """The eval stage after train evaluates `train/generator` (MiniGPT-4 prompts, "###" stop) on POPE
  built from annotations: answers cut before "###", metrics recounted from them, the Table-1 row."""
  from c3l_jax.eval import pope

  workdir, ev = pipeline_run["workdir"], pipeline_run["metrics"]["eval"]
  assert ev["checkpoint"] == str(workdir / "train" / "generator")
  p = ev["pope"]
  assert p["objects_per_image"] == 2 and (p["read"], p["n"], p["rejected"]) == (36, 36, 0)
  f1s = []
  for split in pope.SPLITS:
    rows = _read_parts(workdir / "eval" / f"pope_{split}")
    assert len(rows) == 12 and {r["image"] for r in rows} == set(POPE_OBJECTS)
    for r in rows:
      assert "###" not in r["answer"]
      assert (r["object"] in POPE_OBJECTS[r["image"]]) == (r["label"] == "yes")
    want = pope.metrics([pope.parse_yes_no(r["answer"]) for r in rows], [r["label"] for r in rows])
    assert p[split] == want
    f1s.append(want["f1"])
  table = (workdir / "eval" / "table.txt").read_text()
  assert table in pipeline_run["stdout"]
  assert table.splitlines()[1].split() == ["generator", "-", "-", "-", f"{100 * sum(f1s) / 3:.1f}"]
