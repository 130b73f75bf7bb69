r"""S(I2C) scoring throughput: c3l_jax's `Scorer` against transformers' naive two-forward scoring.

One process, the same random LLaVA weights (transformers -> convert -> c3l_jax, fp32) and the same
inputs: N images x Q QA pairs with random token ids,

    prompt (with image) = [bos] + 4 fixed text tokens + <image> x 256 + ~20 question tokens
    prompt (text only)  = the same without the image tokens;   answer = ~24 tokens.

transformers (the reference, the natural way): for each batch of `--batch_rows` QA in order, one
right-padded with-image forward (`input_ids` = prompt + answer, `attention_mask`, one image per row
in `pixel_values`) and one right-padded text-only forward, under `torch.no_grad()`; per-token answer
log-probs from the logits; S(I2C) = sum_t p_v (log p_v - log p_d).
c3l_jax: `scoring.Scorer` with prefix sharing (the image prefix's KV cache once per image, QA
suffixes against it, the LM head on answer positions only) and, for context, without it (the naive
two full forwards in JAX).

Each side is warmed up once (JAX compiles there; torch's warmup is one batch), then timed in
interleaved rounds; best-of-rounds is reported (the load average is printed with each round: on a
shared machine torch's OpenMP threads suffer more from oversubscription than XLA's pool, so compare
rounds taken at low load). Achieved FLOP/s counts the FLOPs each implementation actually executes
(padding included; see `bench/common.py`) over its best time, as a fraction of a plain fp32 2048^3
matmul in the same framework measured once in the same run (a busy moment during that probe can
push the fraction over 100%). The run aborts if S(I2C) differs from transformers' by more than 1e-3
(absolute) or a summed log-prob by more than 1e-4 (relative). torch uses `--threads` (default 2 =
the cores here) intra-op threads; XLA:CPU sizes its pool from the cores. Not a test: timings are
printed, never asserted.

    python bench/score.py                 # N=8 images x 5 QA, the mid-size model
    python bench/score.py --small         # smoke test
    python bench/score.py --profile       # also time the pieces of each implementation
    python bench/score.py --family=qwen25vl   # Qwen2.5-VL, pictures of 8 sizes (bench/qwen.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bench import common  # noqa: E402
from c3l_jax.data import batching  # noqa: E402

PAD = 0
BOS = 1


def make_data(models: common.Models, n_images: int, qa_per_image: int, seed: int):
  """Random items (`scoring.ScoreInput`) and pixels `{key: [3, H, W] float32}`."""
  from c3l_jax import scoring

  a = models.arch
  rng = np.random.default_rng(seed)
  lo, hi = 3, models.image_token_id  # ordinary text ids: not pad / bos / eos, not the image token
  system = rng.integers(lo, hi, size=4).tolist()  # like "USER: ": shared by every prompt
  items, pixels = [], {}
  for i in range(n_images):
    key = f"img{i}"
    pixels[key] = rng.standard_normal((3, a.image_size, a.image_size)).astype(np.float32)
    for _ in range(qa_per_image):
      question = rng.integers(lo, hi, size=int(rng.integers(18, 23))).tolist()
      answer = rng.integers(lo, hi, size=int(rng.integers(20, 29))).tolist()
      prompt_image = [BOS] + system + [models.image_token_id] * a.image_tokens + question
      prompt_text = [BOS] + system + question
      items.append(scoring.ScoreInput(key, prompt_image, prompt_text, answer))
  return items, pixels


# ----------------------------------------------------------------------------- transformers


def _right_pad(seqs):
  """Right-padded int64 ids and mask for torch (the project's padding helper, widened)."""
  ids, mask = batching.right_pad(seqs, max(len(s) for s in seqs), PAD)
  return ids.astype(np.int64), mask.astype(np.int64)


def hf_answer_logprobs(hf, prompts, answers, pixel_values=None):
  """One batched teacher-forced forward; per-row answer-token log-probs (list of `[n]` arrays)."""
  import torch

  ids, mask = _right_pad([list(p) + list(a) for p, a in zip(prompts, answers)])
  kwargs = {} if pixel_values is None else {"pixel_values": torch.from_numpy(pixel_values)}
  logits = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              **kwargs).logits
  out = []
  for i, (p, a) in enumerate(zip(prompts, answers)):
    rows = torch.log_softmax(logits[i, len(p) - 1:len(p) - 1 + len(a)].float(), dim=-1)
    out.append(rows[torch.arange(len(a)), torch.as_tensor(a)].numpy())
  return out


def hf_score(hf, items, pixels, batch_rows, timings=None):
  """transformers' naive scoring: with-image and text-only forwards of each batch of QA."""
  import torch

  results = []
  with torch.no_grad():
    for s in range(0, len(items), batch_rows):
      chunk = items[s:s + batch_rows]
      pix = np.stack([pixels[it.image_key] for it in chunk])
      answers = [it.answer for it in chunk]
      t0 = time.perf_counter()
      lv = hf_answer_logprobs(hf, [it.prompt_image for it in chunk], answers, pix)
      t1 = time.perf_counter()
      ld = hf_answer_logprobs(hf, [it.prompt_text for it in chunk], answers)
      t2 = time.perf_counter()
      if timings is not None:
        timings["image forward"] = timings.get("image forward", 0.0) + t1 - t0
        timings["text forward"] = timings.get("text forward", 0.0) + t2 - t1
      for v, d in zip(lv, ld):
        v64, d64 = v.astype(np.float64), d.astype(np.float64)
        results.append(dict(i2c=float(np.sum(np.exp(v64) * (v64 - d64))),
                            logp_image=float(v64.sum()), logp_text=float(d64.sum()),
                            n_tokens=len(v)))
  return results


def hf_flops(a: common.Arch, items, batch_rows):
  """(executed, unpadded) FLOPs of `hf_score`: full logits at every position, every CLIP layer."""
  executed = unpadded = 0.0
  for s in range(0, len(items), batch_rows):
    chunk = items[s:s + batch_rows]
    b = len(chunk)
    wi = max(len(it.prompt_image) + len(it.answer) for it in chunk)
    wt = max(len(it.prompt_text) + len(it.answer) for it in chunk)
    executed += (common.vision_flops(a, b, all_layers=True) + common.decoder_flops(a, b, wi, wi)
                 + common.head_flops(a, b * wi) + common.decoder_flops(a, b, wt, wt)
                 + common.head_flops(a, b * wt))
    for it in chunk:
      li, lt = len(it.prompt_image) + len(it.answer), len(it.prompt_text) + len(it.answer)
      unpadded += (common.vision_flops(a, 1, all_layers=True) + common.decoder_flops(a, 1, li, li)
                   + common.head_flops(a, li) + common.decoder_flops(a, 1, lt, lt)
                   + common.head_flops(a, lt))
  return executed, unpadded


# ----------------------------------------------------------------------------- c3l_jax


def ours_flops(a: common.Arch, scorer, items):
  """(executed, unpadded) FLOPs of `Scorer.score`: the batches, buckets and padding rows it runs.

  Mirrors `Scorer._score_batch`'s shapes (read from `Scorer._batches`): with prefix sharing, per
  batch the vision tower on G images, the prefix [G, P], each image's packed suffixes [G, Ws] against
  P + Ws keys, the text pass [G*Q, Wt]; the LM head on each data shard's answer tokens (bucketed) in
  each pass.
  """
  from c3l_jax.data.batching import bucket

  cfg = scorer.cfg
  executed = unpadded = 0.0
  for batch in scorer._batches(items):
    real = [items[i] for i in batch.rows if i is not None]
    rows = [items[i] if i is not None else real[0] for i in batch.rows]
    b = len(rows)
    n_ans = [len(items[i].answer) if i is not None else 0 for i in batch.rows]
    # The text pass's rows and the LM head's (each data shard's answer tokens), as the scorer builds them.
    tokens, _, ans, _ = scorer._full_rows([r.prompt_text for r in rows], rows, n_ans)
    wt, head_rows = tokens.shape[1], ans.size
    executed += common.decoder_flops(a, b, wt, wt) + common.head_flops(a, head_rows)
    g = len(batch.images)
    if cfg.prefix_sharing:
      p = batch.prefix_len
      packed = [sum(len(items[i].prompt_image) - p + len(items[i].answer)
                    for i in batch.rows[j * batch.q:(j + 1) * batch.q] if i is not None) for j in range(g)]
      ts = bucket(max(packed), cfg.suffix_bucket)
      executed += (common.vision_flops(a, g, all_layers=False) + common.decoder_flops(a, g, p, p)
                   + common.decoder_flops(a, g, ts, p + ts) + common.head_flops(a, head_rows))
      n_img = len({items[i].image_key for i in batch.rows if i is not None})
      unpadded += common.vision_flops(a, n_img, all_layers=False) + common.decoder_flops(a, n_img, p, p)
      for it in real:
        s = len(it.prompt_image) - p + len(it.answer)
        unpadded += common.decoder_flops(a, 1, s, p + s) + common.head_flops(a, len(it.answer))
    else:
      wi = scorer._full_rows([r.prompt_image for r in rows], rows, n_ans)[0].shape[1]
      executed += (common.vision_flops(a, b, all_layers=False) + common.decoder_flops(a, b, wi, wi)
                   + common.head_flops(a, head_rows))
      for it in real:
        li = len(it.prompt_image) + len(it.answer)
        unpadded += (common.vision_flops(a, 1, all_layers=False) + common.decoder_flops(a, 1, li, li)
                     + common.head_flops(a, len(it.answer)))
    for it in real:
      lt = len(it.prompt_text) + len(it.answer)
      unpadded += common.decoder_flops(a, 1, lt, lt) + common.head_flops(a, len(it.answer))
  return executed, unpadded


def profile_ours(models, scorer, items, pixels, repeats=2):
  """Wall time of each jitted piece of `Scorer.score` (each blocked on), summed over the batches."""
  import jax
  from flax import nnx

  from c3l_jax import scoring

  names = {"_prefix_cache": "prefix (vision + prefix KV)", "_suffix_pass": "suffix pass",
           "_full_pass": None, "_combine": "combine"}
  originals = {n: getattr(scoring, n) for n in names}
  acc: dict[str, float] = {}

  def wrap(name, fn):
    def timed(*args, **kwargs):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      label = names[name] or ("text pass" if args[4] is None else "full pass (with image)")
      acc[label] = acc.get(label, 0.0) + time.perf_counter() - t0
      return out
    return timed

  try:
    for n, fn in originals.items():
      setattr(scoring, n, wrap(n, fn))
    best = None
    for _ in range(repeats):
      acc.clear()
      t0 = time.perf_counter()
      scorer.score(items, pixels)
      total = time.perf_counter() - t0
      if best is None or total < best[0]:
        best = (total, dict(acc))
  finally:
    for n, fn in originals.items():
      setattr(scoring, n, fn)
  total, parts = best
  # The vision tower alone, on as many images per call as a prefix-sharing batch holds.
  batches = list(scorer._batches(items))
  g = len(batches[0].images)
  graphdef, state = nnx.split(models.jax_model)
  enc = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_images(x))
  pix = np.stack([pixels[items[0].image_key]] * g)
  jax.block_until_ready(enc(state, pix))
  t_vis = min(common.time_once(lambda: enc(state, pix))[0] for _ in range(3)) * len(batches)
  parts["  vision tower inside prefix (alone)"] = t_vis
  parts["host / other"] = total - sum(v for k, v in parts.items() if not k.startswith(" "))
  return total, parts


def profile_hf(models, items, pixels, batch_rows):
  import torch

  parts: dict[str, float] = {}
  t0 = time.perf_counter()
  hf_score(models.hf, items, pixels, batch_rows, parts)
  total = time.perf_counter() - t0
  with torch.no_grad():
    pix = torch.from_numpy(np.stack([pixels[items[0].image_key]] * batch_rows))
    models.hf.model.get_image_features(pix)
    t_vis = min(common.time_once(lambda: models.hf.model.get_image_features(pix))[0]
                for _ in range(3))
  parts["  vision tower inside image forward (alone)"] = t_vis * -(-len(items) // batch_rows)
  return total, parts


# ----------------------------------------------------------------------------- main


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="tiny model and data (smoke test)")
  ap.add_argument("--n_images", type=int, default=None, help="images (default 8; 4 with --small)")
  ap.add_argument("--qa_per_image", type=int, default=5)
  ap.add_argument("--batch_rows", type=int, default=8, help="QA rows per batch (both sides)")
  ap.add_argument("--repeats", type=int, default=4, help="timed rounds (best is reported)")
  ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch default)")
  ap.add_argument("--image_token", type=int, default=None, help="image token id (default vocab - 1)")
  ap.add_argument("--no_naive_jax", action="store_true", help="skip the prefix_sharing=False run")
  ap.add_argument("--profile", action="store_true", help="time the pieces of each implementation")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--family", default="llava15", choices=["llava15", "qwen25vl"],
                  help="qwen25vl: Qwen2.5-VL against transformers' (bench/qwen.py)")
  args = ap.parse_args()
  n_images = args.n_images or (4 if args.small else 8)
  if args.family == "qwen25vl":
    from bench import qwen

    args.images = n_images
    qwen.score_main(args)
    return

  from c3l_jax import scoring

  models, mm = common.setup(args)

  items, pixels = make_data(models, n_images, args.qa_per_image, args.seed)
  n_tok = sum(len(it.answer) for it in items)
  print(f"data: {n_images} images x {args.qa_per_image} QA = {len(items)} records, {n_tok} answer "
        f"tokens; prompt_image {min(len(i.prompt_image) for i in items)}-"
        f"{max(len(i.prompt_image) for i in items)} tokens, prompt_text "
        f"{min(len(i.prompt_text) for i in items)}-{max(len(i.prompt_text) for i in items)}, answer "
        f"{min(len(i.answer) for i in items)}-{max(len(i.answer) for i in items)}; batch_rows "
        f"{args.batch_rows}")

  mk = lambda share: scoring.Scorer(models.jax_model, models.mesh,
                                    scoring.ScoringConfig(batch_rows=args.batch_rows,
                                                          prefix_sharing=share),
                                    models.image_token_id, pad_id=PAD)
  scorers = {"ours": mk(True)}
  if not args.no_naive_jax:
    scorers["ours naive"] = mk(False)
  fns = {name: (lambda s=s: s.score(items, pixels)) for name, s in scorers.items()}
  fns["transformers"] = lambda: hf_score(models.hf, items, pixels, args.batch_rows)
  # torch has nothing to compile: its warmup is the first batch only.
  warm = {"transformers": lambda: hf_score(models.hf, items[:args.batch_rows], pixels, args.batch_rows)}
  timing, outputs = common.compare(fns, args.repeats, warmup_fns=warm)

  ref = outputs["transformers"]
  worst = 0.0
  for name in scorers:
    diff = {k: max(abs(o[k] - r[k]) for o, r in zip(outputs[name], ref))
            for k in ("i2c", "logp_image", "logp_text")}
    rel = max(abs(o[k] - r[k]) / max(1.0, abs(r[k])) for o, r in zip(outputs[name], ref)
              for k in ("logp_image", "logp_text"))
    print(f"agreement {name} vs transformers: max |d i2c| {diff['i2c']:.2e}, max |d logp_image| "
          f"{diff['logp_image']:.2e}, max |d logp_text| {diff['logp_text']:.2e} (rel {rel:.1e}); "
          f"i2c range [{min(r['i2c'] for r in ref):.3e}, {max(r['i2c'] for r in ref):.3e}]")
    worst = max(worst, diff["i2c"])
    if rel > 1e-4:
      sys.exit(f"ABORT: {name} log-probs disagree with transformers (relative {rel:.2e} > 1e-4)")
  if worst > 1e-3:
    sys.exit(f"ABORT: i2c disagrees with transformers (max abs diff {worst:.2e} > 1e-3)")

  a = models.arch
  flops = {name: ours_flops(a, s, items) for name, s in scorers.items()}
  flops["transformers"] = hf_flops(a, items, args.batch_rows)
  probe = {name: mm["torch" if name == "transformers" else "jax"] for name in fns}
  rate = {}
  for name, t in timing.items():
    best = t.best
    ex, un = flops[name]
    rate[name] = len(items) / best
    print(f"{name:13s} {t}")
    print(f"{'':13s} {len(items) / best:.2f} rec/s, {n_tok / best:.0f} answer tok/s; executed "
          f"{common.gflop(ex)} ({un / ex:.0%} of it unpadded work) -> {common.gflops(ex / best)} "
          f"= {ex / best / probe[name]:.0%} of {'torch' if name == 'transformers' else 'jax'} matmul")
  print(f"load average at the end {os.getloadavg()[0]:.2f}")
  if "ours naive" in rate:
    print(f"ours naive (prefix_sharing=False) vs transformers: "
          f"{rate['ours naive'] / rate['transformers']:.2f}x")
  ratio = rate["ours"] / rate["transformers"]
  print(f"work: transformers executes {flops['transformers'][0] / flops['ours'][0]:.2f}x the FLOPs "
        f"of ours (prefix sharing)")

  if args.profile:
    total, parts = profile_ours(models, scorers["ours"], items, pixels)
    print(f"profile ours (each piece blocked on; total {total:.3f}s):")
    for k, v in parts.items():
      print(f"  {k:42s} {v:7.3f}s")
    total, parts = profile_hf(models, items, pixels, args.batch_rows)
    print(f"profile transformers (total {total:.3f}s):")
    for k, v in parts.items():
      print(f"  {k:42s} {v:7.3f}s")

  ex = flops["ours"][0]
  print(f"score: ours {rate['ours']:.2f} rec/s, transformers {rate['transformers']:.2f} rec/s, "
        f"ratio {ratio:.2f}x (target >= 3x), ours FLOP/s = {ex / timing['ours'].best / mm['jax']:.0%} "
        f"of matmul")


if __name__ == "__main__":
  main()
