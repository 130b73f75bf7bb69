r"""One C3L CE training step: c3l_jax's `train.train_step` against transformers' PyTorch LLaVA.

One process, the same random LLaVA weights (transformers -> convert -> c3l_jax, fp32, built by
`bench/common.py`) and the same batch of B examples (paper default B=2):

    prompt = [bos] + 4 fixed text tokens + <image> x 256 + ~20 question tokens
    target = ~24 answer tokens + eos;   one random image per example.

Ours: `Trainer(Generator(vlm))` with `TrainConfig(lr=2e-5, contrastive_weight=0,
trainable=("connector", "decoder", "head"))`; a step is the jitted, state-donating `train_step` on
`{"ce": ce_batch(examples)}` (right-padded to a multiple of 32), blocked on the loss.
transformers: `LlavaForConditionalGeneration` with the vision tower frozen (`requires_grad_(False)`),
`torch.optim.AdamW(trainable, lr=2e-5, weight_decay=1e-5)`; a step is a forward on the same
`input_ids` / `attention_mask` / pixels with `labels` = tokens on target positions and -100
elsewhere, `loss.backward()`, `clip_grad_norm_(1.0)`, `optimizer.step()`, `zero_grad()`.

The first step of each side starts from identical weights, so its losses are printed side by side
(same CE on the same tokens: they should agree to ~1e-4). That first step is also ours' compile;
one more untimed step each, then `--repeats` interleaved timed rounds (best reported, see
`common.compare`).

FLOPs per step (2 per multiply-add; matmuls only, see `bench/common.py`), counting what each side
executes: forward = vision tower (ours stops at the feature layer, transformers runs every CLIP
layer) + projector + decoder over [B, T] (full T x T attention rectangle) + LM head (ours on the
positions that predict a target, `ce_batch`'s `head_positions`, a multiple of 16 per example;
transformers on all T); backward = 2 x forward of the trainable part (projector + decoder + head:
activation grads + weight grads), nothing for the frozen vision tower. I.e.

    step = vision_fwd + 3 x (projector + decoder + head)

(about 6 x trainable-matmul-params x tokens plus the attention and the frozen vision forward).
Achieved FLOP/s is that over the best step time, as a fraction of a plain fp32 2048^3 matmul in
the same framework measured in the same run. Not a test: timings are printed, never asserted.

    python bench/train.py            # mid-size model, B=2
    python bench/train.py --batch 8
    python bench/train.py --small    # smoke test
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bench import common  # noqa: E402

PAD, BOS, EOS = 0, 1, 2


def make_examples(models: common.Models, batch: int, seed: int) -> list[dict]:
  a = models.arch
  rng = np.random.default_rng(seed)
  lo, hi = 3, models.image_token_id  # ordinary text ids
  system = rng.integers(lo, hi, size=4).tolist()
  out = []
  for _ in range(batch):
    question = rng.integers(lo, hi, size=int(rng.integers(18, 23))).tolist()
    answer = rng.integers(lo, hi, size=int(rng.integers(20, 29))).tolist()
    out.append({"prompt": [BOS] + system + [models.image_token_id] * a.image_tokens + question,
                "target": answer + [EOS],
                "pixels": rng.standard_normal((3, a.image_size, a.image_size)).astype(np.float32)})
  return out


def projector_flops(a: common.Arch, images: int) -> float:
  return 2.0 * images * a.image_tokens * (a.dv * a.d + a.d * a.d)


def step_flops(a: common.Arch, b: int, t: int, ours: bool, head_rows: int | None = None) -> float:
  """Matmul FLOPs of one training step (see the module docstring); `head_rows`: the positions per
  example ours runs the LM head on (`ce_batch`'s `head_positions` width; default T - 1)."""
  vision_fwd = common.vision_flops(a, b, all_layers=not ours) - projector_flops(a, b)
  rows = (t - 1 if head_rows is None else head_rows) if ours else t
  trainable_fwd = (projector_flops(a, b) + common.decoder_flops(a, b, t, t)
                   + common.head_flops(a, b * rows))
  return vision_fwd + 3.0 * trainable_fwd


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="tiny model (smoke test)")
  ap.add_argument("--batch", type=int, default=2, help="examples per step (paper default 2)")
  ap.add_argument("--repeats", type=int, default=5, help="timed rounds (best is reported)")
  ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch default)")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from c3l_jax import train as T

  models, mm = common.setup(args)

  examples = make_examples(models, args.batch, args.seed)
  host = {"ce": T.ce_batch(examples, pad_id=PAD)}
  ce = host["ce"]
  b, t = ce["tokens"].shape
  print(f"batch: B={b}, T={t} (padded; {int(ce['mask'].sum())} real tokens, "
        f"{int(ce['weights'].sum())} target tokens)")

  # ---- ours
  cfg = T.TrainConfig(learning_rate=2e-5, steps=10**6, contrastive_weight=0.0,
                      trainable=("connector", "decoder", "head"))
  trainer = T.Trainer(T.Generator(models.jax_model, rngs=nnx.Rngs(0)), models.mesh, cfg)
  batch = jax.tree.map(jnp.asarray, host)

  def ours_step():
    trainer.trainable, trainer.opt_state, metrics = T.train_step(
        trainer.graphdef, trainer.trainable, trainer.opt_state, trainer.frozen, batch,
        optimizer=trainer.optimizer, cfg=trainer.cfg)
    return metrics["loss"]

  # ---- transformers
  hf = models.hf.train()
  hf.model.vision_tower.requires_grad_(False)
  params = [p for p in hf.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=1e-5)
  input_ids = torch.from_numpy(ce["tokens"].astype(np.int64))
  attention_mask = torch.from_numpy(ce["mask"].astype(np.int64))
  labels = torch.from_numpy(np.where(ce["weights"] == 1, ce["tokens"], -100).astype(np.int64))
  pixel_values = torch.from_numpy(ce["pixels"])

  def hf_step():
    out = hf(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
             labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()

  n_ours = sum(x.size for x in jax.tree.leaves(trainer.trainable))
  print(f"trainable params: ours {n_ours / 1e6:.2f}M (incl. the C3L head, zero grad here), "
        f"transformers {sum(p.numel() for p in params) / 1e6:.2f}M")

  # First step from identical weights: losses must agree (ours' first step also compiles).
  dt_o, loss_o = common.time_once(ours_step)
  dt_h, loss_h = common.time_once(hf_step)
  loss_o = float(loss_o)
  print(f"first step (ours incl. compile {dt_o:.1f}s, transformers {dt_h:.2f}s): loss ours "
        f"{loss_o:.6f}, transformers {loss_h:.6f}, |diff| {abs(loss_o - loss_h):.2e}"
        f"{'' if abs(loss_o - loss_h) < 1e-3 else '  <-- MISMATCH'}")

  timing, _ = common.compare({"ours": ours_step, "transformers": hf_step}, args.repeats, warmup=1)
  to, th = timing["ours"], timing["transformers"]
  print(f"ours:         {to}")
  print(f"transformers: {th}")
  fo = step_flops(models.arch, b, t, ours=True, head_rows=ce["head_positions"].shape[1])
  fh = step_flops(models.arch, b, t, ours=False)
  po, ph = fo / to.best / mm["jax"], fh / th.best / mm["torch"]
  print(f"FLOPs/step (vision_fwd + 3 x (projector + decoder + head)): ours {common.gflop(fo)}, "
        f"transformers {common.gflop(fh)}; achieved: ours {common.gflops(fo / to.best)} "
        f"({100 * po:.0f}% of jax matmul), transformers {common.gflops(fh / th.best)} "
        f"({100 * ph:.0f}% of torch matmul)")
  print(f"steps/s: ours {1 / to.best:.2f}, transformers {1 / th.best:.2f}")
  print(f"train: ours {1e3 * to.best:.0f} ms/step, transformers {1e3 * th.best:.0f} ms/step, "
        f"ratio {th.best / to.best:.2f}x (target >= 1.0x), ours FLOP/s = {100 * po:.0f}% of matmul")


if __name__ == "__main__":
  main()
