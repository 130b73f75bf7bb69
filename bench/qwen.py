r"""`bench/score.py --family=qwen25vl`: S(I2C) scoring of Qwen2.5-VL, c3l_jax's `Scorer` against
transformers' `Qwen2_5_VLForConditionalGeneration` scored the natural way, in one process.

The model: the real Qwen2.5-VL-3B `config.json` (tests/fixtures) narrowed (decoder width 512, 4 layers,
8 heads / 2 kv, M-RoPE sections 8/12/12; vision tower width 256, 4 blocks with full attention in
blocks 1 and 3, windows of 112 px), the real vocabulary (151,936) and tied head, random weights
(transformers' init + 0.02 N(0, 1)), saved, converted and loaded in fp32. The data: N pictures of
different sizes (so different image-token counts) through the real image processor (max_pixels
200,704: at most 256 image tokens), Q QA per picture with random token ids in the real chat
template's frame (`<|im_start|>system ... <|vision_start|><|image_pad|>...<|vision_end|>question
<|im_end|>\n<|im_start|>assistant\n` + answer); the image-free prompt drops the vision tokens.

transformers: per batch of `--batch_rows` QA, one right-padded with-image forward (each row its
picture; `image_grid_thw`, `mm_token_type_ids` so that it uses M-RoPE) and one text-only forward,
log-softmax over the answer positions. c3l_jax: `scoring.Scorer` with prefix sharing (one left-padded
prefix per picture, its QA packed against it, the LM head on answer tokens only). Each side is warmed
up, then timed in interleaved rounds (best of rounds). The run aborts if S(I2C) differs by more than
1e-3 or a summed log-prob by more than 1e-4 relative.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np

from bench import common

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                       "qwen2.5-vl-3b-instruct")
TEXT = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})
VISION = dict(depth=4, hidden_size=256, intermediate_size=688, num_heads=4, out_hidden_size=512,
              fullatt_block_indexes=[1, 3])
MAX_PIXELS = 200_704  # 256 image tokens at most
SIZES = [(448, 448), (448, 224), (224, 448), (336, 252), (560, 140), (280, 280), (392, 196), (168, 336)]
IMAGE, START, END = 151655, 151652, 151653
PAD = 151643


def build(seed: int):
  import jax
  import torch
  from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

  from c3l_jax import sharding
  from c3l_jax.convert import convert

  work = tempfile.mkdtemp(prefix="c3l_bench_qwen_")
  hf_dir = os.path.join(work, "hf")
  shutil.copytree(FIXTURE, hf_dir)
  os.remove(os.path.join(hf_dir, "model.safetensors.index.json"))
  cfg = json.load(open(os.path.join(hf_dir, "config.json")))
  cfg.update(TEXT)
  cfg["vision_config"].update(VISION)
  json.dump(cfg, open(os.path.join(hf_dir, "config.json"), "w"))
  pre = json.load(open(os.path.join(hf_dir, "preprocessor_config.json")))
  pre["max_pixels"] = MAX_PIXELS
  json.dump(pre, open(os.path.join(hf_dir, "preprocessor_config.json"), "w"))
  torch.manual_seed(seed)
  hf = Qwen2_5_VLForConditionalGeneration(AutoConfig.from_pretrained(hf_dir)).float().eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.02 * torch.randn_like(p))
  hf.save_pretrained(hf_dir)
  out = os.path.join(work, "c3l")
  convert(hf_dir, out)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  return hf, sharding.load_model(out, mesh), mesh, hf_dir


def make_data(hf_dir: str, n_images: int, qa: int, seed: int):
  from PIL import Image
  from transformers import AutoImageProcessor

  from c3l_jax import scoring
  from c3l_jax.models.pictures import QwenPicture

  proc = AutoImageProcessor.from_pretrained(hf_dir)
  rng = np.random.default_rng(seed)
  system = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
  tail = [151645, 198, 151644, 77091, 198]
  items, pixels = [], {}
  for i in range(n_images):
    w, h = SIZES[i % len(SIZES)]
    picture = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = proc(images=[picture], return_tensors="np")
    grid = tuple(int(g) for g in out["image_grid_thw"][0])
    key = f"img{i}"
    pixels[key] = QwenPicture(out["pixel_values"].astype(np.float32), grid)
    n = int(np.prod(grid)) // 4
    for _ in range(qa):
      question = rng.integers(100, 150000, size=int(rng.integers(18, 23))).tolist()
      answer = rng.integers(100, 150000, size=int(rng.integers(20, 29))).tolist()
      image_part = [START] + [IMAGE] * n + [END]
      items.append(scoring.ScoreInput(key, system + image_part + question + tail,
                                      system + question + tail, answer))
  return items, pixels


def hf_score(hf, items, pixels, batch_rows):
  import torch

  from c3l_jax.data import batching

  def logprobs(prompts, answers, chunk=None):
    seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
    ids, mask = batching.right_pad(seqs, max(map(len, seqs)), PAD)
    ids, mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
    kwargs = {}
    if chunk is not None:
      kwargs = dict(pixel_values=torch.from_numpy(np.concatenate([pixels[it.image_key].pixel_values
                                                                  for it in chunk])),
                    image_grid_thw=torch.as_tensor([pixels[it.image_key].grid for it in chunk]),
                    mm_token_type_ids=(ids == IMAGE).int())
    logits = hf(input_ids=ids, attention_mask=mask, **kwargs).logits
    out = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
      rows = torch.log_softmax(logits[i, len(p) - 1:len(p) - 1 + len(a)].float(), dim=-1)
      out.append(rows[torch.arange(len(a)), torch.as_tensor(a)].numpy().astype(np.float64))
    return out

  results = []
  with torch.no_grad():
    for s in range(0, len(items), batch_rows):
      chunk = items[s:s + batch_rows]
      answers = [it.answer for it in chunk]
      lv = logprobs([it.prompt_image for it in chunk], answers, chunk)
      ld = logprobs([it.prompt_text for it in chunk], answers)
      for v, d in zip(lv, ld):
        results.append(dict(i2c=float(np.sum(np.exp(v) * (v - d))), logp_image=float(v.sum()),
                            logp_text=float(d.sum())))
  return results


def score_main(args) -> None:
  import sys

  from c3l_jax import scoring

  threads = common.setup_threads(args.threads)
  t0 = time.perf_counter()
  hf, model, mesh, hf_dir = build(args.seed)
  n_images = 2 if args.small else args.images
  items, pixels = make_data(hf_dir, n_images, args.qa_per_image, args.seed)
  tokens = sorted({p.num_patches // 4 for p in pixels.values()})
  print(f"model: Qwen2.5-VL narrowed from the real 3B config: decoder 512 x 4 layers, vision 256 x 4 "
        f"blocks, vocab 151936 tied; {common.count_params(hf) / 1e6:.1f}M params, fp32; torch "
        f"{threads} threads; built in {time.perf_counter() - t0:.1f}s")
  print(f"data: {n_images} pictures ({tokens} image tokens) x {args.qa_per_image} QA = {len(items)} "
        f"records, batch_rows {args.batch_rows}")
  scorer = scoring.Scorer(model, mesh, scoring.ScoringConfig(batch_rows=args.batch_rows),
                          model.cfg.image_token_id, PAD)
  fns = {"ours": lambda: scorer.score(items, pixels),
         "transformers": lambda: hf_score(hf, items, pixels, args.batch_rows)}
  warm = {"transformers": lambda: hf_score(hf, items[:args.batch_rows], pixels, args.batch_rows)}
  timing, outputs = common.compare(fns, args.repeats, warmup_fns=warm)
  ref, got = outputs["transformers"], outputs["ours"]
  d_i2c = max(abs(o["i2c"] - r["i2c"]) for o, r in zip(got, ref))
  rel = max(abs(o[k] - r[k]) / max(1.0, abs(r[k])) for o, r in zip(got, ref)
            for k in ("logp_image", "logp_text"))
  print(f"agreement: max |d i2c| {d_i2c:.2e}, log-probs relative {rel:.1e}")
  if d_i2c > 1e-3 or rel > 1e-4:
    sys.exit("ABORT: ours disagrees with transformers")
  rate = {name: len(items) / t.best for name, t in timing.items()}
  for name, t in timing.items():
    print(f"{name:13s} {t}  {rate[name]:.2f} rec/s")
  print(f"load average at the end {os.getloadavg()[0]:.2f}")
  print(f"score (qwen25vl): ours {rate['ours']:.2f} rec/s, transformers {rate['transformers']:.2f} "
        f"rec/s, ratio {rate['ours'] / rate['transformers']:.2f}x (target >= 3x)")


def generate_mix_main(args) -> None:
  """`bench/generate.py --mix=pipeline --family=qwen25vl`: the initial stage's length mix, greedy,
  c3l_jax's `sampling.generate_many` (continuous batching, admission longest first, packed pictures
  and host M-RoPE positions through `QwenImageInputs`) against transformers' `generate` in static
  batches, each row stopped at its budget; every row's tokens compared up to its budget."""
  import torch
  from transformers import StoppingCriteria, StoppingCriteriaList

  from bench import generate as G
  from c3l_jax import sampling
  from c3l_jax.data import batching
  from c3l_jax.models.vlm import image_inputs

  threads = common.setup_threads(args.threads)
  hf, model, mesh, hf_dir = build(args.seed)
  count = args.prompts or 4 * args.batch
  items, pixels = make_data(hf_dir, count, 1, args.seed)
  prompts = [it.prompt_image for it in items]
  pictures = [pixels[it.image_key] for it in items]
  kinds, budgets = G.pipeline_budgets(count, args.seed)
  if args.small:
    budgets = [max(2, b // 8) for b in budgets]
  print(f"model: Qwen2.5-VL narrowed from the real 3B config ({common.count_params(hf) / 1e6:.1f}M "
        f"params, fp32), torch {threads} threads; data: {count} prompts with pictures of "
        f"{sorted({p.num_patches // 4 for p in pictures})} image tokens, budgets {sorted(budgets)} "
        f"(sum {sum(budgets)}), batch / slots {args.batch}")
  inputs = image_inputs(model.cfg)
  cfg = sampling.SamplingConfig(max_new_tokens=max(budgets), pad_id=PAD)
  occupancy = {}

  def images(idx, tokens, mask):
    chosen = [pictures[i] for i in idx]
    return inputs.batch(chosen), inputs.rope_positions(tokens, mask, chosen)

  def ours():
    out, _, occupancy["ours"] = sampling.generate_many(
        model, prompts, None, cfg, slots=args.batch, bucket=G.BUCKET, limits=budgets,
        order=sampling.longest_first([G.EXPECTED[k] for k in kinds]), images=images)
    return out

  class Budget(StoppingCriteria):
    def __init__(self, start, limits):
      self.start, self.limits = start, torch.as_tensor(limits)

    def __call__(self, input_ids, scores, **kwargs):
      return (input_ids.shape[1] - self.start) >= self.limits

  def theirs(rows_all=range(count), limit=None):
    rows_all = list(rows_all)
    out = np.zeros((count, max(budgets)), np.int64)
    for lo in range(0, len(rows_all), args.batch):
      rows = rows_all[lo:lo + args.batch]
      seqs = [prompts[i] for i in rows]
      ids, mask = batching.left_pad(seqs, max(map(len, seqs)), PAD)
      ids, mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
      lim = [limit or budgets[i] for i in rows]
      with torch.no_grad():
        got = hf.generate(
            ids, attention_mask=mask,
            pixel_values=torch.from_numpy(np.concatenate([pictures[i].pixel_values for i in rows])),
            image_grid_thw=torch.as_tensor([pictures[i].grid for i in rows]),
            mm_token_type_ids=(ids == IMAGE).int(), max_new_tokens=max(lim), do_sample=False,
            repetition_penalty=1.0, eos_token_id=None, pad_token_id=PAD,
            stopping_criteria=StoppingCriteriaList([Budget(ids.shape[1], lim)]))
      got = got[:, ids.shape[1]:].numpy()
      out[rows, :got.shape[1]] = got
    return out

  fns = {"ours": ours, "transformers": theirs}
  warm = {"transformers": lambda: theirs(range(args.batch), 2)}
  timing, outputs = common.compare(fns, args.repeats, warmup_fns=warm)
  same = sum(bool(np.array_equal(outputs["ours"][i, :b], outputs["transformers"][i, :b]))
             for i, b in enumerate(budgets))
  print(f"token-for-token: {same}/{count} rows identical to transformers up to their budgets")
  rate = {name: sum(budgets) / t.best for name, t in timing.items()}
  for name, t in timing.items():
    print(f"{name:13s} {t}  {rate[name]:.1f} useful tok/s")
  print(f"ours: {occupancy['ours'].wasted:.0%} of slot-steps wasted, transformers' static batches "
        f"{G.static_waste(budgets, args.batch):.0%}; load average at the end {os.getloadavg()[0]:.2f}")
  print(f"generate --mix=pipeline (qwen25vl): ours {rate['ours']:.1f} useful tok/s, transformers "
        f"{rate['transformers']:.1f}, ratio {rate['ours'] / rate['transformers']:.2f}x (target >= 2x)")
