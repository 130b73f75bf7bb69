r"""Greedy generation throughput: c3l_jax's `sampling.generate` against transformers' `generate`.

One process, the same random LLaVA weights (transformers -> convert -> c3l_jax, fp32) and the same
batch: `--batch` prompts, each `[bos] + 4 text tokens + <image> x 256 + 10..25 question tokens` with
its own image, left-padded; greedy, exactly `--new_tokens` new tokens (no EOS stop on either side).

    transformers: hf.generate(input_ids, pixel_values=..., attention_mask=..., max_new_tokens=64,
                              do_sample=False, eos_token_id=None, min_new_tokens=64, pad_token_id=0)
    c3l_jax:      sampling.generate(model, *sampling.pad_prompts(prompts, bucket=64, pad_id=0), pixels,
                                    SamplingConfig(max_new_tokens=64))

Each side is warmed up once (JAX compiles there), then timed in interleaved rounds; best-of-rounds
is reported, as new tokens / s (batch x new tokens over the whole call, prefill included).
Achieved FLOP/s counts the FLOPs each implementation executes (padding and full-cache attention
included; see `bench/common.py`) over its best time, as a fraction of a plain fp32 matmul in the same
framework measured in the same run (once; see bench/score.py on load). torch uses `--threads`
(default 2) intra-op threads. transformers' generation_config keeps eos_token_id=2, so its
min_new_tokens processor may mask that token while c3l_jax (no eos_ids) does not; the argmax landing
on it is a ~1/vocab event, and a mismatch would show in the equality report. Token-for-token equality with transformers is reported per
row (random models can have near-ties in the argmax, so a mismatch is reported, not fatal).
Not a test: timings are printed, never asserted.

`--mix=pipeline`: the initial stage's length mix instead of one length. `--prompts` prompts (default
4 x batch) in order, each with a budget of new tokens drawn as the stage's outputs come: a quarter
captions (~30 tokens), half QA (~40: conversation, complex reasoning), a quarter detailed descriptions
(150-500); a random model never says EOS on cue, so each row ends at its budget on both sides.
transformers runs static batches of `--batch` rows (`generate` with a `StoppingCriteria` ending each
row at its budget: a batch ends with its longest row); c3l_jax runs `sampling.generate_many` with
`--batch` slots (a finished row's slot takes the next prompt), admitting prompts longest first by
their kind's expected length, as the initial stage does by instruction type ("ours"; the kind is known
before generating, the length is not), and in the given order ("ours in order"). Reported: useful tokens/s (the budgets'
sum over the time of the whole workload) and the fraction of decode slot-steps wasted on finished or
empty rows; every row's tokens are compared with transformers' up to its budget.

    python bench/generate.py              # batch 8 x 64 new tokens, the mid-size model
    python bench/generate.py --mix=pipeline   # the initial stage's length mix, batch 8
    python bench/generate.py --small      # smoke test
    python bench/generate.py --mix=pipeline --family=qwen25vl   # Qwen2.5-VL (bench/qwen.py)
    python bench/generate.py --profile    # also time prefill and decode of each implementation
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bench import common  # noqa: E402
from c3l_jax.data import batching  # noqa: E402

PAD = 0
BOS = 1
BUCKET = 64


def make_data(models: common.Models, batch: int, seed: int):
  """Prompts (token lists of slightly different lengths) and pixels `[B, 3, H, W]`."""
  a = models.arch
  rng = np.random.default_rng(seed)
  lo, hi = 3, models.image_token_id
  system = rng.integers(lo, hi, size=4).tolist()
  prompts = []
  for _ in range(batch):
    question = rng.integers(lo, hi, size=int(rng.integers(10, 26))).tolist()
    prompts.append([BOS] + system + [models.image_token_id] * a.image_tokens + question)
  pixels = rng.standard_normal((batch, 3, a.image_size, a.image_size)).astype(np.float32)
  return prompts, pixels


def left_pad(prompts):
  """Left-padded int64 ids and mask for torch (the project's padding helper, widened)."""
  ids, mask = batching.left_pad(prompts, max(len(p) for p in prompts), PAD)
  return ids.astype(np.int64), mask.astype(np.int64)


def hf_generate(hf, ids, mask, pixels, new_tokens):
  import torch

  with torch.no_grad():
    out = hf.generate(torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                      attention_mask=torch.from_numpy(mask), max_new_tokens=new_tokens,
                      do_sample=False, eos_token_id=None, min_new_tokens=new_tokens, pad_token_id=PAD)
  return out[:, ids.shape[1]:].numpy()


def hf_flops(a: common.Arch, prompts, new_tokens):
  """(executed, unpadded): prefill of the left-padded batch (LM head on the last position only,
  `logits_to_keep=1`), every CLIP layer, then `new_tokens - 1` one-token steps over a growing cache."""
  b, t = len(prompts), max(len(p) for p in prompts)
  ex = (common.vision_flops(a, b, all_layers=True) + common.decoder_flops(a, b, t, t)
        + common.head_flops(a, b))
  un = common.vision_flops(a, b, all_layers=True) + sum(
      common.decoder_flops(a, 1, len(p), len(p)) for p in prompts) + common.head_flops(a, b)
  for i in range(1, new_tokens):
    ex += common.decoder_flops(a, b, 1, t + i) + common.head_flops(a, b)
    un += sum(common.decoder_flops(a, 1, 1, len(p) + i) for p in prompts) + common.head_flops(a, b)
  return ex, un


def ours_flops(a: common.Arch, prompts, tokens_shape, new_tokens):
  """(executed, unpadded) of `sampling._generate`: prefill of the bucketed batch against all
  T + N cache slots, vision up to the feature layer, then N loop steps each attending to all slots
  (the last step's logits are not used)."""
  b, t = tokens_shape
  slots = t + new_tokens
  ex = (common.vision_flops(a, b, all_layers=False) + common.decoder_flops(a, b, t, slots)
        + common.head_flops(a, b))
  ex += new_tokens * (common.decoder_flops(a, b, 1, slots) + common.head_flops(a, b))
  un = common.vision_flops(a, b, all_layers=False) + sum(
      common.decoder_flops(a, 1, len(p), len(p)) for p in prompts) + common.head_flops(a, b)
  for i in range(1, new_tokens):
    un += sum(common.decoder_flops(a, 1, 1, len(p) + i) for p in prompts) + common.head_flops(a, b)
  return ex, un


def profile(models, tokens, mask, pixels, ids, hmask, new_tokens):
  """Prefill-only times (1 new token) vs the full call, on each side."""
  from c3l_jax import sampling

  out = {}
  cfg1 = sampling.SamplingConfig(max_new_tokens=1)
  sampling.generate(models.jax_model, tokens, mask, pixels, cfg1)  # compile
  pre = min(common.time_once(lambda: sampling.generate(models.jax_model, tokens, mask, pixels, cfg1))[0]
            for _ in range(2))
  cfg = sampling.SamplingConfig(max_new_tokens=new_tokens)
  full = min(common.time_once(lambda: sampling.generate(models.jax_model, tokens, mask, pixels, cfg))[0]
             for _ in range(2))
  out["ours"] = (pre, full)
  hf_generate(models.hf, ids, hmask, pixels, 1)
  pre = min(common.time_once(lambda: hf_generate(models.hf, ids, hmask, pixels, 1))[0]
            for _ in range(2))
  full = min(common.time_once(lambda: hf_generate(models.hf, ids, hmask, pixels, new_tokens))[0]
             for _ in range(2))
  out["transformers"] = (pre, full)
  return out


# The initial stage's output lengths: (share, low, high) of new tokens per kind.
PIPELINE_MIX = {"caption": (0.25, 24, 36), "qa": (0.5, 32, 48), "detailed": (0.25, 150, 500)}


# What the initial stage knows before generating: the kind of each prompt (its instruction type), and
# so a rough expected length (`instructions.EXPECTED_LENGTH`), never the length itself.
EXPECTED = {"caption": 30, "qa": 40, "detailed": 300}


def pipeline_budgets(count: int, seed: int) -> tuple[list[str], list[int]]:
  """Each prompt's kind and its budget of new tokens."""
  rng = np.random.default_rng([seed, 1])
  kinds = list(PIPELINE_MIX)
  drawn = rng.choice(len(kinds), size=count, p=[PIPELINE_MIX[k][0] for k in kinds])
  return ([kinds[k] for k in drawn],
          [int(rng.integers(PIPELINE_MIX[kinds[k]][1], PIPELINE_MIX[kinds[k]][2] + 1)) for k in drawn])


def hf_generate_budgets(hf, prompts, pixels, budgets, batch):
  """Static batches of `batch` rows, each row stopped at its own budget; `[M, max budget]` tokens."""
  import torch
  from transformers import StoppingCriteria, StoppingCriteriaList

  class Budget(StoppingCriteria):
    def __init__(self, start, limits):
      self.start, self.limits = start, torch.as_tensor(limits)

    def __call__(self, input_ids, scores, **kwargs):
      return (input_ids.shape[1] - self.start) >= self.limits

  width = max(budgets)
  out = np.zeros((len(prompts), width), np.int64)
  for lo in range(0, len(prompts), batch):
    rows = list(range(lo, min(lo + batch, len(prompts))))
    ids, mask = left_pad([prompts[i] for i in rows])
    lim = [budgets[i] for i in rows]
    with torch.no_grad():
      got = hf.generate(torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels[rows]),
                        attention_mask=torch.from_numpy(mask), max_new_tokens=max(lim),
                        do_sample=False, eos_token_id=None, pad_token_id=PAD,
                        stopping_criteria=StoppingCriteriaList([Budget(ids.shape[1], lim)]))
    got = got[:, ids.shape[1]:].numpy()
    out[rows, :got.shape[1]] = got
  return out


def static_waste(budgets, batch) -> float:
  """Slot-steps of static batches spent on rows past their budget."""
  total = sum(len(budgets[i:i + batch]) * max(budgets[i:i + batch]) for i in range(0, len(budgets), batch))
  return 1 - sum(budgets) / total


def main_mix(args, models):
  from c3l_jax import sampling

  count = args.prompts or 4 * args.batch
  prompts, pixels = make_data(models, count, args.seed)
  kinds, budgets = pipeline_budgets(count, args.seed)
  if args.small:
    budgets = [max(2, b // 8) for b in budgets]
  n = max(budgets)
  print(f"data: {count} prompts (lengths {min(map(len, prompts))}..{max(map(len, prompts))}), "
        f"budgets of new tokens {sorted(budgets)} (sum {sum(budgets)}); batch / slots {args.batch}; "
        f"greedy")
  cfg = sampling.SamplingConfig(max_new_tokens=n, pad_id=PAD)
  occupancy = {}

  def ours(name, order=None):
    def run():
      out, _, occupancy[name] = sampling.generate_many(models.jax_model, prompts, pixels, cfg,
                                                       slots=args.batch, bucket=BUCKET, limits=budgets,
                                                       order=order)
      return out
    return run

  # As the initial stage runs it: the kinds' expected lengths order the admission (long ones first).
  fns = {"ours": ours("ours", sampling.longest_first([EXPECTED[k] for k in kinds])),
         "ours in order": ours("ours in order"),
         "transformers": lambda: hf_generate_budgets(models.hf, prompts, pixels, budgets, args.batch)}
  # transformers compiles nothing: its warmup is one short batch (ours' warmup compiles every shape).
  warm = {"transformers": lambda: hf_generate_budgets(models.hf, prompts[:args.batch],
                                                      pixels[:args.batch], [2] * args.batch,
                                                      args.batch)}
  timing, outputs = common.compare(fns, args.repeats, warmup_fns=warm)
  same = [bool(np.array_equal(outputs["ours"][i, :b], outputs["transformers"][i, :b]))
          for i, b in enumerate(budgets)]
  print(f"token-for-token: {sum(same)}/{count} rows identical to transformers up to their budgets")
  if not np.array_equal(outputs["ours"], outputs["ours in order"]):
    raise SystemExit("the admission order changed an output")
  waste = {name: occupancy[name].wasted for name in ("ours", "ours in order")}
  waste["transformers"] = static_waste(budgets, args.batch)
  rate = {}
  for name, t in timing.items():
    rate[name] = sum(budgets) / t.best
    print(f"{name:13s} {t}")
    print(f"{'':13s} {rate[name]:.1f} useful tok/s; {waste[name]:.0%} of decode slot-steps wasted")
  for name in ("ours", "ours in order"):
    occ = occupancy[name]
    print(f"{name}: {occ.decode_steps} decode steps x {occ.slots} slots, {occ.prefills} prefill calls")
  print(f"load average at the end {os.getloadavg()[0]:.2f}")
  print(f"generate --mix=pipeline: ours {rate['ours']:.1f} useful tok/s ({waste['ours']:.0%} slot-steps "
        f"wasted), transformers {rate['transformers']:.1f} ({waste['transformers']:.0%} wasted), ratio "
        f"{rate['ours'] / rate['transformers']:.2f}x (target >= 2x)")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="tiny model (smoke test)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5, help="timed rounds (best is reported)")
  ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch default)")
  ap.add_argument("--image_token", type=int, default=None, help="image token id (default vocab - 1)")
  ap.add_argument("--check_rows", type=int, default=None, help="rows compared token for token "
                  "(default: all)")
  ap.add_argument("--profile", action="store_true", help="time prefill alone on each side")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--mix", choices=("fixed", "pipeline"), default="fixed",
                  help="fixed: every row --new_tokens; pipeline: the initial stage's length mix")
  ap.add_argument("--family", default="llava15", choices=["llava15", "qwen25vl"],
                  help="qwen25vl (with --mix=pipeline): Qwen2.5-VL against transformers' (bench/qwen.py)")
  ap.add_argument("--prompts", type=int, default=None, help="prompts for --mix=pipeline (default "
                  "4 x batch)")
  args = ap.parse_args()

  from c3l_jax import sampling

  if args.family == "qwen25vl":
    if args.mix != "pipeline":
      raise SystemExit("--family=qwen25vl runs with --mix=pipeline")
    from bench import qwen

    return qwen.generate_mix_main(args)
  models, mm = common.setup(args)
  if args.mix == "pipeline":
    return main_mix(args, models)

  prompts, pixels = make_data(models, args.batch, args.seed)
  tokens, mask = sampling.pad_prompts(prompts, bucket=BUCKET, pad_id=PAD)
  ids, hmask = left_pad(prompts)
  n = args.new_tokens
  print(f"data: batch {args.batch}, prompt lengths {sorted(len(p) for p in prompts)}; transformers "
        f"pads to {ids.shape[1]}, ours to {tokens.shape[1]} (bucket {BUCKET}); {n} new tokens, greedy")
  print(f"transformers generation_config.eos_token_id = {models.hf.generation_config.eos_token_id}")

  cfg = sampling.SamplingConfig(max_new_tokens=n, pad_id=PAD)  # no eos_ids: all n are generated
  fns = {
      "ours": lambda: sampling.generate(models.jax_model, tokens, mask, pixels, cfg)[0],
      "transformers": lambda: hf_generate(models.hf, ids, hmask, pixels, n),
  }
  timing, outputs = common.compare(fns, args.repeats)

  ours, ref = np.asarray(outputs["ours"]), outputs["transformers"]
  rows = args.check_rows or args.batch
  same = [bool(np.array_equal(ours[i], ref[i])) for i in range(rows)]
  first = [int(np.argmax(ours[i] != ref[i])) if not s else n for i, s in enumerate(same)]
  print(f"token-for-token: {sum(same)}/{rows} rows identical to transformers over {n} tokens; "
        f"first differing step per row: {first}")

  a = models.arch
  flops = {"ours": ours_flops(a, prompts, tokens.shape, n), "transformers": hf_flops(a, prompts, n)}
  rate = {}
  for name, t in timing.items():
    ex, un = flops[name]
    probe = mm["torch" if name == "transformers" else "jax"]
    rate[name] = args.batch * n / t.best
    print(f"{name:13s} {t}")
    print(f"{'':13s} {rate[name]:.1f} new tok/s; executed {common.gflop(ex)} ({un / ex:.0%} of it "
          f"unpadded work) -> {common.gflops(ex / t.best)} = {ex / t.best / probe:.0%} of "
          f"{'torch' if name == 'transformers' else 'jax'} matmul")
  print(f"load average at the end {os.getloadavg()[0]:.2f}")

  if args.profile:
    for name, (pre, full) in profile(models, tokens, mask, pixels, ids, hmask, n).items():
      print(f"profile {name:13s}: prefill + 1 token {pre:.3f}s, full call {full:.3f}s -> "
            f"decode {full - pre:.3f}s for {n - 1} steps ({(full - pre) / (n - 1) * 1e3:.1f} ms/step)")

  ratio = rate["ours"] / rate["transformers"]
  ex = flops["ours"][0]
  print(f"generate: ours {rate['ours']:.1f} new tok/s, transformers {rate['transformers']:.1f} new "
        f"tok/s, ratio {ratio:.2f}x (target >= 2x), ours FLOP/s = "
        f"{ex / timing['ours'].best / mm['jax']:.0%} of matmul")


if __name__ == "__main__":
  main()
