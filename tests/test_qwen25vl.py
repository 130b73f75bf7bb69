"""Qwen2.5-VL against transformers' `Qwen2_5_VLForConditionalGeneration` (float32), on a tiny model made
from the real 3B files (real tokenizer, chat template and image processor, the published key layout,
bf16 shards, tied head), converted with `c3l_jax.convert`."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import qwen_reference as Q
from c3l_jax import convert, sharding
from c3l_jax.data.batching import left_pad
from c3l_jax.models import qwen25vl as M
from hf_reference import REPO
from real_files import published_qwen25vl_3b_headers

NAMES = ("panorama", "tall", "tiny", "grey", "rgba", "photo")
N_ANSWER = 8  # answer tokens: transformers' own greedy continuation, so p_t^v is far from 0
WIDTH, TEXT_WIDTH, PATCHES = 96, 40, 448  # one static shape for all rows, one for all text-only rows


def _load(path):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  return sharding.load_model(path, mesh)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The tiny checkpoint, our converted model, the processor and, per picture, the QA rows and
  transformers' logits with and without the image."""
  root = tmp_path_factory.mktemp("qwen")
  hf = Q.make_tiny_qwen(str(root / "hf"))
  convert.convert(str(root / "hf"), str(root / "ours"))
  proc = Q.Processor(str(root / "hf"))
  rows = {}
  for name, picture in Q.pictures().items():
    pixels, grid = proc.image(picture)
    prompt = proc.expand(proc.prompt(Q.QUESTION, True), M.image_tokens(grid))
    answer = Q.torch_greedy(hf, prompt, pixels, grid, N_ANSWER)
    ids, text_ids = prompt + answer, proc.prompt(Q.QUESTION, False) + answer
    rows[name] = dict(pixels=pixels, grid=grid, ids=ids, text_ids=text_ids,
                      want=Q.torch_forward(hf, ids, pixels, grid),
                      want_text=Q.torch_forward(hf, text_ids))
  return dict(root=root, hf=hf, model=_load(str(root / "ours")), proc=proc, rows=rows)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, state, tokens, images, mask, positions):
  return nnx.merge(graphdef, state)(tokens, images, mask, positions)


def _forward(model, rows, names, positions="mrope", full_attention=False):
  """Our logits for `names` in one left-padded batch: `{name: [T, V]}` (each row's real tokens)."""
  ids = [rows[n]["ids"] for n in names]
  tokens, mask = left_pad(ids, WIDTH, 151643)
  grids = [rows[n]["grid"] for n in names]
  images = M.pack_images(np.concatenate([rows[n]["pixels"] for n in names]), grids, model.cfg.vision,
                         pad_to=PATCHES)
  pos = M.mrope_positions(tokens, mask, grids, model.cfg)[0] if positions == "mrope" else None
  model.visual.full_attention_everywhere = full_attention
  try:
    logits = np.asarray(_logits(*nnx.split(model), tokens, images, mask, pos))
  finally:
    model.visual.full_attention_everywhere = False
  return {n: logits[i, WIDTH - len(ids[i]):] for i, n in enumerate(names)}


def _text_forward(model, ids):
  tokens, mask = left_pad([ids], TEXT_WIDTH, 151643)
  return np.asarray(_logits(*nnx.split(model), tokens, None, mask, None))[0, TEXT_WIDTH - len(ids):]


def _rel(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_token_counts_differ(world):
  counts = {n: M.image_tokens(r["grid"]) for n, r in world["rows"].items()}
  assert len(set(counts.values())) == len(counts), counts
  # The panorama's merged grid is 2 x 16: four 4 x 4-token windows side by side; the tall one 11 x 2.
  assert list(world["rows"]["panorama"]["grid"]) == [1, 4, 32]
  assert list(world["rows"]["tall"]["grid"]) == [1, 22, 4]


def test_logits_and_i2c_match_transformers_batched_and_alone(world):
  model, rows, n = world["model"], world["rows"], N_ANSWER
  batched = _forward(model, rows, NAMES)
  for name in NAMES:
    r = rows[name]
    assert _rel(batched[name], r["want"]) < 1e-3, name
    alone = _forward(model, rows, [name])[name]
    np.testing.assert_allclose(alone, batched[name], rtol=0, atol=1e-4 * np.abs(alone).max())
    # S(I2C), eq. 1, from the answer tokens' log-probs with and without the image.
    text = _text_forward(model, r["text_ids"])
    assert _rel(text, r["want_text"]) < 1e-3
    got = Q.i2c(Q.answer_logprobs(batched[name], r["ids"], n), Q.answer_logprobs(text, r["text_ids"], n))
    got_alone = Q.i2c(Q.answer_logprobs(alone, r["ids"], n), Q.answer_logprobs(text, r["text_ids"], n))
    want = Q.i2c(Q.answer_logprobs(r["want"], r["ids"], n),
                 Q.answer_logprobs(r["want_text"], r["text_ids"], n))
    assert abs(want) > 1e-4, (name, want)  # the image changes the answer's probabilities
    assert abs(got - want) < 1e-3 * abs(want), (name, got, want)
    # Alone vs batched: another padding and batch shape, the same values to float32 rounding, measured
    # against the size of eq. 1's terms (S is their signed sum and can nearly cancel: rgba's is -5e-4).
    lp_v = Q.answer_logprobs(batched[name], r["ids"], n)
    scale = float(np.sum(np.exp(lp_v) * np.abs(lp_v - Q.answer_logprobs(text, r["text_ids"], n))))
    assert abs(got_alone - got) < 1e-4 * scale, (name, got_alone, got, scale)


def test_windows_matter(world):
  """The panorama spans four attention windows: attending over the whole image instead changes the
  logits far beyond the tolerance (so the parity test would fail if the windows were ignored)."""
  model, rows = world["model"], world["rows"]
  want = rows["panorama"]["want"]
  assert _rel(_forward(model, rows, ["panorama"])["panorama"], want) < 1e-3
  assert _rel(_forward(model, rows, ["panorama"], full_attention=True)["panorama"], want) > 1e-2


def test_mrope_matters(world):
  """1-D positions (what transformers silently uses without `mm_token_type_ids`) change the logits of
  the text after the image far beyond the tolerance; M-RoPE's text after the image starts at
  start + max(rows, columns) of the merged grid (hand count for the 2 x 16 panorama)."""
  model, rows = world["model"], world["rows"]
  r = rows["panorama"]
  assert _rel(_forward(model, rows, ["panorama"], positions="1d")["panorama"], r["want"]) > 1e-2
  pos, offset = M.mrope_positions(np.asarray([r["ids"]]), None, [r["grid"]], model.cfg)
  start = r["ids"].index(151655)
  assert pos[0, start].tolist() == [start] * 3
  assert pos[0, start + 31].tolist() == [start, start + 1, start + 15]
  assert pos[0, start + 32].tolist() == [start + 16] * 3  # <|vision_end|>
  assert offset[0] == 16 - 32


def test_greedy_generation_matches_transformers(world):
  """32 greedy tokens, batched with left padding, token for token as transformers (do_sample=False,
  repetition_penalty=1.0): decode positions continue after each row's image."""
  from c3l_jax import sampling

  model, rows, proc = world["model"], world["rows"], world["proc"]
  names = ("panorama", "rgba")
  prompts = [proc.expand(proc.prompt(Q.QUESTION, True), M.image_tokens(rows[n]["grid"])) for n in names]
  tokens, mask = sampling.pad_prompts(prompts, 8, 151643)
  grids = [rows[n]["grid"] for n in names]
  images = M.pack_images(np.concatenate([rows[n]["pixels"] for n in names]), grids, model.cfg.vision,
                         pad_to=256)
  pos = M.mrope_positions(tokens, mask, grids, model.cfg)[0]
  cfg = sampling.SamplingConfig(max_new_tokens=32, pad_id=151643)
  out, lengths = sampling.generate(model, tokens, mask, images, cfg, rope_positions=pos)
  for i, name in enumerate(names):
    want = Q.torch_greedy(world["hf"], prompts[i], rows[name]["pixels"], rows[name]["grid"], 32)
    assert out[i].tolist() == want, name
  assert len({tuple(o) for o in out.tolist()}) == len(names)


def test_dry_run_on_the_real_3b_files(tmp_path, capsys):
  """`python -m c3l_jax.convert --hf_path=... --dry_run` on the published 3B headers, its `main` called
  in this process (no second interpreter): what it prints."""
  from absl import flags

  from c3l_jax.convert import __main__ as cli

  published_qwen25vl_3b_headers(str(tmp_path / "q"))
  flags.FLAGS(["convert", f"--hf_path={tmp_path / 'q'}", "--dry_run"])
  try:
    cli.main([])
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  assert "parameters: 3,754,622,976" in out
  assert "tied" in out and "M-RoPE [16, 24, 24]" in out
  assert out.strip().splitlines()[-1] == "dry run: the conversion would succeed; nothing was written"


def test_converter_errors_name_the_tensor(tmp_path, world):
  """A missing tensor and a wrong shape: one `ConversionError` naming it (the CLI prints it as one
  `error:` line with exit status 2, as for every family)."""
  import json
  import shutil

  from safetensors.numpy import load_file, save_file

  bad = tmp_path / "bad"
  shutil.copytree(world["root"] / "hf", bad)
  index = json.loads((bad / "model.safetensors.index.json").read_text())
  file = index["weight_map"]["visual.blocks.2.attn.qkv.bias"]
  tensors = load_file(str(bad / file))
  del tensors["visual.blocks.2.attn.qkv.bias"]
  save_file(tensors, str(bad / file))
  with pytest.raises(convert.ConversionError, match=r"missing tensors \(1\): vision.blocks.2.attn.qkv.bias"):
    convert.prepare_hf(str(bad))
  tensors["visual.blocks.2.attn.qkv.bias"] = np.zeros(5, np.float32)
  save_file(tensors, str(bad / file))
  with pytest.raises(convert.ConversionError, match=r"vision.blocks.2.attn.qkv.bias has shape \(5,\)"):
    convert.dry_run_report(convert.prepare_hf(str(bad)), None)


@pytest.mark.parametrize("prefix_sharing", [True, False])
def test_scorer_matches_transformers(world, prefix_sharing):
  """The pipeline's path: the converted directory's processor (`PromptBuilder`) encodes each QA, and
  `scoring.Scorer` scores pictures of different token counts together (prefix sharing: one left-padded
  prefix per picture, its QA packed as suffixes; the image-free pass drops the vision tokens). S(I2C)
  equals eq. 1 computed by hand from transformers' logits."""
  from c3l_jax import scoring
  from c3l_jax.data.prompts import PromptBuilder, load_processor

  model, rows, hf = world["model"], world["rows"], world["hf"]
  builder = PromptBuilder(load_processor(str(world["root"] / "ours")))
  pictures = Q.pictures()
  items, pixels, want = [], {}, []
  for name in ("panorama", "tiny", "grey"):
    r = rows[name]
    enc = builder.encode_qa(Q.QUESTION, Q.ANSWER, pictures[name])
    assert enc.prompt_image == r["ids"][:-N_ANSWER] and enc.prompt_text == r["text_ids"][:-N_ANSWER]
    np.testing.assert_array_equal(enc.pixel_values.pixel_values, r["pixels"])
    assert enc.pixel_values.grid == tuple(r["grid"])
    pixels[name] = enc.pixel_values
    # Two answers per picture as token ids: transformers' greedy one (p_t^v far from 0) and it reversed.
    greedy = r["ids"][-N_ANSWER:]
    for answer in (greedy, greedy[::-1][:5]):
      items.append(scoring.ScoreInput(name, enc.prompt_image, enc.prompt_text, answer))
      v = Q.torch_forward(hf, enc.prompt_image + answer, r["pixels"], r["grid"])
      d = Q.torch_forward(hf, enc.prompt_text + answer)
      want.append(Q.i2c(Q.answer_logprobs(v, enc.prompt_image + answer, len(answer)),
                        Q.answer_logprobs(d, enc.prompt_text + answer, len(answer))))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  scorer = scoring.Scorer(model, mesh, scoring.ScoringConfig(prefix_sharing=prefix_sharing, batch_rows=6),
                          model.cfg.image_token_id, builder.pad_id)
  got = [r["i2c"] for r in scorer.score(items, pixels)]
  for g, w in zip(got, want):
    assert abs(g - w) < 1e-3 * abs(w) + 1e-6, (got, want)
  assert max(abs(w) for w in want) > 0.1


def test_curate_scores_each_turn_as_transformers(world, tmp_path):
  """The curate stage (its config's stages, run in this process) on a Qwen2.5-VL: a real 3-turn mix665k conversation (the image tag behind the
  first question), each gpt turn's S(I2C) against transformers' fp32 forward of the chat template
  over the conversation before it, with the picture's own number of image tokens in every turn."""
  import json
  import os

  fixture = os.path.join(REPO, "tests", "fixtures", "llava-data", "llava_v1_5_mix665k_entries_31-100.json")
  with open(fixture) as f:
    entry = next(e for e in json.load(f) if len(e["conversations"]) == 6
                 and e["conversations"][0]["value"].endswith("<image>"))
  picture = Q.pictures()["photo"]
  os.makedirs(tmp_path / "images" / os.path.dirname(entry["image"]), exist_ok=True)
  picture.save(tmp_path / "images" / entry["image"], format="PNG")
  (tmp_path / "data.json").write_text(json.dumps([entry]))
  import configs.curate
  from c3l_jax import pipeline

  config = configs.curate.get_config()  # launch.py --config=configs/curate.py, in this process
  with config.unlocked():
    config.model.checkpoint = str(world["root"] / "ours")
    config.data.records = str(tmp_path / "data.json")
    config.data.image_root = str(tmp_path / "images")
    config.model.dtype = config.model.param_dtype = "float32"
  pipeline.run_stages(config, str(tmp_path / "w"), pipeline.check_config(config))
  with open(tmp_path / "w" / "export" / "scores.jsonl") as f:
    (row,) = [json.loads(line) for line in f]

  p = world["proc"]
  pixels, grid = p.image(picture)
  values = [c["value"] for c in entry["conversations"]]
  values[0] = values[0].replace("<image>", "").strip()  # LLaVA moves the image to the front
  want = []
  for k in range(3):
    def ids(with_image):
      msgs = []
      for j in range(k + 1):
        content = ([{"type": "image"}] if with_image and j == 0 else []) + [{"type": "text", "text": values[2 * j]}]
        msgs.append({"role": "user", "content": content})
        if j < k:
          msgs.append({"role": "assistant", "content": [{"type": "text", "text": values[2 * j + 1]}]})
      text = p.tokenizer.apply_chat_template(msgs, chat_template=p.template, tokenize=False,
                                             add_generation_prompt=True)
      out = p.tokenizer(text, add_special_tokens=False)["input_ids"]
      return p.expand(out, M.image_tokens(grid)) if with_image else out
    answer = p.tokenizer(values[2 * k + 1], add_special_tokens=False)["input_ids"]
    v, d = ids(True) + answer, ids(False) + answer
    want.append(Q.i2c(Q.answer_logprobs(Q.torch_forward(world["hf"], v, pixels, grid), v, len(answer)),
                      Q.answer_logprobs(Q.torch_forward(world["hf"], d), d, len(answer))))
  assert len(row["turns"]) == 3
  for got, w in zip(row["turns"], want):
    assert got == pytest.approx(w, rel=1e-3, abs=1e-5)
  assert row["i2c"] == pytest.approx(sum(want), rel=1e-3, abs=1e-5)


# The eval stage on the tiny Qwen: pictures of different token counts (saved as files; MMBench's as
# base64), a few questions per benchmark.
POPE_OBJECTS = {"panorama.png": ["dog", "car", "tree"], "tall.png": ["cat", "car", "sky"],
                "photo.png": ["bird", "boat", "tree"]}
SEED_QS = [("how many objects are there?", ("one", "two", "three", "four"), "B", "grey.png"),
           ("what color is the circle?", ("red", "blue", "green", "yellow"), "A", "panorama.png")]
MMB_ROWS = [("1", "which colour is most common?", "Look at the whole picture.",
             ("red", "blue", "green", "grey"), "B", "photo"),
            ("2", "is it a photo?", "", ("yes", "no"), "A", "tiny")]


def _eval_files(root):
  """Benchmark files in the official formats; returns the config overrides that name them."""
  import base64
  import io
  import json
  import os

  images, pictures = root / "bench_images", Q.pictures()
  (images / "images").mkdir(parents=True)
  for name in ("panorama", "tall", "photo", "grey"):
    pictures[name].convert("RGB").save(images / f"{name}.png")
  (images / "images" / "tall.png").write_bytes((images / "tall.png").read_bytes())
  (root / "pope.jsonl").write_text("".join(json.dumps({"image": k, "objects": v}) + "\n"
                                           for k, v in POPE_OBJECTS.items()))
  seed = [{"question_id": str(i), "question": q, "answer": a, "data_id": im, "data_type": "image",
           "question_type_id": 5, **{f"choice_{c}": o for c, o in zip("abcd", opts)}}
          for i, (q, opts, a, im) in enumerate(SEED_QS)]
  (root / "seed.json").write_text(json.dumps({"questions": seed, "question_type": {"Counting": 5}}))
  lines = ["\t".join(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])]
  for index, q, hint, opts, a, picture in MMB_ROWS:
    buf = io.BytesIO()
    pictures[picture].convert("RGB").save(buf, format="PNG")
    lines.append("\t".join([index, q, hint or "nan", *(list(opts) + ["", ""])[:4], a, "all",
                            base64.b64encode(buf.getvalue()).decode()]))
  (root / "mmb.tsv").write_text("\n".join(lines) + "\n")
  (images / "questions.jsonl").write_text(json.dumps(
      {"question_id": 0, "image": "tall.png", "text": "Describe the image.", "category": "detail"}) + "\n")
  return {"eval.checkpoint": str(root / "ours"), "eval.pope_annotations": str(root / "pope.jsonl"),
          "eval.pope_images": str(images), "eval.seed_bench_json": str(root / "seed.json"),
          "eval.seed_bench_images": str(images), "eval.mmbench_tsv": str(root / "mmb.tsv"),
          "eval.llava_bench_dir": str(images), "eval.max_new_tokens": 6, "eval.long_max_new_tokens": 6,
          "eval.max_items": 2, "data.eval_batch_size": 8, "scoring.prefix_sharing": False,
          "generation.prompt_bucket": 128,
          "model.dtype": "float32", "model.param_dtype": "float32"}


def _eval_config(overrides):
  from configs import qwen25vl

  config = qwen25vl.get_config("tiny")
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


def _rows(directory):
  import json
  import os

  out = []
  for name in sorted(os.listdir(directory)):
    if name.startswith("part-") and name.endswith(".jsonl"):
      with open(os.path.join(directory, name)) as f:
        out += [json.loads(line) for line in f if line.strip()]
  return out


def test_eval_stage_asks_qwens_prompts_as_transformers(world, tmp_path):
  """`eval` on the tiny Qwen, every benchmark, both multiple-choice modes (SEED by log-likelihood,
  MMBench by a generated letter), in-process: each generated answer (6 greedy tokens, pictures of
  different token counts batched with left padding) is transformers' greedy continuation (fp32) of the
  checkpoint's chat template around Qwen's evaluation prompt, written out here as VLMEvalKit's Qwen2-VL
  prompts are (so LLaVA-1.5's "Answer the question using a single word or phrase." / "Answer with the
  option's letter ..." fail it); each option log-likelihood is transformers' mean answer-token log-prob
  after the bare question."""
  import io

  import PIL.Image

  from c3l_jax.data.images import load_image
  from c3l_jax.eval import multiple_choice as mc
  from c3l_jax.eval import pope
  from c3l_jax.pipeline import eval as eval_stage

  root, hf, proc = world["root"], world["hf"], world["proc"]
  overrides = _eval_files(root)
  images = root / "bench_images"
  eos = (151645, 151643)

  def greedy(text, picture):
    pixels, grid = proc.image(picture)
    ids = proc.expand(proc.prompt(text, True), M.image_tokens(grid))
    out = Q.torch_greedy(hf, ids, pixels, grid, 6)
    out = out[:next((i for i, t in enumerate(out) if t in eos), len(out))]
    return proc.tokenizer.decode(out, skip_special_tokens=True).strip()

  picture = lambda name: load_image(str(images / name))  # noqa: E731
  loglik = eval_stage.run(_eval_config({**overrides, "eval.benchmarks": "pope,seed,llava_bench"}),
                          str(tmp_path / "loglik"))
  # POPE: Qwen's yes/no prompt, over pictures of 3 token counts.
  for split in pope.SPLITS:
    rows = _rows(tmp_path / "loglik" / "eval" / f"pope_{split}")
    assert len(rows) == 2 and loglik["pope"][split]["n"] == 2
    for r in rows:
      assert r["answer"] == greedy(r["text"] + " Please answer yes or no.", picture(r["image"])), r
    assert loglik["pope"][split] == pope.metrics([pope.parse_yes_no(r["answer"]) for r in rows],
                                                 [r["label"] for r in rows])
  # LLaVA-Bench: VLMEvalKit's VQA instruction after the question.
  (answer,) = _rows(tmp_path / "loglik" / "eval" / "llava_bench")
  assert answer["answer"] == greedy("Describe the image.\nPlease try to answer the question with short "
                                    "words or phrases if possible.", picture("tall.png"))
  # SEED by option log-likelihood: the bare question, as SEED's protocol.
  items = {"seed": mc.load_seed_bench(str(root / "seed.json"), str(images))[0],
           "mmbench": mc.load_mmbench(str(root / "mmb.tsv"))[0]}
  image_of = lambda it: (picture(it.image) if it.image_bytes is None  # noqa: E731
                         else PIL.Image.open(io.BytesIO(it.image_bytes)).convert("RGB"))
  for name in ("seed",):
    rows = _rows(tmp_path / "loglik" / "eval" / name)
    assert [r["id"] for r in rows] == [it.id for it in items[name]]
    for row, item in zip(rows, items[name]):
      pixels, grid = proc.image(image_of(item))
      prompt = proc.expand(proc.prompt(mc.question_text(item), True), M.image_tokens(grid))
      want = []
      for option in item.options:
        answer_ids = proc.tokenizer(option, add_special_tokens=False)["input_ids"]
        ids = prompt + answer_ids
        want.append(float(np.mean(Q.answer_logprobs(Q.torch_forward(hf, ids, pixels, grid), ids,
                                                    len(answer_ids)))))
      np.testing.assert_allclose(row["scores"], want, atol=1e-3)
      assert row["predictions"][0] == int(np.argmax(want))

  # MMBench by a generated letter: Qwen's MCQ prompt (with and without a hint), every rotation.
  gen = eval_stage.run(_eval_config({**overrides, "eval.benchmarks": "mmbench",
                                     "eval.mc_mode": "generate"}), str(tmp_path / "generate"))
  for name, circular in (("mmbench", True),):
    rows = _rows(tmp_path / "generate" / "eval" / name)
    assert [r["id"] for r in rows] == [it.id for it in items[name]]
    for row, item in zip(rows, items[name]):
      for r in range(len(item.options) if circular else 1):
        options, _ = mc.rotated(item, r)
        text = (f"Hint: {item.hint}\n" if item.hint else "") + f"Question: {item.question}\nOptions:\n"
        text += "".join(f"{'ABCD'[i]}. {o}\n" for i, o in enumerate(options))
        text += "Please select the correct answer from the options above."
        assert row["outputs"][r] == greedy(text, image_of(item)), (name, item.id, r)
        assert row["predictions"][r] == mc.parse_choice(row["outputs"][r], options)
    assert gen[name]["mode"] == "generate" and gen[name]["n"] == len(items[name])
