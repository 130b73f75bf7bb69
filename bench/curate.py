r"""Curation throughput: per-turn S(I2C) of multi-turn conversations, c3l_jax against transformers.

One process, the same random LLaVA weights (transformers -> convert -> c3l_jax, fp32; `bench/common.py`)
and the same conversations: N conversations, each with its own image and T question / answer turns of
random token ids, laid out as the curate stage lays them out (`c3l_jax/pipeline/curate.py`): turn k's
prompt is everything before its answer,

    with image = [bos] + 4 system tokens + <image> x 256 + q_0 + a_0 + sep + q_1 + ... + q_k
    text only  = the same without the image tokens;        answer = a_k (~24 tokens)

transformers (the reference, the natural way to follow that definition): for every turn, one
with-image and one text-only teacher-forced forward, batched `--batch_rows` turns at a time in order,
under `torch.no_grad()`, per-token answer log-probs from the logits, eq. 1 per turn.
c3l_jax: `scoring.Scorer` as the curate stage uses it: each conversation one teacher-forced sequence
with a part per answer (`curate.one_sequence`: the turns' tokens are prefixes of each other, as the
real chat templates give them), the image prefix's KV cache once per conversation, the LM head on
answer tokens only; and, for context, "ours per turn": every turn its own suffix against the shared
prefix (what the stage falls back to where tokenization differs at a seam).

Warm-up once each (JAX compiles there), then interleaved timed rounds; best-of-rounds is reported with
the load average (see bench/score.py on a shared machine). The run aborts when a turn's S(I2C) differs
from transformers' by more than 1e-3 or a log-prob sum by more than 1e-4 (relative). Not a test:
timings are printed, never asserted.

    python bench/curate.py             # 8 conversations x 5 turns, the mid-size model
    python bench/curate.py --small     # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bench import common  # noqa: E402
from bench.score import BOS, PAD, hf_score  # noqa: E402


def make_conversations(models: common.Models, n: int, turns: int, seed: int):
  """Per-turn items (`scoring.ScoreInput`, conversation-major), pixels `{key: [3, H, W]}`, and the
  same conversations as one item each (`curate.one_sequence`)."""
  from c3l_jax.pipeline import curate

  from c3l_jax import scoring

  a = models.arch
  rng = np.random.default_rng(seed)
  lo, hi = 3, models.image_token_id
  system = rng.integers(lo, hi, size=4).tolist()
  sep = rng.integers(lo, hi, size=3).tolist()  # like " USER: " between turns
  items, pixels = [], {}
  for c in range(n):
    key = f"conv{c}"
    pixels[key] = rng.standard_normal((3, a.image_size, a.image_size)).astype(np.float32)
    history: list[int] = []
    for k in range(turns):
      question = rng.integers(lo, hi, size=int(rng.integers(10, 16))).tolist()
      answer = rng.integers(lo, hi, size=int(rng.integers(20, 29))).tolist()
      history = history + (sep if k else []) + question
      items.append(scoring.ScoreInput(
          key, [BOS] + system + [models.image_token_id] * a.image_tokens + history,
          [BOS] + system + history, answer))
      history = history + answer
  whole = [curate.one_sequence(f"conv{c}", items[c * turns:(c + 1) * turns]) for c in range(n)]
  assert all(w is not None for w in whole)
  return items, pixels, whole


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="tiny model and data (smoke test)")
  ap.add_argument("--conversations", type=int, default=None, help="default 8; 4 with --small")
  ap.add_argument("--turns", type=int, default=5, help="gpt turns per conversation")
  ap.add_argument("--batch_rows", type=int, default=8, help="turns per batch (both sides)")
  ap.add_argument("--repeats", type=int, default=3, help="timed rounds (best is reported)")
  ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch default)")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  n = args.conversations or (4 if args.small else 8)

  from c3l_jax import scoring

  models, _ = common.setup(args)
  items, pixels, whole = make_conversations(models, n, args.turns, args.seed)
  n_tok = sum(len(it.answer) for it in items)
  print(f"data: {n} conversations x {args.turns} turns = {len(items)} turns, {n_tok} answer tokens; "
        f"prompt_image {min(len(i.prompt_image) for i in items)}-{max(len(i.prompt_image) for i in items)}"
        f" tokens; batch_rows {args.batch_rows}")
  scorer = scoring.Scorer(models.jax_model, models.mesh, scoring.ScoringConfig(batch_rows=args.batch_rows),
                          models.image_token_id, pad_id=PAD)
  flat = lambda out: [{k: o[k][t] for k in o} for o in out for t in range(len(o["i2c"]))]
  fns = {"ours": lambda: flat(scorer.score(whole, pixels)),
         "ours per turn": lambda: scorer.score(items, pixels),
         "transformers": lambda: hf_score(models.hf, items, pixels, args.batch_rows)}
  warm = {"transformers": lambda: hf_score(models.hf, items[:args.batch_rows], pixels, args.batch_rows)}
  timing, outputs = common.compare(fns, args.repeats, warmup_fns=warm)
  ref = outputs["transformers"]
  for name in ("ours", "ours per turn"):
    d_i2c = max(abs(o["i2c"] - r["i2c"]) for o, r in zip(outputs[name], ref))
    rel = max(abs(o[k] - r[k]) / max(1.0, abs(r[k])) for o, r in zip(outputs[name], ref)
              for k in ("logp_image", "logp_text"))
    print(f"agreement per turn, {name}: max |d i2c| {d_i2c:.2e}, max relative |d logp| {rel:.1e}")
    if d_i2c > 1e-3 or rel > 1e-4:
      sys.exit(f"ABORT: {name} disagrees with transformers")
  rate = {name: n / t.best for name, t in timing.items()}
  for name, t in timing.items():
    print(f"{name:13s} {t}; {rate[name]:.2f} conversations/s, {n_tok / t.best:.0f} answer tok/s")
  print(f"load average at the end {os.getloadavg()[0]:.2f}")
  print(f"ours per turn vs transformers: {rate['ours per turn'] / rate['transformers']:.2f}x")
  print(f"curate: ours {rate['ours']:.2f} conv/s, transformers {rate['transformers']:.2f} conv/s, ratio "
        f"{rate['ours'] / rate['transformers']:.2f}x (target >= 3x)")


if __name__ == "__main__":
  main()
