r"""`bench/gpu.py`'s `check` figure: c3l_jax's accelerator paths compared with transformers, not only timed.

Both frameworks run ONE set of weights on the same device, each in its own process (a 7B model in bf16
is ~14 GB a side; the two never share a memory pool), and exchange results through JSON files in a
work directory:

1. torch (first): builds transformers' `LlavaForConditionalGeneration` of the chosen size with a fixed
   seed, on the device, in its natural dtype (bf16 on a GPU, fp32 on CPU), sharpens it (below),
   `save_pretrained`s it (safetensors) and computes the reference: greedy generation of `new_tokens`
   tokens for `images x qa` prompts (bos + 4 system tokens + the image tokens + a random question),
   keeping each step's top-`TOPK` logits, then per-token answer log-probs of the with-image and the
   text-only prompt, teacher-forced, where each prompt's answer is its own greedy continuation.
2. ours: converts that directory with the project's converter (`c3l_jax.convert.convert`), loads it
   once and, for every attention implementation the platform has (`implementations`: `xla` always,
   `cudnn` on an NVIDIA GPU in bf16 / fp16, `splash` on a TPU), runs `scoring.Scorer` on the same
   QA (S(I2C), both log-prob sums) and `sampling.generate` on the same prompts.
3. the parent (`compare`) prints one JSON line per implementation, pass or fail against the
   tolerances below, and one per implementation the platform lacks (`skipped`, with the reason).

Why the model is sharpened. transformers initialises every weight N(0, 0.02^2) and the final RMSNorm's
weight to 1, so the normed hidden state has norm sqrt(d) and each logit is N(0, (0.02 sqrt(d))^2):
std 1.3 at d = 4096 over 32,064 tokens, nearly uniform (the top token has p ~ 0.005). S(I2C), a sum of
p_v log(p_v / p_d), is then ~0 whatever an implementation computes, and greedy decoding picks among
near-ties. `sharpen` rescales the LM head so the logits have std SIGMA = 2 sqrt(2 ln V) (9.1 nats
for V = 32,064; 7.4 for the small model's 1,000), twice the expected z-score of the largest of V
Gaussians: the top logit then stands out of the bulk and dominates the log-sum-exp, and the expected
gap between the top two, ~SIGMA / sqrt(2 ln V) = 2 nats, gives the top token p ~ 0.6-0.9. The answers
scored are the reference's own greedy continuations, so p_v is large where it matters, as for the
generated answers C3L scores (the small model's S(I2C) is ~1 per 8-token answer). The image token's
LM-head row is zeroed (logit 0, far below the top), so no continuation contains an `<image>`
placeholder. What sharpening cannot do: bf16's rounding error in a logit is relative to the logits'
size, so it grows with SIGMA as the gaps do; a bf16 logit near 40 is even stored in steps of 0.25, and
two top logits closer than that tie exactly. A greedy step meets such a near-tie with probability
~ noise / mean gap, so a bf16 run may leave the reference at one; hence the divergence rule below
rather than "every token equal".

Tolerances. DELTA (`logprob_tolerance`) bounds the difference between the two frameworks' values of
one logit, in nats:
- fp32 (CPU): 1e-4, the project's fp32 parity tolerance on logits (tests/test_llava_parity.py).
  fp32 on an accelerator (`--check_dtype=float32`) is not that: a GPU multiplies fp32 in TF32 (11
  significant bits; the formula below with 2^-11) and a TPU in one bf16 pass (bf16's bound).
- bf16: one rounding to bf16 (8 significant bits) has relative error uniform within +-2^-8, std
  2^-8 / sqrt 3. A token's hidden state is rounded at each residual add (2 per decoder layer), at the
  embedding and the final norm, and the logit once more at its own size, up to sqrt(2 ln V) SIGMA;
  counted at the logits' scale SIGMA that is R = 2L + 2 + 2 ln V roundings, adding up as a random walk
  (relative std 2^-8 sqrt(R / 3)). The frameworks round independently (x sqrt 2) and DELTA is 4
  standard deviations: DELTA = 4 sqrt(2) 2^-8 sqrt(R / 3) SIGMA = 1.08 nats for the 7B shapes (L =
  32), 0.42 for the small model (L = 2). On CPU in bf16 (`--check_dtype=bfloat16`) the small model's
  largest error is 0.14 of its tolerance: the model errs on the safe side there.
A log-prob moves less than a logit: d log p_y = d l_y - sum_j p_j d l_j, whose std over one logit's
(iid logit errors: a hidden-state error projected on random LM-head rows) is
k = sqrt(1 - 2 p_y + sum_j p_j^2), ~0 for a confident token. The reference records k for every answer
token, and token t's log-prob may differ by DELTA k_t + 1e-6 (1 + |log p_t|) (float32's resolution).
These add in quadrature: the sums of log-probs over an answer get the root sum of squares, and S(I2C)
= sum_t p_t (lv_t - ld_t) its first-order propagation, dS = sum_t p_t (1 + lv_t - ld_t) dlv_t - p_t
dld_t. A broken kernel (a wrong mask, a transposed layout) errs by ~SIGMA per token, far outside.
Generation passes when each row equals the reference token for token, or when at its first divergence
the reference's top-`TOPK` logits show ours' token within sqrt(2) DELTA (the difference of two
logits' errors) of the reference's top token: a near-tie rounding can flip. After it the two continue
from different prefixes and are not compared. In fp32 (DELTA 1e-4 against gaps of ~2 nats) this is
token for token. Reported: the fraction of tokens before each row's first divergence and the fraction
equal overall.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

PAD = 0
TOPK = 8  # reference logits kept per generation step (to judge a divergence)
U_BF16 = 2.0 ** -8  # bf16 unit roundoff (8 significant bits)
U_TF32 = 2.0 ** -11  # TF32's (11 significant bits): fp32 matmuls on a GPU by default
FP32_LOGPROB_TOL = 1e-4
FLOOR = 1e-6  # float32 resolution of a log-prob, relative to 1 + |log p|
SIGMAS = 4.0  # tolerance = this many standard deviations of the predicted bf16 difference
TORCH_FILE, OURS_FILE, HF_DIR, OURS_DIR = "torch_check.json", "ours_check.json", "hf", "ours"


def logit_sigma(vocab: int) -> float:
  """The logits' std after `sharpen`: twice the expected z-score of the largest of `vocab` Gaussians."""
  return 2.0 * math.sqrt(2.0 * math.log(vocab))


def logprob_tolerance(arith: str, layers: int, vocab: int) -> float:
  """DELTA (nats), the bound on one logit's difference between the frameworks, when the coarser side
  computes in `arith` (`arithmetic`): float32 (CPU), tf32 or bfloat16."""
  if arith == "float32":
    return FP32_LOGPROB_TOL
  unit = {"bfloat16": U_BF16, "tf32": U_TF32}[arith]
  roundings = 2 * layers + 2 + 2.0 * math.log(vocab)  # the residual stream's, then the logit's own
  return SIGMAS * math.sqrt(2.0) * unit * math.sqrt(roundings / 3.0) * logit_sigma(vocab)


def implementations(platform: str, dtype: str) -> tuple[list[str], dict[str, str]]:
  """The attention implementations to check on `platform` (jax's backend) in `dtype`, and the
  others with the reason each is skipped."""
  run, skipped = ["xla"], {}
  fused = dtype in ("bfloat16", "float16")
  if platform not in ("gpu", "cuda"):
    skipped["cudnn"] = f"cuDNN attention needs an NVIDIA GPU (JAX platform: {platform})"
  elif not fused:
    skipped["cudnn"] = f"cuDNN attention takes bf16 / fp16 only (check dtype: {dtype})"
  else:
    run.append("cudnn")
  if platform != "tpu":
    skipped["splash"] = f"splash attention is a TPU kernel (JAX platform: {platform})"
  else:
    run.append("splash")
  return run, skipped


def check_data(cfg, spec: dict, seed: int):
  """`(items, pixels)` as bench/score.py makes them for transformers' config `cfg` (answers replaced
  later by the reference's greedy continuations); prompts share bos + system + image tokens per image."""
  import types

  from bench import common
  from bench import score as bscore

  models = types.SimpleNamespace(arch=common.arch_of(cfg), image_token_id=cfg.image_token_index)
  return bscore.make_data(models, spec["images"], spec["qa"], seed)


def sharpen(hf) -> float:
  """Rescale transformers' LM head so the logits have std `logit_sigma(V)`; zero the image token's row.

  With the final RMSNorm's weight at its initial 1, the normed hidden state has norm sqrt(d), so a
  logit's std is std(W_head) sqrt(d)."""
  import torch

  head = hf.lm_head.weight
  vocab, d = head.shape
  sigma = logit_sigma(vocab)
  with torch.no_grad():
    std = float(head.float().std())
    head.mul_(sigma / (std * math.sqrt(d)))
    head[hf.config.image_token_index] = 0
  return sigma


def fresh(work: str, *names: str) -> None:
  """Remove what an earlier run left under `work` (a kept `--check_dir`) before this side writes."""
  import shutil

  for name in names:
    path = os.path.join(work, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)


def _dump(path: str, obj: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f)
  os.replace(path + ".tmp", path)


def load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- torch (the reference)


def torch_reference(cfg, spec: dict, work: str, seed: int, dtype: str | None = None) -> dict:
  """Build transformers' LLaVA of config `cfg`, sharpen and save it under `work/hf`; write the
  reference to `work/TORCH_FILE`. `dtype`: torch's compute dtype (None: bf16 on a GPU, else fp32)."""
  import torch
  from transformers import LlavaForConditionalGeneration

  from bench import generate as bgen
  from bench import score as bscore

  fresh(work, HF_DIR, TORCH_FILE)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
  tdtype = getattr(torch, dtype)
  torch.manual_seed(seed)
  with torch.device(device):
    hf = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=tdtype)
  sigma = sharpen(hf)
  hf.save_pretrained(os.path.join(work, HF_DIR))
  if not os.path.isfile(os.path.join(work, HF_DIR, "config.json")):  # it logs, and returns
    raise RuntimeError(f"save_pretrained wrote nothing to {os.path.join(work, HF_DIR)}")
  hf.eval()

  items, pixels = check_data(cfg, spec, seed)
  prompts = [list(it.prompt_image) for it in items]
  ids, mask = bgen.left_pad(prompts)
  pix = np.stack([pixels[it.image_key] for it in items])
  put = lambda x: torch.from_numpy(x).to(device)
  n = spec["new_tokens"]
  with torch.no_grad():
    out = hf.generate(put(ids), pixel_values=put(pix).to(tdtype), attention_mask=put(mask),
                      max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, ids.shape[1]:].cpu().numpy()
    logits = torch.stack(out.logits, 1).float()  # [B, N, V]
    top = logits.topk(TOPK, dim=-1)
    top_ids, top_logits = top.indices.cpu().numpy(), top.values.cpu().numpy()
    del out, logits

    def per_token(prompt_rows, answers, pix_rows=None):
      seqs = [list(p) + list(a) for p, a in zip(prompt_rows, answers)]
      rid, rmask = bscore._right_pad(seqs)
      kw = {} if pix_rows is None else {"pixel_values": put(pix_rows).to(tdtype)}
      lg = hf(input_ids=put(rid), attention_mask=put(rmask), **kw).logits
      logp, sens = [], []
      for i, (p, a) in enumerate(zip(prompt_rows, answers)):
        rows = torch.log_softmax(lg[i, len(p) - 1:len(p) - 1 + len(a)].float(), dim=-1)
        y = rows[torch.arange(len(a)), torch.as_tensor(a, device=device)]
        probs = rows.double().exp()
        # d log p_y = d l_y - sum_j p_j d l_j: with iid logit errors, its std over theirs.
        k = (1 - 2 * y.double().exp() + (probs ** 2).sum(-1)).clamp(min=0).sqrt()
        logp.append(y.double().cpu().numpy().tolist())
        sens.append(k.cpu().numpy().tolist())
      return logp, sens

    answers = tokens.tolist()
    lv, kv = per_token(prompts, answers, pix)
    ld, kd = per_token([list(it.prompt_text) for it in items], answers)
  ref = dict(device=str(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"),
             dtype=dtype, sigma=sigma, gen_tokens=answers, top_ids=top_ids.tolist(),
             top_logits=top_logits.tolist(), logp_image_tokens=lv, logp_text_tokens=ld,
             sensitivity_image_tokens=kv, sensitivity_text_tokens=kd)
  _dump(os.path.join(work, TORCH_FILE), ref)
  hf = None
  gc_collect(device)
  return ref


def gc_collect(device) -> None:
  import gc

  gc.collect()
  if getattr(device, "type", None) == "cuda":
    import torch

    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- ours


def ours_results(cfg, spec: dict, work: str, seed: int, dtype: str | None = None,
                 score_rows: int = 40) -> dict:
  """Convert `work/hf`, load it once and score / generate (`cfg`: transformers' config, for the
  data) with every attention implementation the platform has; write `work/OURS_FILE`. `dtype`:
  compute and parameter dtype (None: bf16 on an accelerator, else fp32)."""
  import jax
  from flax import nnx

  from bench import generate as bgen
  from c3l_jax import sampling, scoring, sharding
  from c3l_jax.convert import convert
  from c3l_jax.models import attention as A
  from c3l_jax.models import configs

  fresh(work, OURS_DIR, OURS_FILE)
  platform = jax.default_backend()
  dtype = dtype or ("float32" if platform == "cpu" else "bfloat16")
  ref = load(os.path.join(work, TORCH_FILE))
  model_dir = os.path.join(work, OURS_DIR)
  convert(os.path.join(work, HF_DIR), model_dir)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  base = sharding.load_model(model_dir, mesh, dtype=dtype, param_dtype=dtype, attention="xla")
  _, state = nnx.split(base)

  items, pixels = check_data(cfg, spec, seed)
  for it, answer in zip(items, ref["gen_tokens"]):
    it.answer = list(answer)
  prompts = [list(it.prompt_image) for it in items]
  tokens, mask = sampling.pad_prompts(prompts, bgen.BUCKET, PAD)
  pix = np.stack([pixels[it.image_key] for it in items])
  sample = sampling.SamplingConfig(max_new_tokens=spec["new_tokens"], pad_id=PAD)

  run, skipped = implementations(platform, dtype)
  results = {}
  for impl in run:
    try:
      # The implementation is a static attribute of the graph: one set of arrays serves every one.
      graphdef, _ = sharding.abstract_model(configs.with_runtime(base.cfg, attention=impl))
      model = nnx.merge(graphdef, state)
      scorer = scoring.Scorer(model, mesh, scoring.ScoringConfig(batch_rows=score_rows),
                               model.cfg.image_token_id, PAD)
      scored = scorer.score(items, pixels)
      gen, _ = sampling.generate(model, tokens, mask, pix, sample)
      results[impl] = dict(i2c=[r["i2c"] for r in scored], logp_image=[r["logp_image"] for r in scored],
                           logp_text=[r["logp_text"] for r in scored], gen_tokens=gen.tolist(),
                           auto=A.resolve("auto", dtype, platform) == impl)
    except Exception as e:  # noqa: BLE001 - a failing kernel is a check result, not a crash
      results[impl] = dict(error=f"{type(e).__name__}: {e}"[:500])
  out = dict(device=jax.devices()[0].device_kind, platform=platform, dtype=dtype, results=results,
             skipped=skipped)
  _dump(os.path.join(work, OURS_FILE), out)
  base = state = model = scorer = None  # the device memory goes back before the timed figures
  gc_collect(None)
  return out


# ----------------------------------------------------------------------------- comparison


def compare_scores(ref: dict, ours: dict, delta: float) -> dict:
  """S(I2C) and log-prob sums of ours against the reference's per-token log-probs (module docstring):
  token t's log-prob may differ by `delta k_t + FLOOR (1 + |log p_t|)`, errors add in quadrature."""
  f64 = lambda key: [np.asarray(x, np.float64) for x in ref[key]]
  lv, ld = f64("logp_image_tokens"), f64("logp_text_tokens")
  kv, kd = f64("sensitivity_image_tokens"), f64("sensitivity_text_tokens")
  tol = lambda k, lp: delta * k + FLOOR * (1 + np.abs(lp))  # one token's log-prob
  want_i2c = np.array([np.sum(np.exp(v) * (v - d)) for v, d in zip(lv, ld)])
  want_v, want_d = np.array([v.sum() for v in lv]), np.array([d.sum() for d in ld])
  tol_v = np.array([np.sqrt(np.sum(tol(k, v) ** 2)) for k, v in zip(kv, lv)])
  tol_d = np.array([np.sqrt(np.sum(tol(k, d) ** 2)) for k, d in zip(kd, ld)])
  # dS = sum_t p_t (1 + lv_t - ld_t) dlv_t - p_t dld_t
  tol_i2c = np.array([np.sqrt(np.sum(np.exp(v) ** 2 * ((1 + v - d) ** 2 * tol(a, v) ** 2
                                                        + tol(b, d) ** 2)))
                      for v, d, a, b in zip(lv, ld, kv, kd)])
  got_i2c = np.asarray(ours["i2c"], np.float64)
  err_i2c = np.abs(got_i2c - want_i2c)
  err_v = np.abs(np.asarray(ours["logp_image"], np.float64) - want_v)
  err_d = np.abs(np.asarray(ours["logp_text"], np.float64) - want_d)
  failures = []
  for name, err, t in (("i2c", err_i2c, tol_i2c), ("logp_image", err_v, tol_v),
                       ("logp_text", err_d, tol_d)):
    for q in np.flatnonzero(~(err <= t)):  # NaN fails too
      failures.append(f"qa {q}: {name} differs by {err[q]:.3g} > {t[q]:.3g}")
  worst = max(float(np.max(e / t)) for e, t in ((err_i2c, tol_i2c), (err_v, tol_v), (err_d, tol_d)))
  return dict(qa=len(lv), i2c_ref_mean=float(want_i2c.mean()), i2c_max_abs_diff=float(err_i2c.max()),
              i2c_max_rel_diff=float(np.max(err_i2c / np.maximum(np.abs(want_i2c), 1e-12))),
              logp_max_abs_diff=float(max(err_v.max(), err_d.max())),
              i2c_tolerance_max=float(tol_i2c.max()), worst_error_over_tolerance=worst,
              score_failures=failures)


def compare_generation(ref: dict, ours_tokens, delta: float) -> dict:
  """Token agreement; a row's first divergence must be a reference near-tie (within `delta`)."""
  want = np.asarray(ref["gen_tokens"])
  got = np.asarray(ours_tokens)
  top_ids, top_logits = np.asarray(ref["top_ids"]), np.asarray(ref["top_logits"])
  if got.shape != want.shape:
    return dict(rows=int(want.shape[0]), new_tokens=int(want.shape[1]),
                generation_failures=[f"ours generated {list(got.shape)}, reference {list(want.shape)}"])
  rows, n = want.shape
  agree, failures, divergences = 0, [], 0
  for b in range(rows):
    diff = np.flatnonzero(got[b] != want[b])
    first = int(diff[0]) if len(diff) else n
    agree += first
    if first == n:
      continue
    divergences += 1
    hit = np.flatnonzero(top_ids[b, first] == got[b, first])
    margin = float(top_logits[b, first, 0] - top_logits[b, first, hit[0]]) if len(hit) else math.inf
    if not margin <= math.sqrt(2) * delta:  # a difference of two logits' errors
      failures.append(f"row {b} step {first}: ours {int(got[b, first])}, reference "
                      f"{int(want[b, first])}, reference margin {margin:.3g} > "
                      f"{math.sqrt(2) * delta:.3g} nats")
  return dict(rows=rows, new_tokens=n, tokens_agree_to_first_divergence=agree / (rows * n),
              tokens_agree_overall=float(np.mean(got == want)), divergences=divergences,
              generation_failures=failures)


def arithmetic(ref: dict, ours: dict) -> str:
  """The coarser arithmetic of the two sides, which sets the tolerance: `float32` only when both
  compute in fp32 on a CPU. fp32 on a GPU multiplies in TF32 (JAX's default matmul precision there,
  and torch's convolutions), on a TPU in one bf16 pass (JAX's default)."""
  if ref["dtype"] != "float32" or ours["dtype"] != "float32":
    return "bfloat16"
  if ours.get("platform") == "tpu":
    return "bfloat16"
  if ours.get("platform") == "cpu" and ref["device"] == "cpu":
    return "float32"
  return "tf32"


def compare(ref: dict, ours: dict, impl: str, layers: int, vocab: int) -> dict:
  """The `check` line of one implementation: its figures and `pass`."""
  got = ours["results"][impl]
  arith = arithmetic(ref, ours)
  delta = logprob_tolerance(arith, layers, vocab)
  line = dict(figure="check", attention=impl, auto=got.get("auto"), device=ours["device"],
              dtype=dict(ours=ours["dtype"], torch=ref["dtype"]), arithmetic=arith,
              logprob_tolerance=delta)
  if "error" in got:
    return dict(line, error=got["error"], **{"pass": False})
  line.update(compare_scores(ref, got, delta))
  line.update(compare_generation(ref, got["gen_tokens"], delta))
  failures = line.pop("score_failures") + line.pop("generation_failures")
  line["pass"] = not failures
  if failures:
    line["failures"] = failures[:8]
  return line


def lines(work: str, layers: int, vocab: int, errors: dict[str, str] | None = None) -> list[dict]:
  """Every `check` line from the two result files in `work`; a side that failed (`errors[side]`, its
  exception) or left no file gives one failing line."""
  errors = errors or {}
  results = {}
  for side, name in (("torch", TORCH_FILE), ("ours", OURS_FILE)):
    try:
      results[side] = load(os.path.join(work, name))
    except (OSError, ValueError) as e:
      why = errors.get(side) or f"{type(e).__name__}: {e}"
      return [dict(figure="check", error=f"{side} side: {why}", **{"pass": False})]
  ref, ours = results["torch"], results["ours"]
  out = [compare(ref, ours, impl, layers, vocab) for impl in ours["results"]]
  out += [dict(figure="check", attention=impl, skipped=why) for impl, why in ours["skipped"].items()]
  return out
