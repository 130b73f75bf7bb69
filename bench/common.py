"""Shared pieces of the side-by-side benchmarks (`bench/score.py`, `bench/generate.py`).

Both benchmarks run this project and transformers' PyTorch LLaVA in one process on the same random
weights and inputs. This module builds that checkpoint (transformers -> `save_pretrained` ->
`c3l_jax.convert` -> `sharding.load_model`), times callables (warmup, then alternating rounds so
that load from other processes hits both sides alike; best and median reported), measures a plain
fp32 matmul in JAX and in torch as the FLOP/s yardstick, and counts FLOPs.

FLOP counting: a multiply-add is 2 FLOPs; dense layers cost 2 * (matmul parameters) per token;
attention costs 4 * Tq * Tk * width per layer (QK^T and PV) over the full rectangle the
implementation actually computes (masked entries included, no causal halving), which is what both
sides execute. Element-wise work (norms, softmax, RoPE, activations) is not counted. Embedding
lookups are free. Not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # the converter's progress bar

# Architectures: CLIP ViT (224 px / patch 14 -> 256 patches) + Llama decoder, LLaVA-1.5 wiring.
SIZES = {
    "full": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4, image_size=224, patch_size=14, projection_dim=256),
        text=dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                  rms_norm_eps=1e-6)),
    # --small: smoke-test size (4 image tokens, tiny decoder).
    "small": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, image_size=28, patch_size=14, projection_dim=32),
        text=dict(vocab_size=1000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  rms_norm_eps=1e-6)),
}


@dataclasses.dataclass(frozen=True)
class Arch:
  """The dimensions the FLOP counts need."""

  dv: int  # vision width
  mv: int  # vision MLP width
  lv: int  # vision layers
  image_size: int
  patch: int
  d: int  # decoder width
  m: int  # decoder MLP width
  layers: int
  heads: int
  kv_heads: int
  vocab: int
  feature_layer: int  # LLaVA's vision_feature_layer (-2 = penultimate)

  @property
  def patches(self) -> int:
    return (self.image_size // self.patch) ** 2

  @property
  def image_tokens(self) -> int:  # "default" feature strategy: the CLS token is dropped
    return self.patches

  @property
  def head_dim(self) -> int:
    return self.d // self.heads

  # ---- parameters touched per token (matmul weights only) ----
  @property
  def vision_layer_params(self) -> int:
    return 4 * self.dv * self.dv + 2 * self.dv * self.mv

  @property
  def decoder_layer_params(self) -> int:
    hd = self.head_dim
    return (2 * self.d * self.heads * hd + 2 * self.d * self.kv_heads * hd
            + 3 * self.d * self.m)

  @property
  def decoder_params(self) -> int:
    return self.layers * self.decoder_layer_params

  @property
  def head_params(self) -> int:
    return self.d * self.vocab

  def vision_layers_run(self, all_layers: bool) -> int:
    """transformers runs every CLIP layer (output_hidden_states); c3l_jax stops at the feature layer."""
    if all_layers:
      return self.lv
    return self.feature_layer if self.feature_layer >= 0 else self.lv + 1 + self.feature_layer


def arch_of(hf_cfg) -> Arch:
  v, t = hf_cfg.vision_config, hf_cfg.text_config
  return Arch(dv=v.hidden_size, mv=v.intermediate_size, lv=v.num_hidden_layers,
              image_size=v.image_size, patch=v.patch_size, d=t.hidden_size, m=t.intermediate_size,
              layers=t.num_hidden_layers, heads=t.num_attention_heads,
              kv_heads=t.num_key_value_heads, vocab=t.vocab_size,
              feature_layer=int(hf_cfg.vision_feature_layer))


# ----------------------------------------------------------------------------- FLOP counts


def vision_flops(a: Arch, images: int, all_layers: bool) -> float:
  """Vision tower (patch matmul + encoder layers run) + projector for `images` images."""
  n = a.patches + 1
  per_layer = 2 * n * a.vision_layer_params + 4 * n * n * a.dv
  patch = 2 * a.patches * (3 * a.patch * a.patch) * a.dv
  proj = 2 * a.image_tokens * (a.dv * a.d + a.d * a.d)
  return float(images) * (patch + a.vision_layers_run(all_layers) * per_layer + proj)


def decoder_flops(a: Arch, rows: int, tq: int, tk: int) -> float:
  """Decoder blocks for `rows` rows of `tq` query tokens attending to `tk` key slots."""
  dense = 2 * tq * a.decoder_params
  attn = a.layers * 4 * tq * tk * a.heads * a.head_dim
  return float(rows) * (dense + attn)


def head_flops(a: Arch, positions: int) -> float:
  """LM head on `positions` hidden states in all."""
  return 2.0 * positions * a.head_params


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Timing:
  times: list[float]

  @property
  def best(self) -> float:
    return min(self.times)

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  def __str__(self) -> str:
    return (f"best {self.best:.3f}s median {self.median:.3f}s "
            f"(n={len(self.times)}: {', '.join(f'{t:.3f}' for t in self.times)})")


def block(x: Any) -> Any:
  """Wait for JAX arrays in `x` (numpy / torch results are already materialised)."""
  import jax

  return jax.block_until_ready(x)


def time_once(fn: Callable[[], Any]) -> tuple[float, Any]:
  t0 = time.perf_counter()
  out = block(fn())
  return time.perf_counter() - t0, out


def compare(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
            warmup_fns: dict[str, Callable[[], Any]] | None = None,
            log: Callable[[str], None] = print) -> tuple[dict[str, Timing], dict[str, Any]]:
  """Time several callables: `warmup` untimed calls each (of `warmup_fns[name]` where given, e.g. a
  smaller call that exercises the same code), then `repeats` rounds that run every callable once,
  in turn (interleaved, so a burst of load from elsewhere hits all of them alike).

  Returns per-name `Timing` and the last output of each callable.
  """
  outputs: dict[str, Any] = {}
  warmup_fns = warmup_fns or {}
  for name, fn in fns.items():
    for _ in range(warmup):
      dt, _ = time_once(warmup_fns.get(name, fn))
      log(f"  warmup {name}{' (reduced)' if name in warmup_fns else ''}: {dt:.3f}s "
          f"(load average {os.getloadavg()[0]:.2f})")
  times: dict[str, list[float]] = {k: [] for k in fns}
  for r in range(repeats):
    for name, fn in fns.items():
      dt, outputs[name] = time_once(fn)
      times[name].append(dt)
      log(f"  round {r + 1}/{repeats} {name}: {dt:.3f}s (load average {os.getloadavg()[0]:.2f})")
  return {k: Timing(v) for k, v in times.items()}, outputs


# ----------------------------------------------------------------------------- matmul probe


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """Best-of-`repeats` FLOP/s of an fp32 `[n, n] @ [n, n]` in JAX (jit) and in torch."""
  import jax
  import jax.numpy as jnp
  import torch

  flops = 2.0 * n ** 3
  rng = np.random.default_rng(0)
  a = rng.standard_normal((n, n), dtype=np.float32)
  b = rng.standard_normal((n, n), dtype=np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  mm = jax.jit(jnp.matmul)
  block(mm(ja, jb))
  jt = min(time_once(lambda: mm(ja, jb))[0] for _ in range(repeats))
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  with torch.no_grad():
    torch.mm(ta, tb)
    tt = min(time_once(lambda: torch.mm(ta, tb))[0] for _ in range(repeats))
  return {"jax": flops / jt, "torch": flops / tt}


def gflops(x: float) -> str:
  return f"{x / 1e9:.1f} GFLOP/s"


def gflop(x: float) -> str:
  return f"{x / 1e9:.{2 if x < 1e10 else 0}f} GFLOP"


# ----------------------------------------------------------------------------- models


@dataclasses.dataclass
class Models:
  hf: Any  # transformers LlavaForConditionalGeneration (eval, fp32)
  jax_model: Any  # c3l_jax LlavaVLM (fp32)
  mesh: Any
  arch: Arch
  image_token_id: int
  workdir: str


def build_models(small: bool, image_token: int | None = None, seed: int = 0,
                 workdir: str | None = None, perturb: float = 0.02) -> Models:
  """Random LLaVA checkpoint in transformers, saved, converted and loaded into c3l_jax (fp32).

  Every parameter is perturbed by `perturb * N(0, 1)` (random init leaves norms at exactly 1 and
  biases at 0), so both sides compute with the same non-trivial weights.
  """
  import jax
  import torch
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

  from c3l_jax import sharding
  from c3l_jax.convert import convert

  size = SIZES["small" if small else "full"]
  vocab = size["text"]["vocab_size"]
  image_token = vocab - 1 if image_token is None else image_token
  if not 0 < image_token < vocab:
    raise SystemExit(f"--image_token {image_token} must be inside the vocabulary (1..{vocab - 1})")
  cfg = LlavaConfig(vision_config=CLIPVisionConfig(**size["vision"]),
                    text_config=LlamaConfig(**size["text"]), image_token_index=image_token,
                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                    projector_hidden_act="gelu")
  torch.manual_seed(seed)
  hf = LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(perturb * torch.randn_like(p))
  workdir = workdir or tempfile.mkdtemp(prefix="c3l_bench_")
  hf_dir, out_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "c3l")
  hf.save_pretrained(hf_dir)
  convert(hf_dir, out_dir)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  model = sharding.load_model(out_dir, mesh)  # fp32
  return Models(hf=hf, jax_model=model, mesh=mesh, arch=arch_of(hf.config),
                image_token_id=image_token, workdir=workdir)


def count_params(hf) -> int:
  return sum(p.numel() for p in hf.parameters())


def setup_threads(threads: int | None) -> int:
  """torch intra-op threads (default: torch's own default, = cores here). Returns the number used.

  XLA:CPU sizes its own thread pool from the visible cores; it is not changed here.
  """
  import torch

  if threads:
    torch.set_num_threads(threads)
  return torch.get_num_threads()


def header(models: Models, threads: int) -> str:
  import jax
  import torch
  import transformers

  a = models.arch
  return (f"model: CLIP ViT {a.image_size}px/{a.patch} ({a.patches} patches) width {a.dv} x {a.lv} "
          f"layers; Llama d={a.d} x {a.layers} layers, {a.heads} heads (kv {a.kv_heads}), mlp {a.m}, "
          f"vocab {a.vocab}; {count_params(models.hf) / 1e6:.1f}M params, fp32; image token "
          f"{models.image_token_id}\n"
          f"versions: jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({threads} threads), transformers {transformers.__version__}; {os.cpu_count()} CPUs")


def setup(args) -> tuple["Models", dict[str, float]]:
  """What every bench does first: threads, the models (printed), and the matmul FLOP/s probe."""
  threads = setup_threads(args.threads)
  t0 = time.perf_counter()
  models = build_models(args.small, getattr(args, "image_token", None), seed=args.seed)
  print(header(models, threads))
  print(f"build + save + convert + load: {time.perf_counter() - t0:.1f}s ({models.workdir}); "
        f"load average {os.getloadavg()[0]:.2f}")
  mm = matmul_flops_per_s()
  print(f"matmul fp32 2048^3: jax {gflops(mm['jax'])}, torch {gflops(mm['torch'])}")
  return models, mm
