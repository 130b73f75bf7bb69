r"""The accelerator suite: c3l_jax vs transformers + torch, checked first, then timed (scoring, greedy
generation, a training step).

One command, nothing downloaded (it needs jax[cuda], torch and transformers):

    python bench/gpu.py                 # LLaVA-1.5-7B widths, bf16, on the first GPU (or a TPU)
    python bench/gpu.py --figures=check # the check alone
    python bench/gpu.py --size=small    # a tiny model: runs anywhere (CPU included), for the test

`check` (run first; bench/gpu_check.py holds it and the reasoning behind its tolerances): both sides
load ONE random model, transformers' `LlavaForConditionalGeneration` built with a fixed seed, its LM
head rescaled so the logits' std is 2 sqrt(2 ln V) (a random init's logits are nearly uniform, which
leaves S(I2C) ~0 and greedy decoding among ties), saved and converted with `c3l_jax.convert` (torch
runs first and writes it, with its results, to `--check_dir`, a temporary directory by default). For
every attention implementation the platform has (`xla`; `cudnn` on an NVIDIA GPU in bf16 / fp16, what
`auto` picks there; `splash` on a TPU), c3l_jax's `scoring.Scorer` and `sampling.generate` are compared
with transformers on the same device, in its natural dtype (bf16 on a GPU; fp32 on CPU; on a TPU
torch runs on the host CPU in fp32): per-QA S(I2C) and both log-prob sums of `images x qa` answers
(each the reference's own greedy continuation of its prompt) within tolerances propagated from a
per-logit bound (fp32: 1e-4 nats; bf16: 4 standard deviations of a random walk of bf16 roundings,
1.08 nats at 7B), and greedy generation token for token, where a row may leave the reference only at
a near-tie (the reference's margin to ours' token within the bf16 bound). Sizes: 2 images x 4 QA and
32 new tokens at 7B (2 x 2 and 8 for `--size=small`). At 7B the model is ~14 GB a side in bf16 and
`--check_dir` holds it twice (transformers' and c3l_jax's format, ~28 GB). One line per implementation:
`{"figure": "check", "attention", "auto" (whether `auto` picks it), "pass", "i2c_max_abs_diff",
"i2c_max_rel_diff", "logp_max_abs_diff", "worst_error_over_tolerance", "tokens_agree_to_first_divergence",
"tokens_agree_overall", "divergences", "failures" (when failing), ...}`, and `{"figure": "check",
"attention", "skipped": reason}` for each the platform lacks. The command exits 1 when a check fails.

The timed figures' model is random (no checkpoint): CLIP ViT-L/14-336 (24 layers, 576 image tokens) + a
2-layer GELU projector + a Llama decoder of Vicuna-7B's widths (4096 wide, 11008 MLP, 32 heads,
vocabulary 32064), all 32 decoder layers for inference and `--train_layers` (default 16: with float32
master weights and AdamW moments, 16 bytes a parameter, that is ~3.7B parameters, ~60 GB, plus
activations, inside an H200's 141 GB for both sides) for training. Each side builds its own random model
of the same shape (c3l_jax: `sharding.init_model`; transformers: `LlavaForConditionalGeneration` built
on the device with `attn_implementation="sdpa"`), in its own subprocess, one after the other, so neither
framework's memory pool sees the other. Figures (each side warmed up / compiled once, then best of
`--repeats`):

  score     S(I2C) of `--images` images x 5 QA (prompt = bos + 4 + <image> x 576 + ~20 question
            tokens, answer ~24): c3l_jax's `scoring.Scorer` (prefix sharing) vs transformers' natural
            way (a with-image and a text-only forward per batch of 40 QA). tokens/s counts the tokens
            of both forwards of every QA (the same numerator on both sides); MFU = the matmul FLOPs
            each side executes (bench/score.py's counts) / time / the device's peak.
  generate  greedy, batch 64, 128 new tokens (no EOS), prompts as above with 10..25 question tokens:
            `sampling.generate` vs `hf.generate`. tokens/s = 64 x 128 / the whole call; HBM GB/s =
            the bytes the decode steps must read (decoder + LM head weights, and the KV cache each
            step attends to) / the decode time (the full call less a one-token call).
  train     one C3L CE step (bench/train.py's: B = `--train_batch` examples, vision tower frozen,
            AdamW, grad clip 1.0) with float32 master weights and bf16 compute (transformers under
            `torch.autocast(bfloat16)`): MFU = the step's matmul FLOPs / time / peak.

Output: the check's lines, then one JSON line per timed figure, `{"figure": ..., "ours": {...}, "torch":
{...}, "ratio": ...}` (ratio = ours' speed over torch's), then the device. The peak FLOP/s and HBM
bandwidth come from a table of device kinds (H200, H100, A100, ...; `--peak_tflops` / `--peak_hbm_gbs`
override); elsewhere (CPU) MFU is against a bf16 matmul measured in JAX and the bandwidth fraction is
null. Not a test: timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The CPU benches this borrows from default JAX to the CPU; here JAX picks its platform itself ("").
os.environ.setdefault("JAX_PLATFORMS", "")

FIGURES = ("check", "score", "generate", "train")

# LLaVA-1.5-7B's shapes (llava-hf/llava-1.5-7b-hf config.json), and a tiny stand-in.
SIZES = {
    "7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                  rms_norm_eps=1e-5),
        image_token=32000, images=16, gen_batch=64, new_tokens=128, train_batch=8, train_layers=16,
        check=dict(images=2, qa=4, new_tokens=32)),
    "small": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, image_size=28, patch_size=14, projection_dim=32),
        text=dict(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  rms_norm_eps=1e-6),
        image_token=999, images=2, gen_batch=4, new_tokens=8, train_batch=2, train_layers=2,
        check=dict(images=2, qa=2, new_tokens=8)),
}

# Dense bf16 peak FLOP/s and HBM bytes/s by device kind (vendor data sheets, SXM parts).
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12),
         "L40S": (362e12, 0.864e12), "TPU v5p": (459e12, 2.765e12), "TPU v5 lite": (197e12, 0.819e12),
         "TPU v4": (275e12, 1.2e12)}

PAD, BOS, EOS = 0, 1, 2
QA_PER_IMAGE = 5
SCORE_ROWS = 40


def hf_config(size: str, layers: int | None = None):
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

  s = SIZES[size]
  text = dict(s["text"], num_hidden_layers=layers or s["text"]["num_hidden_layers"])
  cfg = LlavaConfig(vision_config=CLIPVisionConfig(**s["vision"]), text_config=LlamaConfig(**text),
                    image_token_index=s["image_token"], vision_feature_layer=-2,
                    vision_feature_select_strategy="default", projector_hidden_act="gelu")
  return cfg


def arch(cfg):
  from bench import common

  return common.arch_of(cfg)


def stand_in(cfg):
  """What bench/score.py's and bench/train.py's data makers read of `common.Models`."""
  return types.SimpleNamespace(arch=arch(cfg), image_token_id=cfg.image_token_index)


def gen_prompts(cfg, batch: int, seed: int = 0):
  from bench import generate as bgen

  return bgen.make_data(stand_in(cfg), batch, seed)


# ----------------------------------------------------------------------------- byte counts


def decode_bytes(a, batch: int, prompt: int, new_tokens: int, full_cache: bool, itemsize: int = 2
                 ) -> float:
  """HBM bytes the `new_tokens - 1` decode steps after the first must read: decoder + LM head weights
  each step, and the keys / values attended to (all `prompt + new_tokens` slots of a fixed cache, or
  the `prompt + i` of a growing one)."""
  weights = (a.decoder_params + a.head_params) * itemsize
  kv_per_slot = a.layers * batch * 2 * a.kv_heads * a.head_dim * itemsize
  total = 0.0
  for i in range(1, new_tokens):
    total += weights + kv_per_slot * ((prompt + new_tokens) if full_cache else (prompt + i))
  return total


# ----------------------------------------------------------------------------- one side


def best_of(fn, repeats: int) -> tuple[float, object]:
  from bench import common

  out = fn()  # warmup / compile
  common.block(out)
  best = None
  for _ in range(repeats):
    dt, out = common.time_once(fn)
    best = dt if best is None else min(best, dt)
  return best, out


class Ours:
  """c3l_jax on the default JAX device."""

  def __init__(self, size: str):
    import jax

    from c3l_jax import sharding

    self.size = size
    self.jax = jax
    self.mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    self.device = jax.devices()[0]
    self._inference = None

  def model(self, layers: int | None = None, param_dtype: str = "bfloat16"):
    """A random model; the inference one (all layers, bf16) is built once for score and generate."""
    from c3l_jax import sharding
    from c3l_jax.models import configs

    inference = layers is None and param_dtype == "bfloat16"
    if inference and self._inference is not None:
      return self._inference
    self._inference = None  # the training model replaces it in memory
    cfg = configs.with_runtime(configs.from_hf_config(hf_config(self.size, layers)),
                               dtype="bfloat16", param_dtype=param_dtype, attention="auto")
    model = sharding.init_model(cfg, self.mesh)
    if inference:
      self._inference = model
    return model

  def sync(self, x):
    return self.jax.block_until_ready(x)

  def score(self, items, pixels, repeats):
    from c3l_jax import scoring

    model = self.model()
    scorer = scoring.Scorer(model, self.mesh, scoring.ScoringConfig(batch_rows=SCORE_ROWS),
                             model.cfg.image_token_id, PAD)
    t, _ = best_of(lambda: scorer.score(items, pixels), repeats)
    from bench import score as bscore

    executed, _ = bscore.ours_flops(arch(hf_config(self.size)), scorer, items)
    return t, executed

  def generate(self, prompts, pixels, new_tokens, repeats):
    from bench import generate as bgen
    from c3l_jax import sampling

    model = self.model()
    tokens, mask = sampling.pad_prompts(prompts, bgen.BUCKET, PAD)
    full = sampling.SamplingConfig(max_new_tokens=new_tokens, pad_id=PAD)
    one = sampling.SamplingConfig(max_new_tokens=1, pad_id=PAD)
    t_full, _ = best_of(lambda: sampling.generate(model, tokens, mask, pixels, full), repeats)
    t_one, _ = best_of(lambda: sampling.generate(model, tokens, mask, pixels, one), repeats)
    return t_full, t_one, tokens.shape[1], True

  def train(self, examples, layers, repeats):
    import jax.numpy as jnp
    from flax import nnx

    from c3l_jax import train as T

    vlm = self.model(layers, param_dtype="float32")
    cfg = T.TrainConfig(learning_rate=2e-5, steps=10**6, contrastive_weight=0.0,
                        trainable=("connector", "decoder", "head"))
    trainer = T.Trainer(T.Generator(vlm, rngs=nnx.Rngs(0)), self.mesh, cfg)
    ce = T.ce_batch(examples, pad_id=PAD)
    batch = self.jax.tree.map(jnp.asarray, {"ce": ce})

    def step():
      trainer.trainable, trainer.opt_state, metrics = T.train_step(
          trainer.graphdef, trainer.trainable, trainer.opt_state, trainer.frozen, batch,
          optimizer=trainer.optimizer, cfg=trainer.cfg)
      return metrics["loss"]

    t, _ = best_of(step, repeats)
    return t, ce["tokens"].shape


class Torch:
  """transformers' LlavaForConditionalGeneration (sdpa) on the first CUDA device, else the CPU."""

  def __init__(self, size: str):
    import torch

    self.size = size
    self.torch = torch
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

  def model(self, layers: int | None = None, dtype=None):
    from transformers import LlavaForConditionalGeneration

    torch = self.torch
    torch.manual_seed(0)
    with torch.device(self.device):  # initialised on the device, in its final dtype
      hf = LlavaForConditionalGeneration._from_config(hf_config(self.size, layers),
                                                      attn_implementation="sdpa",
                                                      dtype=dtype or torch.bfloat16)
    assert hf.config.text_config._attn_implementation == "sdpa"
    return hf

  def sync(self, x):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()
    return x

  def free(self):
    gc.collect()
    if self.device.type == "cuda":
      self.torch.cuda.empty_cache()

  def score(self, items, pixels, repeats):
    from bench import score as bscore

    torch = self.torch
    hf = self.model().eval()

    def logprobs(prompts, answers, pix=None):
      ids, mask = bscore._right_pad([list(p) + list(a) for p, a in zip(prompts, answers)])
      kw = {} if pix is None else {"pixel_values": torch.from_numpy(pix).to(self.device, torch.bfloat16)}
      logits = hf(input_ids=torch.from_numpy(ids).to(self.device),
                  attention_mask=torch.from_numpy(mask).to(self.device), **kw).logits
      out = []
      for i, (p, a) in enumerate(zip(prompts, answers)):
        rows = torch.log_softmax(logits[i, len(p) - 1:len(p) - 1 + len(a)].float(), dim=-1)
        out.append(rows[torch.arange(len(a)), torch.as_tensor(a, device=self.device)])
      return out

    def run():
      results = []
      with torch.no_grad():
        for s in range(0, len(items), SCORE_ROWS):
          chunk = items[s:s + SCORE_ROWS]
          answers = [it.answer for it in chunk]
          pix = np.stack([pixels[it.image_key] for it in chunk])
          lv = logprobs([it.prompt_image for it in chunk], answers, pix)
          ld = logprobs([it.prompt_text for it in chunk], answers)
          results += [float((v.exp() * (v - d)).sum()) for v, d in zip(lv, ld)]
      return results

    t, _ = best_of(run, repeats)
    executed, _ = bscore.hf_flops(arch(hf_config(self.size)), items, SCORE_ROWS)
    hf = None  # free the GPU memory (the closure holds this cell)
    self.free()
    return t, executed

  def generate(self, prompts, pixels, new_tokens, repeats):
    from bench import generate as bgen

    torch = self.torch
    hf = self.model().eval()
    ids, mask = bgen.left_pad(prompts)
    ids_t = torch.from_numpy(ids).to(self.device)
    mask_t = torch.from_numpy(mask).to(self.device)
    pix = torch.from_numpy(pixels).to(self.device, torch.bfloat16)

    def run(n):
      with torch.no_grad():
        return self.sync(hf.generate(ids_t, pixel_values=pix, attention_mask=mask_t, max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, eos_token_id=None,
                                     pad_token_id=PAD))

    t_full, _ = best_of(lambda: run(new_tokens), repeats)
    t_one, _ = best_of(lambda: run(1), repeats)
    hf = None  # free the GPU memory (the closure holds this cell)
    self.free()
    return t_full, t_one, ids.shape[1], False

  def train(self, examples, layers, repeats):
    from c3l_jax import train as T

    torch = self.torch
    hf = self.model(layers, dtype=torch.float32).train()
    hf.model.vision_tower.requires_grad_(False)
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=1e-5)
    ce = T.ce_batch(examples, pad_id=PAD)
    put = lambda x: torch.from_numpy(x).to(self.device)
    input_ids, attention_mask = put(ce["tokens"].astype(np.int64)), put(ce["mask"].astype(np.int64))
    labels = put(np.where(ce["weights"] == 1, ce["tokens"], -100).astype(np.int64))
    pixel_values = put(ce["pixels"])

    def step():
      with torch.autocast(self.device.type, dtype=torch.bfloat16):
        out = hf(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                 labels=labels)
      out.loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
      return self.sync(out.loss.item())

    t, _ = best_of(step, repeats)
    hf = opt = params = None  # free the GPU memory (the closures hold these cells)
    self.free()
    return t, ce["tokens"].shape


def peaks(args, side: str) -> dict:
  """(peak FLOP/s, peak HBM bytes/s or None, where they come from) for this process's device."""
  if side == "ours":
    import jax

    kind = jax.devices()[0].device_kind
  else:
    import torch

    kind = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
  flops, hbm = next((v for k, v in PEAKS.items() if k.lower() in kind.lower()), (None, None))
  source = f"table ({kind})"
  if args.peak_tflops:
    flops, source = args.peak_tflops * 1e12, "--peak_tflops"
  if args.peak_hbm_gbs:
    hbm = args.peak_hbm_gbs * 1e9
  if flops is None:  # no data sheet: a bf16 matmul measured in JAX
    import jax
    import jax.numpy as jnp

    from bench import common

    n = 1024
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(jnp.matmul)
    common.block(mm(a, a))
    flops = 2.0 * n ** 3 / min(common.time_once(lambda: mm(a, a))[0] for _ in range(5))
    source = f"measured jax bf16 matmul ({kind})"
  return {"device": kind, "peak_flops": flops, "peak_hbm": hbm, "peak_source": source}


def run_side(args) -> None:
  """Every figure for one side, each as a JSON line `{"figure", "side", ...}` on stdout."""
  from bench import score as bscore
  from bench import train as btrain
  from c3l_jax import train as T

  side = args.side
  impl = Ours(args.size) if side == "ours" else Torch(args.size)
  peak = peaks(args, side)
  size = SIZES[args.size]
  cfg = hf_config(args.size)
  a = arch(cfg)

  def emit(figure, **fields):
    print(json.dumps({"figure": figure, "side": side, **fields}), flush=True)

  for figure in args.figures:
    t0 = time.perf_counter()
    try:
      if figure == "check":  # results go to files in --check_dir (bench/gpu_check.py)
        from bench import gpu_check

        dtype = None if args.check_dtype == "auto" else args.check_dtype
        if side == "torch":
          gpu_check.torch_reference(cfg, size["check"], args.check_dir, args.seed, dtype)
        else:
          gpu_check.ours_results(cfg, size["check"], args.check_dir, args.seed, dtype, SCORE_ROWS)
        emit(figure, seconds=time.perf_counter() - t0)
      elif figure == "score":
        items, pixels = bscore.make_data(stand_in(cfg), size["images"], QA_PER_IMAGE, args.seed)
        t, executed = impl.score(items, pixels, args.repeats)
        tokens = sum(len(it.prompt_image) + len(it.prompt_text) + 2 * len(it.answer) for it in items)
        emit(figure, seconds=t, tokens_per_s=tokens / t, qa=len(items),
             mfu=executed / t / peak["peak_flops"])
      elif figure == "generate":
        prompts, pixels = gen_prompts(cfg, size["gen_batch"], args.seed)
        n = size["new_tokens"]
        t_full, t_one, width, full_cache = impl.generate(prompts, pixels, n, args.repeats)
        decode = max(t_full - t_one, 1e-9)
        moved = decode_bytes(a, len(prompts), width, n, full_cache)
        emit(figure, seconds=t_full, tokens_per_s=len(prompts) * n / t_full, batch=len(prompts),
             new_tokens=n, decode_seconds=decode, hbm_gbs=moved / decode / 1e9,
             hbm_fraction=None if peak["peak_hbm"] is None else moved / decode / peak["peak_hbm"])
      elif figure == "train":
        layers = args.train_layers or size["train_layers"]
        tcfg = hf_config(args.size, layers)
        examples = btrain.make_examples(stand_in(tcfg), args.train_batch or size["train_batch"],
                                        args.seed)
        t, (b, width) = impl.train(examples, layers, args.repeats)
        head_rows = T.ce_batch(examples, pad_id=PAD)["head_positions"].shape[1]
        flops = btrain.step_flops(arch(tcfg), b, width, ours=side == "ours", head_rows=head_rows)
        emit(figure, seconds=t, mfu=flops / t / peak["peak_flops"], layers=layers, batch=b,
             tokens=b * width, tokens_per_s=b * width / t)
    except Exception as e:  # noqa: BLE001 - one figure failing (e.g. out of memory) must not hide the rest
      emit(figure, error=f"{type(e).__name__}: {e}"[:500])
    print(f"# {side} {figure}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
  print(json.dumps({"figure": "device", "side": side, **peak}), flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", choices=tuple(SIZES), default="7b")
  ap.add_argument("--figures", default=",".join(FIGURES), help="comma-separated subset of "
                  + ", ".join(FIGURES))
  ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure (best reported)")
  ap.add_argument("--train_layers", type=int, default=None, help="decoder layers for the train step")
  ap.add_argument("--train_batch", type=int, default=None)
  ap.add_argument("--peak_tflops", type=float, default=None, help="override the device's bf16 peak")
  ap.add_argument("--peak_hbm_gbs", type=float, default=None, help="override its HBM bandwidth")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--check_dir", default=None, help="where the check keeps the shared model and both "
                  "sides' results, replacing its hf/, ours/ and *_check.json (default: a temporary "
                  "directory, removed afterwards)")
  ap.add_argument("--check_dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                  help="the check's compute dtype (auto: bf16 on an accelerator, fp32 on CPU; fp32 on a "
                  "GPU is judged with TF32's tolerance, on a TPU with bf16's)")
  ap.add_argument("--side", choices=("ours", "torch"), default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.figures = [f.strip() for f in args.figures.split(",") if f.strip()]
  unknown = set(args.figures) - set(FIGURES)
  if unknown:
    ap.error(f"unknown figures {sorted(unknown)} (valid: {', '.join(FIGURES)})")
  if args.side:
    return run_side(args)

  start = time.perf_counter()
  sides = {}
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get(
      "XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9"), TQDM_DISABLE="1")
  passed, skip = [], False  # the command line for the sides, less what the parent sets
  for a in sys.argv[1:]:
    if not skip and not a.startswith(("--side", "--check_dir")):
      passed.append(a)
    skip = a in ("--side", "--check_dir")
  work = args.check_dir or tempfile.mkdtemp(prefix="c3l_gpu_check_")
  try:
    os.makedirs(work, exist_ok=True)
  except OSError as e:
    ap.error(f"--check_dir {work}: {e}")
  for side in ("torch", "ours"):  # torch first: it writes the check's shared model and reference
    cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--check_dir={work}"] + passed
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, env=env, text=True)
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    sides[side] = {l.pop("figure"): l for l in lines}
    if proc.returncode:
      print(f"# {side} exited with {proc.returncode}", file=sys.stderr)
  failed = False
  if "check" in args.figures:
    from bench import gpu_check

    text = SIZES[args.size]["text"]
    errors = {s: sides[s].get("check", {}).get("error", "no result") for s in sides}
    for line in gpu_check.lines(work, text["num_hidden_layers"], text["vocab_size"], errors):
      failed |= line.get("pass") is False
      print(json.dumps(line), flush=True)
  if not args.check_dir:
    shutil.rmtree(work, ignore_errors=True)
  speed = {"score": ("tokens_per_s", True), "generate": ("tokens_per_s", True),
           "train": ("seconds", False)}
  for figure in args.figures:
    if figure == "check":
      continue
    ours, ref = sides["ours"].get(figure, {"error": "no result"}), sides["torch"].get(figure, {"error": "no result"})
    for d in (ours, ref):
      d.pop("side", None)
    key, higher = speed[figure]
    ratio = None
    if key in ours and key in ref:
      ratio = ours[key] / ref[key] if higher else ref[key] / ours[key]
    print(json.dumps({"figure": figure, "ours": ours, "torch": ref, "ratio": ratio}), flush=True)
  device = {s: {k: v for k, v in sides[s].get("device", {}).items() if k != "side"} for s in sides}
  print(json.dumps({"figure": "device", **device, "size": args.size,
                    "wall_seconds": time.perf_counter() - start,
                    "date": time.strftime("%Y-%m-%d", time.gmtime())}), flush=True)
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  main()
