"""Stage 0 of the grounded scenes recipe (`c3l_jax.scenes.grounded`): supervised pretraining of the vision
tower on the world's ground truth.

LLaVA starts from a CLIP that was pretrained (contrastively, on 400 M image-text pairs) before any
instruction data; the scenes model's vision tower starts from random weights. Trained only through the
CG-VLM alignment (a scale-free contrastive loss against caption embeddings) and the caption / instruction
CE, it learnt colours and shapes but not where objects are or which shapes are absent (README: held-out
VQA 45 %, position 11.5 %, POPE at chance). Here the tower is *pretrained by supervision* instead, as an
ImageNet-style backbone would be: linear probes on the patch features that LLaVA hands to the connector
(`vision_feature_layer`, CLS dropped) are trained with cross-entropy against the scene annotation, then
thrown away.

Targets, for each of the 9 patches (at 72 px with 24 px patches a patch is one cell of the world's
3 x 3 grid):

- local: the shape in the cell (or empty), its colour (or none), its size (or none), the cell's row
  and column;
- global (every patch predicts them, so the tower's attention spreads scene-level facts into every
  token): the number of objects of each shape and of each colour (0-5) and the total (`COUNT_HEADS`),
  and bindings (`BINDING_HEADS`): for each shape, the colour and the cell of its instance; for each
  colour, the shape of its instance (none / the value / several).

Nothing of the text, the checker or the evaluation questions is used: the labels are the scene's
objects only. The stage is a pure function of (seed, step).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from c3l_jax.scenes import world as scenes

_SALT = 10
# Local heads: shape (5 + empty), colour (6 + none), size (2 + none), row, column.
LOCAL_HEADS = (("shape", len(scenes.SHAPES) + 1), ("colour", len(scenes.COLOURS) + 1),
               ("size", len(scenes.SIZES) + 1), ("row", scenes.GRID), ("col", scenes.GRID))
_MAX_COUNT = 6  # counts 0..5
COUNT_HEADS = tuple([(f"n_{s}", _MAX_COUNT) for s in scenes.SHAPES]
                    + [(f"n_{c}", _MAX_COUNT) for c in scenes.COLOURS] + [("n_objects", _MAX_COUNT)])
# Binding heads (scene-level lookups every patch predicts): for each shape, the colour and the cell of
# its instance; for each colour, the shape of its instance. Class 0 = no instance, the last class =
# several instances, else the value + 1.
CELLS = scenes.GRID * scenes.GRID  # the grid's cells (one patch each)
BINDING_HEADS = tuple([(f"{s}_colour", len(scenes.COLOURS) + 2) for s in scenes.SHAPES]
                      + [(f"{s}_cell", CELLS + 2) for s in scenes.SHAPES]
                      + [(f"{c}_shape", len(scenes.SHAPES) + 2) for c in scenes.COLOURS])
GLOBAL_HEADS = COUNT_HEADS + BINDING_HEADS
# Optional (`background=True`): the scene's background colour, also predicted by every patch.
BACKGROUND_HEADS = (("background", len(scenes.BACKGROUNDS)),)


def global_heads(background: bool = False) -> tuple[tuple[str, int], ...]:
  return GLOBAL_HEADS + (BACKGROUND_HEADS if background else ())


def binding_class(values: Sequence[int], n: int) -> int:
  """The binding class of the values of the instances (see BINDING_HEADS): 0, value + 1, or n + 1."""
  return 0 if not values else values[0] + 1 if len(values) == 1 else n + 1


def scene_targets(scene: scenes.Scene, grid: int, background: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """`(local [grid*grid, len(LOCAL_HEADS)], global [len(global_heads(background))])` integer labels of
  `scene` for a `grid x grid` patch grid (grid must be the world's 3: one patch per cell)."""
  if grid != scenes.GRID:
    raise ValueError(f"supervised vision pretraining needs one patch per cell ({scenes.GRID} x "
                     f"{scenes.GRID} patches), got {grid} x {grid}")
  local = np.zeros((grid * grid, len(LOCAL_HEADS)), np.int32)
  for cell in range(grid * grid):
    local[cell, 3], local[cell, 4] = divmod(cell, grid)
  for o in scene.objects:
    cell = o.row * grid + o.col
    local[cell, 0] = scenes.SHAPES.index(o.shape) + 1
    local[cell, 1] = scenes.COLOURS.index(o.colour) + 1
    local[cell, 2] = scenes.SIZES.index(o.size) + 1
  counts = [sum(o.shape == s for o in scene.objects) for s in scenes.SHAPES]
  counts += [sum(o.colour == c for o in scene.objects) for c in scenes.COLOURS]
  counts += [len(scene.objects)]
  counts = np.minimum(np.asarray(counts, np.int32), _MAX_COUNT - 1)
  objs = scene.objects
  binding = [binding_class([scenes.COLOURS.index(o.colour) for o in objs if o.shape == s], len(scenes.COLOURS))
             for s in scenes.SHAPES]
  binding += [binding_class([o.row * grid + o.col for o in objs if o.shape == s], CELLS) for s in scenes.SHAPES]
  binding += [binding_class([scenes.SHAPES.index(o.shape) for o in objs if o.colour == c], len(scenes.SHAPES))
              for c in scenes.COLOURS]
  if background:
    binding.append(scenes.BACKGROUNDS.index(scene.background))
  return local, np.concatenate([counts, np.asarray(binding, np.int32)])


def _init_heads(key: jax.Array, width: int, background: bool = False) -> dict:
  k1, k2 = jax.random.split(key)
  n_local = sum(n for _, n in LOCAL_HEADS)
  n_global = sum(n for _, n in global_heads(background))
  return {"local_w": jax.random.normal(k1, (width, n_local)) * 0.02, "local_b": jnp.zeros(n_local),
          "global_w": jax.random.normal(k2, (width, n_global)) * 0.02, "global_b": jnp.zeros(n_global)}


def _head_losses(logits: jax.Array, labels: jax.Array, heads: Sequence[tuple[str, int]]
                 ) -> tuple[jax.Array, jax.Array]:
  """Mean CE over heads and positions, and per-head accuracy `[len(heads)]`."""
  start, losses, accs = 0, [], []
  for k, (_, n) in enumerate(heads):
    lg = logits[..., start:start + n]
    lab = labels[..., k]
    losses.append(optax.softmax_cross_entropy_with_integer_labels(lg, lab).mean())
    accs.append((jnp.argmax(lg, -1) == lab).mean())
    start += n
  return jnp.mean(jnp.stack(losses)), jnp.stack(accs)


def _features(tower: Any, pixels: jax.Array, feature_layers: tuple[int, ...], strategy: str) -> jax.Array:
  states = tower(pixels, feature_layers)
  if strategy == "default":
    states = [s[:, 1:] for s in states]
  return jnp.concatenate(states, axis=-1)


def train_vision(vlm: Any, world: Sequence[scenes.Scene], pixels: np.ndarray, *, steps: int,
                 batch_size: int, learning_rate: float, seed: int, eval_world: Sequence[scenes.Scene] = (),
                 eval_pixels: np.ndarray | None = None, background: bool = False) -> dict:
  """Train `vlm.vision_tower` in place with the probes above (`background`: also the background head);
  returns the loss curve and the probes' accuracies on `eval_world` (held out) when given."""
  cfg = vlm.cfg
  grid = cfg.vision.image_size // cfg.vision.patch_size
  width = cfg.vision.hidden_size * len(cfg.feature_layers)
  strategy = cfg.vision_feature_select_strategy
  heads_global = global_heads(background)
  labels = [scene_targets(s, grid, background) for s in world]
  local = np.stack([l for l, _ in labels])
  glob = np.stack([g for _, g in labels])
  graphdef, params, rest = nnx.split(vlm.vision_tower, nnx.Param, ...)
  heads = _init_heads(jax.random.key(seed), width, background)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(50, steps // 10 + 1),
                                                max(steps, 2))
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  trainable = {"tower": params, "heads": heads}
  opt_state = opt.init(trainable)

  def forward(tr, px):
    tower = nnx.merge(graphdef, tr["tower"], rest)
    f = _features(tower, px, cfg.feature_layers, strategy)
    h = tr["heads"]
    return f @ h["local_w"] + h["local_b"], f @ h["global_w"] + h["global_b"]

  def loss_fn(tr, px, loc, gl):
    lo, go = forward(tr, px)
    l1, a1 = _head_losses(lo, loc, LOCAL_HEADS)
    l2, a2 = _head_losses(go, jnp.broadcast_to(gl[:, None, :], go.shape[:2] + gl.shape[-1:]),
                          heads_global)
    return l1 + l2, (a1, a2)

  @jax.jit
  def step_fn(tr, st, px, loc, gl):
    (loss, accs), grads = jax.value_and_grad(loss_fn, has_aux=True)(tr, px, loc, gl)
    updates, st = opt.update(grads, st, tr)
    return optax.apply_updates(tr, updates), st, loss, accs

  eval_fn = jax.jit(loss_fn)
  history = []
  start = time.perf_counter()
  for step in range(steps):
    rng = np.random.default_rng([seed, _SALT, step])
    idx = rng.integers(len(world), size=batch_size)
    trainable, opt_state, loss, _ = step_fn(trainable, opt_state, jnp.asarray(pixels[idx]),
                                            jnp.asarray(local[idx]), jnp.asarray(glob[idx]))
    history.append({"step": step + 1, "loss": float(loss)})
  seconds = time.perf_counter() - start
  nnx.update(vlm.vision_tower, trainable["tower"])
  out: dict[str, Any] = {"steps": steps, "seconds": round(seconds, 1), "history": history}
  if len(eval_world):
    ev = [scene_targets(s, grid, background) for s in eval_world]
    _, (a1, a2) = eval_fn(trainable, jnp.asarray(eval_pixels), jnp.asarray(np.stack([l for l, _ in ev])),
                          jnp.asarray(np.stack([g for _, g in ev])))
    out["heldout_accuracy"] = {
        **{name: round(float(a), 4) for (name, _), a in zip(LOCAL_HEADS, a1)},
        "counts_mean": round(float(np.mean(np.asarray(a2)[:len(COUNT_HEADS)])), 4),
        "n_objects": round(float(a2[len(COUNT_HEADS) - 1]), 4),
        "binding_mean": round(float(np.mean(np.asarray(a2)[len(COUNT_HEADS):len(GLOBAL_HEADS)])), 4)}
    if background:
      out["heldout_accuracy"]["background"] = round(float(a2[len(GLOBAL_HEADS)]), 4)
  return out


def feature_rms(vlm: Any, pixels: np.ndarray) -> float:
  """Root-mean-square of the patch features the connector reads, over patches and channels."""
  cfg = vlm.cfg
  f = _features(vlm.vision_tower, jnp.asarray(pixels), cfg.feature_layers, cfg.vision_feature_select_strategy)
  return float(jnp.sqrt(jnp.mean(jnp.square(f))))


def normalize_feature_scale(vlm: Any, pixels: np.ndarray, target_rms: float = 1.0) -> tuple[float, float]:
  """Scale the vision tower's residual stream by one factor so the connector's inputs have RMS
  `target_rms`; returns the RMS before and after.

  Supervised training grows the pre-LN residual stream (RMS ~13 here); the connector then sees large
  inputs, and Adam's fixed-size steps on `linear_1` become a huge effective learning rate, which blows
  the projected image tokens up to ~100x the norm of word embeddings during the later CE stages. Every
  sub-layer of a CLIP layer reads the stream through a LayerNorm, so scaling the stream's sources
  (`pre_layrnorm`'s scale and bias, each layer's `out_proj` and `fc2`) by alpha scales every hidden
  state by alpha and changes nothing else (up to LayerNorm's epsilon): the probes' accuracy is kept.
  """
  before = feature_rms(vlm, pixels)
  alpha = target_rms / before
  tower = vlm.vision_tower
  for module in (tower.pre_layrnorm, tower.layers.out_proj, tower.layers.fc2):
    for name in ("scale", "kernel", "bias"):
      param = getattr(module, name, None)
      if param is not None:
        param[...] = param[...] * alpha
  return before, feature_rms(vlm, pixels)


def train_vision_cached(vlm: Any, world: Sequence[scenes.Scene], pixels: np.ndarray, cache_dir: str,
                        **kwargs: Any) -> dict:
  """`train_vision`, or (when `cache_dir` holds its result from an earlier run of the same workdir)
  the saved tower weights and report: a rerun resumes after stage 0."""
  import json
  import os

  weights, report = os.path.join(cache_dir, "tower.npz"), os.path.join(cache_dir, "report.json")
  state = nnx.state(vlm.vision_tower, nnx.Param)
  leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
  if os.path.exists(weights) and os.path.exists(report):
    with np.load(weights) as z:
      saved = [z[f"a{i}"] for i in range(len(leaves))]
    restored = jax.tree.unflatten(treedef, [jnp.asarray(a, dtype=l.dtype) for a, l in zip(saved, leaves)])
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(vlm.vision_tower, state)
    with open(report) as f:
      return json.load(f)
  out = train_vision(vlm, world, pixels, **kwargs)
  os.makedirs(cache_dir, exist_ok=True)
  leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(vlm.vision_tower, nnx.Param)))
  np.savez(weights + ".tmp.npz", **{f"a{i}": np.asarray(a) for i, a in enumerate(leaves)})
  os.replace(weights + ".tmp.npz", weights)
  with open(report, "w") as f:
    json.dump(out, f)
  return out


__all__ = ["BACKGROUND_HEADS", "BINDING_HEADS", "binding_class", "COUNT_HEADS", "GLOBAL_HEADS", "global_heads", "LOCAL_HEADS", "feature_rms", "normalize_feature_scale", "scene_targets",
           "train_vision", "train_vision_cached"]
