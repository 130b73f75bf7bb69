r"""The C3L generator trainer: L = ce_weight * L_r + contrastive_weight * L_c (paper, Sec. 3.3).

L_r is the token cross-entropy of VIGC-format examples (image + generation instruction -> "Question: q
Answer: a" + EOS) drawn from the top `select.top_fraction` samples by S(I2C); L_c is the contrastive
loss of eq. 3 over image groups (positive = the group's highest-S(I2C) sample, negatives = the others),
see `c3l_jax.losses`. Either weight may be 0 (the paper's ablation rows); a zero weight removes that
term from the compiled step entirely.

Functional core: the model (`LlavaVLM` + projection head ξ) is split once into trainable and frozen
states (regexes over parameter paths, `train.trainable`); the jitted step merges them, differentiates
w.r.t. the trainable state only and donates it and the optimizer state. Parameters stay in
`param_dtype` (fp32 master weights) while `dtype` sets the compute (bf16).

Determinism and resumption: batch k of the run is a pure function of (seed, k) (a fresh permutation per
epoch), so the data-iterator position is the step; the step's PRNG key is `fold_in(seed, step)`. A
checkpoint holds the trainable state, the optimizer state, the step and the loss history, so a resumed
run reproduces an uninterrupted one bit for bit.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import re
import signal
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from c3l_jax import losses, runtime, sampling, sharding
from c3l_jax.data.batching import left_pad, right_pad, round_up
from c3l_jax.data.records import BadInput, write_fault, write_text_atomic
from c3l_jax.models.llama import positions_and_mask
from c3l_jax.models.vlm import FixedImageInputs, LlavaVLM

# Shorthands accepted in `train.trainable` (any other entry is a regex searched in the parameter path,
# e.g. "language_model/layers/(q|v)_proj").
TRAINABLE_ALIASES = {
    # LLaVA's projector / MiniGPT-4's / Qwen2.5-VL's patch merger
    "connector": r"^vlm/(multi_modal_projector|llama_proj|visual/merger)/",
    "decoder": r"^vlm/language_model/",
    # MiniGPT-4's visual encoder is ViT + Q-Former; Qwen2.5-VL's blocks (its merger is the connector)
    "vision": r"^vlm/(vision_tower|qformer|visual/(patch_embed|blocks))/",
    "head": r"^head/",
    "temperature": r"^temperature/",
}


class NonFiniteError(FloatingPointError):
  """A non-finite loss or gradient; the message names the step."""


class Generator(nnx.Module):
  """What the trainer optimises: the VLM, the C3L projection head ξ and the CG-VLM temperature
  (each auxiliary part is trained only by the objective that uses it)."""

  def __init__(self, vlm: LlavaVLM, *, rngs: nnx.Rngs):
    self.vlm = vlm
    self.head = losses.ProjectionHead(vlm.cfg.text.hidden_size, param_dtype=jnp.float32, rngs=rngs)
    self.temperature = losses.CGVLMTemperature()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  learning_rate: float = 2e-5
  weight_decay: float = 1e-5
  # Whether AdamW's decay also applies to biases and normalisation weights (LLaVA's trainer, i.e.
  # transformers' `Trainer.get_decay_parameter_names`, exempts them; `decay_mask`).
  decay_norms_and_biases: bool = True
  warmup_steps: int = 0
  steps: int = 100
  grad_clip: float = 1.0
  grad_accum: int = 1
  ce_weight: float = 1.0
  contrastive_weight: float = 1.0
  tau: float = 0.1
  contrastive_denominator: str = "all"  # eq. 3's denominator: all samples (InfoNCE) | negatives only
  # The anchor h_y of eq. 3: "prompt" (the decoder's hidden states over the anchor prompt) |
  # "generated" (y generated from the anchor prompt without gradient, then the hidden states of the
  # decoder teacher-forced on y, with gradient); `anchor_max_new_tokens` bounds y, `eos_ids` end it.
  anchor: str = "prompt"
  anchor_max_new_tokens: int = 32
  eos_ids: tuple[int, ...] = ()
  trainable: tuple[str, ...] = ("connector", "decoder", "head")
  objective: str = "c3l"  # c3l (and vlit: c3l with contrastive_weight 0) | align

  @classmethod
  def from_config(cls, train: Any) -> "TrainConfig":
    aux = ("temperature",) if train.objective == "align" else ("head",)
    return cls(learning_rate=train.learning_rate, weight_decay=train.weight_decay,
               decay_norms_and_biases=train.decay_norms_and_biases,
               warmup_steps=train.warmup_steps, steps=train.steps, grad_clip=train.grad_clip,
               grad_accum=train.grad_accum, ce_weight=train.ce_weight,
               contrastive_weight=train.contrastive_weight, tau=train.tau,
               contrastive_denominator=train.contrastive_denominator, anchor=train.anchor,
               anchor_max_new_tokens=train.anchor_max_new_tokens,
               trainable=tuple(train.trainable) + aux,
               objective="align" if train.objective == "align" else "c3l")


def trainable_paths(patterns: Sequence[str]) -> Callable[[str], bool]:
  """Whether a '/'-joined parameter path of the `Generator` (`vlm/...`, `head/...`) matches one of
  `patterns` (aliases or regexes)."""
  regexes = [re.compile(TRAINABLE_ALIASES.get(p, p)) for p in patterns]
  return lambda name: any(r.search(name) for r in regexes)


def trainable_filter(patterns: Sequence[str]) -> Callable[[tuple, Any], bool]:
  """NNX filter: a parameter is trainable iff its '/'-joined path matches one of `patterns`."""
  matches = trainable_paths(patterns)

  def match(path: tuple, value: Any) -> bool:
    return isinstance(value, nnx.Param) and matches("/".join(str(k) for k in path))

  return match


def _is_norm_or_bias(path: str) -> bool:
  """Whether a '/'-joined parameter path is a bias or a normalisation layer's weight.

  transformers' rule (`Trainer.get_decay_parameter_names`: "bias" in the name, a `LayerNorm` module,
  or a module named like a norm) read on this project's module names: the leaf `bias`, `nnx.LayerNorm`'s
  `scale`, and any parameter under a module whose name holds "norm" (`input_layernorm`, `norm`,
  `norm1`, CLIP's `pre_layrnorm`, the Q-Former's `LayerNorm`) or starts with "ln_" (Qwen2.5-VL's
  merger `ln_q`, MiniGPT-4's `ln_vision`).
  """
  parts = path.split("/")
  return parts[-1] in ("bias", "scale") or any(
      "norm" in p.lower() or p.startswith("ln_") for p in parts[:-1])


def decay_mask(params: Any) -> Any:
  """The pytree of `params` with True where AdamW's weight decay applies (not on `_is_norm_or_bias`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not _is_norm_or_bias("/".join(str(getattr(k, "key", k)) for k in path)), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay and global-norm clipping; MultiSteps accumulation.

  Weight decay applies to every trained parameter, or (`decay_norms_and_biases=False`) to all but
  biases and normalisation weights, as LLaVA's trainer does."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1))
  opt = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
      optax.adamw(schedule, weight_decay=cfg.weight_decay,
                  mask=None if cfg.decay_norms_and_biases else decay_mask))
  return optax.MultiSteps(opt, cfg.grad_accum) if cfg.grad_accum > 1 else opt


def ce_loss(vlm: LlavaVLM, batch: dict) -> jax.Array:
  """L_r: next-token CE on the target tokens of `tokens [B, T]` (weights mark the targets).

  With `head_positions` / `head_weights` in the batch (`ce_batch` adds them) the LM head runs only on
  the hidden states that predict a target: the same CE terms, without the `[B, T, V]` logits of the
  prompt positions (on the bench model the head is a third of a step's matmuls).
  """
  x = vlm.embed_image_and_text(batch["tokens"], batch.get("pixels"))
  positions, mask3 = positions_and_mask(batch["mask"], batch["tokens"].shape)
  positions = batch.get("rope", positions)  # M-RoPE positions of a variable-resolution family
  hidden, _ = vlm.language_model.decode_hidden(x, positions, mask3)
  if "head_positions" in batch:
    where = batch["head_positions"]
    logits = vlm.language_model.logits(jnp.take_along_axis(hidden, where[..., None], axis=1))
    targets = jnp.take_along_axis(batch["tokens"], where + 1, axis=1)
    loss, _ = losses.token_cross_entropy(logits, targets, batch["head_weights"])
    return loss
  logits = vlm.language_model.logits(hidden[:, :-1])
  loss, _ = losses.token_cross_entropy(logits, batch["tokens"][:, 1:], batch["weights"][:, 1:])
  return loss


def generate_anchor(vlm: LlavaVLM, batch: dict, cfg: "TrainConfig") -> tuple[jax.Array, jax.Array]:
  """The anchor data y of eq. 3 (paper, Sec. 3.3: "we input an instruction along with the image into
  the model and obtain the anchor data y"): greedy continuations of the left-padded anchor prompts by
  the current parameters, without gradient. Returns `y [G, N]` and its mask (tokens before EOS)."""
  graphdef, state = nnx.split(vlm)
  frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))
  scfg = sampling.SamplingConfig(max_new_tokens=cfg.anchor_max_new_tokens, eos_ids=cfg.eos_ids)
  keys = jax.random.split(jax.random.key(0), batch["anchor_tokens"].shape[0])  # unused: greedy
  y, lengths = sampling.decode(frozen, batch["anchor_tokens"], batch["anchor_mask"],
                               batch["anchor_pixels"], keys, scfg)
  y = jax.lax.stop_gradient(y)
  return y, (jnp.arange(y.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)


def anchor_representation(model: Generator, batch: dict, cfg: "TrainConfig") -> jax.Array:
  """h_y `[G, D]` of eq. 3, by `cfg.anchor`.

  prompt     AvgPool(ReLU(ξ(·))) of the decoder's final hidden states over the anchor prompt.
  generated  y = `generate_anchor` (no gradient), then the same pooling over the hidden states at y's
             positions of the decoder teacher-forced on prompt + y (with gradient: the decoder and the
             connector learn through h_y).
  """
  vlm, lm = model.vlm, model.vlm.language_model
  tokens, mask = batch["anchor_tokens"], batch["anchor_mask"]
  if cfg.anchor == "generated":
    y, y_mask = generate_anchor(vlm, batch, cfg)
    prompt_width = tokens.shape[1]
    tokens = jnp.concatenate([tokens, y], axis=1)
    mask = jnp.concatenate([mask.astype(jnp.int32), y_mask], axis=1)
  x = vlm.embed_image_and_text(tokens, batch["anchor_pixels"])
  positions, mask3 = positions_and_mask(mask, tokens.shape)
  # A variable-resolution family's prompt anchors carry their M-RoPE positions (`anchor_rope`).
  hidden, _ = lm.decode_hidden(x, batch.get("anchor_rope", positions), mask3)
  if cfg.anchor == "generated":
    return losses.pooled_representation(model.head, hidden[:, prompt_width:], y_mask)
  return losses.pooled_representation(model.head, hidden, mask)


def contrastive_term(model: Generator, batch: dict, cfg: "TrainConfig") -> jax.Array:
  """L_c (eq. 3): anchors h_y (`anchor_representation`); samples = input embeddings."""
  lm = model.vlm.language_model
  h_anchor = anchor_representation(model, batch, cfg)
  h_samples = losses.pooled_representation(model.head, lm.embed(batch["sample_tokens"]),
                                           batch["sample_mask"])
  return losses.contrastive_loss(h_samples, batch["sample_valid"], batch["positive"], h_anchor,
                                 cfg.tau, batch["group_valid"], cfg.contrastive_denominator)


def alignment_term(model: Generator, batch: dict) -> jax.Array:
  """CG-VLM: projected patch features of each image vs the token embeddings of its caption."""
  patches = model.vlm.encode_images(batch["pixels"])
  embeddings = model.vlm.language_model.embed(batch["caption_tokens"])
  return losses.cgvlm_alignment_loss(patches, None, embeddings, batch["caption_mask"],
                                     model.temperature.log_temperature[...])


def total_loss(model: Generator, batch: dict, cfg: TrainConfig) -> tuple[jax.Array, dict]:
  """`ce_weight` x CE + `contrastive_weight` x (eq. 3 for c3l | CG-VLM alignment for align)."""
  parts = {}
  loss = jnp.zeros((), jnp.float32)
  if cfg.ce_weight:
    parts["ce"] = ce_loss(model.vlm, batch["ce"])
    loss += cfg.ce_weight * parts["ce"]
  if cfg.contrastive_weight and cfg.objective == "align":
    parts["alignment"] = alignment_term(model, batch["align"])
    loss += cfg.contrastive_weight * parts["alignment"]
  elif cfg.contrastive_weight:
    parts["contrastive"] = contrastive_term(model, batch["con"], cfg)
    loss += cfg.contrastive_weight * parts["contrastive"]
  return loss, parts


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "cfg"), donate_argnums=(1, 2))
def train_step(graphdef, trainable, opt_state, frozen, batch, *, optimizer, cfg: TrainConfig):
  """One optimisation step. Returns new trainable state, optimizer state and metrics."""

  def loss_fn(params):
    return total_loss(nnx.merge(graphdef, params, frozen), batch, cfg)

  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  return trainable, opt_state, {"loss": loss, "grad_norm": grad_norm, **parts}


class Trainer:
  """Owns the split model, the optimizer and the checkpoint manager of one training run."""

  def __init__(self, model: Generator, mesh: jax.sharding.Mesh, cfg: TrainConfig,
               checkpoint_dir: str | None = None, checkpoint_every: int = 0):
    self.mesh, self.cfg = mesh, cfg
    state = nnx.state(model)  # place every parameter (the new head included) on the mesh
    nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh)))
    self.graphdef, self.trainable, self.frozen = nnx.split(
        model, trainable_filter(cfg.trainable), ...)
    if not jax.tree.leaves(self.trainable):
      raise ValueError(f"train.trainable {cfg.trainable} matches no parameter")
    self.optimizer = make_optimizer(cfg)
    # Scalars the optimizer creates (step counts) go on the mesh too, replicated: train_step's outputs
    # are mesh-sharded, so otherwise its second call would see new input types and compile again.
    replicated = NamedSharding(mesh, P())
    self.opt_state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        jax.jit(self.optimizer.init)(self.trainable))
    self.step = 0
    self.history: list[dict[str, float]] = []
    self.checkpoint_every = checkpoint_every
    self.manager = None
    if checkpoint_dir:
      self.manager = ocp.CheckpointManager(
          checkpoint_dir if "://" in str(checkpoint_dir) else os.path.abspath(checkpoint_dir),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=2, enable_async_checkpointing=False),
          item_names=("state", "meta"))
    self._preempted = False
    self._compiled: dict[tuple, Any] = {}  # input signature -> compiled step (several processes)

  # -- checkpoints -----------------------------------------------------------------------------------
  def _state_tree(self) -> dict:
    return {"trainable": nnx.to_pure_dict(self.trainable), "opt_state": self.opt_state}

  def save(self) -> None:
    if self.manager is None or self.manager.latest_step() == self.step:
      return
    write_fault(self._step_dir(self.step))  # the disk-full test hook (`records.write_fault`)
    self.manager.save(self.step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(self._state_tree()),
        meta=ocp.args.JsonSave({"step": self.step, "history": self.history})), force=True)
    self.manager.wait_until_finished()  # every process's files are in the finalised step directory
    if jax.process_index() == 0:
      write_step_manifest(self._step_dir(self.step))

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.manager.directory) / str(step)

  def restore_latest(self) -> bool:
    """Resume from the newest checkpoint, if any; returns whether one was found.

    The step's files are checked against the manifest written after it was saved
    (`check_step_manifest`); a step with a file missing or cut short, or one orbax cannot restore,
    is refused with a `BadInput` naming the file and the step directory to delete (the rerun then
    resumes from the step before, or from the start)."""
    if self.manager is None:
      return False
    self.manager.reload()  # the steps on disk now (a damaged one may have been deleted)
    step = self.manager.latest_step()
    if step is None:
      return False
    step_dir = self._step_dir(step)
    earlier = [s for s in self.manager.all_steps() if s < step]
    remedy = (f"; delete {os.fspath(step_dir)} and rerun with the same --workdir to resume from "
              f"{f'step {max(earlier)}' if earlier else 'the start'}")
    problem = check_step_manifest(step_dir)
    if problem:
      raise BadInput(f"checkpoint step {step} is incomplete: {problem}{remedy}")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self._state_tree())
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore raise many kinds)
      first = (str(e).strip().splitlines() or [""])[0][:300]
      raise BadInput(f"checkpoint {os.fspath(step_dir)} cannot be restored ({type(e).__name__}: "
                     f"{first}){remedy}") from e
    nnx.replace_by_pure_dict(self.trainable, restored["state"]["trainable"])
    self.opt_state = restored["state"]["opt_state"]
    self.step = int(restored["meta"]["step"])
    self.history = list(restored["meta"]["history"])
    logging.info("resumed training from step %d", self.step)
    return True

  # -- loop ------------------------------------------------------------------------------------------
  def run(self, batches: Callable[[int], dict]) -> list[dict[str, float]]:
    """Train until `cfg.steps`; `batches(k)` returns step k's host batch (a pure function of k).

    Saves every `checkpoint_every` steps, at the end, and when SIGTERM arrives (then raises
    `SystemExit(143)` after saving). With several processes a SIGTERM to any of them reaches all:
    jax's preemption service (started by `jax.distributed.initialize`, which takes SIGTERM) picks the
    step at which every process saves (`multihost_utils.reached_preemption_sync_point`), so they write
    one checkpoint together and all exit. Raises `NonFiniteError` naming the step on a NaN/inf loss or
    gradient, before the bad update is kept.
    """
    multihost = jax.process_count() > 1
    previous = None if multihost else signal.signal(signal.SIGTERM, self._on_sigterm)
    rt = runtime.get()
    rt.training = True  # a preemption notice now means: save at the agreed step (not `Preempted`)
    if rt.preempted_at is not None and not multihost:
      self._preempted = True  # the notice came before training started: save at once and stop
    bar = tqdm.tqdm(total=self.cfg.steps, initial=self.step, desc="train", unit="step",
                    disable=self.step >= self.cfg.steps or jax.process_index() > 0)
    # The next step's host batch (images decoded) is built on a thread while this step runs.
    prefetch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="train-batches")
    upcoming = prefetch.submit(batches, self.step) if self.step < self.cfg.steps else None
    try:
      while self.step < self.cfg.steps:
        host = upcoming.result()
        upcoming = (prefetch.submit(batches, self.step + 1) if self.step + 1 < self.cfg.steps
                    else None)
        batch = sharding.shard_batch(host, self.mesh)
        with jax.set_mesh(self.mesh):  # activations stay row-sharded (`layers.batch_sharded`)
          trainable, opt_state, metrics = self._step_for(batch, multihost)(
              self.trainable, self.opt_state, self.frozen, batch)
        metrics = {k: float(v) for k, v in metrics.items()}
        if not all(np.isfinite(v) for v in metrics.values()):
          raise NonFiniteError(f"non-finite loss or gradient at step {self.step}: {metrics}")
        self.trainable, self.opt_state = trainable, opt_state
        self.step += 1
        self.history.append({"step": self.step, **metrics})
        logging.log_every_n_seconds(logging.INFO, "train step %d: %s", 10, self.step, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.3f}", refresh=False)
        runtime.get().check("train:step")  # another process failed? (and the C3L_FAULT test hook)
        if (multihost_utils.reached_preemption_sync_point(self.step) if multihost
            else self._preempted):
          logging.warning("SIGTERM: saving a checkpoint at step %d, then stopping", self.step)
          self.save()
          raise SystemExit(143)
        if self.checkpoint_every and self.step % self.checkpoint_every == 0:
          self.save()
      self.save()
      return self.history
    finally:
      prefetch.shutdown(wait=True, cancel_futures=True)
      bar.close()
      rt.training = False
      if previous is not None:
        signal.signal(signal.SIGTERM, previous)

  def _step_for(self, batch: dict, multihost: bool) -> Callable:
    """`train_step` for this batch: `(trainable, opt_state, frozen, batch) -> (trainable, opt_state,
    metrics)`.

    With several processes each new signature (batch shapes, state shardings: the optimizer state's
    change after the first step) is compiled ahead of time and the processes meet at a barrier before
    its first run: a process still compiling when another starts the step's
    collectives could leave it waiting longer than the collective backend's rendezvous allows (gloo,
    on CPU: 30 s). Every process sees the same shapes (batches are padded to the global batch's
    widths), so they pass the same barriers.
    """
    if not multihost:
      return functools.partial(train_step, self.graphdef, optimizer=self.optimizer, cfg=self.cfg)
    key = tuple((x.shape, x.dtype, x.sharding)
                for x in jax.tree.leaves((self.trainable, self.opt_state, batch)))
    if key not in self._compiled:
      self._compiled[key] = train_step.lower(
          self.graphdef, self.trainable, self.opt_state, self.frozen, batch, optimizer=self.optimizer,
          cfg=self.cfg).compile()
      runtime.get().barrier(f"train:compiled:{len(self._compiled)}")
    return self._compiled[key]

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint after the current step")
    self._preempted = True

  def model(self) -> Generator:
    return nnx.merge(self.graphdef, self.trainable, self.frozen)


# -- checkpoint completeness -------------------------------------------------------------------------

STEP_MANIFEST = "c3l_files.json"


def write_step_manifest(step_dir: epath.Path) -> None:
  """List every file of a finalised orbax step directory with its byte count, in the step directory
  (`c3l_files.json`, atomically). Byte counts, not checksums: a step of a 7B model is tens of GB, and
  the damage this finds is a copy or sync cut short (a file missing or shorter), which orbax's own
  commit marker cannot show once the step has been finalised."""
  files, folders = {}, [step_dir]
  while folders:  # epath's rglob refuses `**` (one listing per folder on GCS is fine here)
    for path in folders.pop().iterdir():
      if path.is_dir():
        folders.append(path)
      elif path.name != STEP_MANIFEST:
        files[os.fspath(path.relative_to(step_dir))] = path.stat().length
  files = dict(sorted(files.items()))
  write_text_atomic(step_dir / STEP_MANIFEST, json.dumps({"files": files}, indent=0) + "\n")


def check_step_manifest(step_dir: epath.Path) -> str | None:
  """Why the step's files differ from its manifest (None: they match, or there is no manifest -- a
  step saved by an older version, or one whose process died between orbax's finalisation and the
  manifest: orbax's restore is then the only check)."""
  try:
    listed = json.loads((step_dir / STEP_MANIFEST).read_text())["files"]
  except FileNotFoundError:
    return None
  except (ValueError, KeyError, TypeError):
    return f"{os.fspath(step_dir / STEP_MANIFEST)} is damaged"
  for name, size in listed.items():
    path = step_dir / name
    if not path.exists():
      return f"{os.fspath(path)} is missing"
    if path.stat().length != size:
      return f"{os.fspath(path)} is {path.stat().length} bytes, the step's manifest says {size}"
  return None


# -- host-side batches -----------------------------------------------------------------------------

def epoch_order(n: int, step: int, batch: int, seed: int) -> np.ndarray:
  """Indices of step `step`'s batch of size `batch` over `n` items: a fresh permutation per epoch."""
  per_epoch = max(1, n // batch) if n >= batch else 1
  epoch, k = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  idx = perm[k * batch:(k + 1) * batch]
  if len(idx) < batch:  # fewer items than a batch: wrap around deterministically
    idx = np.resize(perm, batch)
  return idx


PixelFn = Callable[[Any], np.ndarray]
HEAD_BUCKET = 16


def _pixels(item: dict, pixels: PixelFn | None) -> np.ndarray:
  """An example's / group's pixels `[C, H, W]`: its own `pixels`, else `pixels(item["image"])` (the
  image decoded when the batch needs it)."""
  if item.get("pixels") is not None:
    return item["pixels"]
  if pixels is None:
    raise ValueError("an example names an `image` but no pixel function was given")
  return pixels(item["image"])


def _has_image(item: dict) -> bool:
  return item.get("pixels") is not None or item.get("image") is not None


def arrange_pictures(items: Sequence[dict]) -> list[dict | None]:
  """The pictures of a global batch's rows, in the order the model reads them.

  `embed_image_and_text` gives the k-th image placeholder of the batch the k-th picture's features, so
  the pictures of the rows whose prompt holds the image come first, in row order, and each text-only
  row (a prompt without the image, e.g. two-step's QA-from-caption prompt) adds a blank at the end
  that no placeholder reads: `[item with an image, ..., None, ...]`, one entry per row. With every row
  holding the image this is the rows themselves.
  """
  with_image = [item for item in items if _has_image(item)]
  return with_image + [None] * (len(items) - len(with_image))


def _stack_pictures(pictures: Sequence[dict | None], pixels: PixelFn | None,
                    blank: Callable[[], np.ndarray]) -> np.ndarray:
  return np.stack([blank() if p is None else _pixels(p, pixels) for p in pictures])


def ce_batch(examples: Sequence[dict], pad_id: int, bucket: int = 32, width: int = 0,
             pixels: PixelFn | None = None, head_width: int = 0,
             pictures: Sequence[dict | None] | None = None,
             blank: Callable[[], np.ndarray] | None = None, images: Any = None) -> dict:
  """Right-padded prompt+target sequences; `weights` = 1 on target tokens (prompt/padding masked);
  `head_positions [B, W]` the positions predicting a target (`W` a multiple of `HEAD_BUCKET`),
  `head_weights [B, W]` 1 where such a position is real. `width` / `head_width`: the padded lengths
  (default: the longest in `examples`, rounded up to `bucket` / `HEAD_BUCKET`). `pictures`: the
  batch's pixel rows (`arrange_pictures`, None entries filled by `blank()`) when some examples are
  text-only; default: every example's own picture, or none when the first example has none.
  `images`: how pictures enter the model (`models.vlm.image_inputs`; default stacked); a
  variable-resolution family's batch also holds `rope`, the M-RoPE positions `[B, T, 3]`."""
  seqs = [list(e["prompt"]) + list(e["target"]) for e in examples]
  tokens, mask = right_pad(seqs, width or round_up(max(map(len, seqs)), bucket), pad_id)
  weights = np.zeros_like(mask, dtype=np.float32)
  for i, e in enumerate(examples):
    weights[i, len(e["prompt"]):len(e["prompt"]) + len(e["target"])] = 1.0
  # The positions whose next-token prediction is a target (the LM head's rows), padded to a bucket.
  heads = [np.flatnonzero(w[1:]) for w in weights]
  head_width = head_width or round_up(max(max(map(len, heads)), 1), HEAD_BUCKET)
  head_positions = np.zeros((len(examples), head_width), np.int32)
  head_weights = np.zeros((len(examples), head_width), np.float32)
  for i, h in enumerate(heads):
    head_positions[i, :len(h)], head_weights[i, :len(h)] = h, 1.0
  out = {"tokens": tokens, "mask": mask, "weights": weights, "head_positions": head_positions,
         "head_weights": head_weights}
  if pictures is not None:
    out["pixels"] = _stack_pictures(pictures, pixels, blank)
  elif _has_image(examples[0]):
    images = images or FixedImageInputs()
    own = [_pixels(e, pixels) for e in examples]
    out["pixels"] = images.batch(own)
    if images.variable:
      out["rope"] = images.rope_positions(tokens, mask, own)
  return out


def contrastive_batch(groups: Sequence[dict], pad_id: int, max_samples: int, bucket: int = 32,
                      widths: tuple[int, int] | None = None, pixels: PixelFn | None = None,
                      pictures: Sequence[dict | None] | None = None,
                      blank: Callable[[], np.ndarray] | None = None, left_pad_anchor: bool = False,
                      images: Any = None) -> dict:
  """Image groups -> anchors `[G, Ta]` + pixels, samples `[G, N, Ts]`, positive index, validity.
  `widths`: the padded (anchor, sample) lengths (default: the longest, rounded up to `bucket`).
  `pictures` / `blank`: as in `ce_batch`, for groups whose anchor prompt is text-only.
  `left_pad_anchor`: left-pad the anchor prompts (they are generated from: `anchor="generated"`)."""
  anchor_width, width = widths or _group_widths(groups, bucket)
  anchor_tokens, anchor_mask = (left_pad if left_pad_anchor else right_pad)(
      [g["prompt"] for g in groups], anchor_width, pad_id)
  sample_tokens = np.full((len(groups), max_samples, width), pad_id, np.int32)
  sample_mask = np.zeros((len(groups), max_samples, width), np.int32)
  sample_valid = np.zeros((len(groups), max_samples), bool)
  for gi, g in enumerate(groups):
    for si, s in enumerate(g["samples"][:max_samples]):
      sample_tokens[gi, si, :len(s)], sample_mask[gi, si, :len(s)] = s, 1
      sample_valid[gi, si] = True
  extra = {}
  if pictures is not None:
    anchor_pixels = _stack_pictures(pictures, pixels, blank)
  else:
    images = images or FixedImageInputs()
    own = [_pixels(g, pixels) for g in groups]
    anchor_pixels = images.batch(own)
    if images.variable:
      extra["anchor_rope"] = images.rope_positions(anchor_tokens, anchor_mask, own)
  return {"anchor_tokens": anchor_tokens, "anchor_mask": anchor_mask, **extra,
          "anchor_pixels": anchor_pixels,
          "sample_tokens": sample_tokens, "sample_mask": sample_mask, "sample_valid": sample_valid,
          "positive": np.asarray([g["positive"] for g in groups], np.int32),
          "group_valid": np.asarray([len(g["samples"]) >= 2 for g in groups])}


def _group_widths(groups: Sequence[dict], bucket: int) -> tuple[int, int]:
  return (round_up(max(len(g["prompt"]) for g in groups), bucket),
          round_up(max(len(s) for g in groups for s in g["samples"]), bucket))


def _my_rows(idx: np.ndarray, process: tuple[int, int]) -> np.ndarray:
  """Process `index` of `count`'s block of a global batch's rows (where
  `jax.make_array_from_process_local_data` puts it on a mesh laid out over processes in order)."""
  index, count = process
  if len(idx) % count:
    raise ValueError(f"the global batch of {len(idx)} rows does not divide over {count} processes")
  rows = len(idx) // count
  return idx[index * rows:(index + 1) * rows]


def batch_fn(ce_examples: Sequence[dict], groups: Sequence[dict], cfg: TrainConfig, batch_size: int,
             group_batch: int, max_samples: int, pad_id: int, seed: int,
             process: tuple[int, int] | None = None, pixels: PixelFn | None = None,
             images: Any = None) -> Callable[[int], dict]:
  """`step -> this process's rows of the global batch`, deterministic in (seed, step).

  `batch_size` / `group_batch` are global; process `index` of `count` (default: jax's) builds only its
  block of rows, padded to the widths of the whole global batch so that every process's block has the
  same shape. With one process this is the whole batch. Examples / groups carry their `pixels`, or name
  an `image` that `pixels(image)` decodes when a batch needs it (so host memory holds a batch of
  pictures, not the data set's).
  """
  process = process or (jax.process_index(), jax.process_count())
  # When some prompts hold the image and others do not (`train.inputs=as_generated` on two-step data:
  # text-only QA prompts, caption prompts with the image), every batch gets pixels, in
  # `arrange_pictures` order; a text-only row's blank is zeros of the first picture's shape.
  any_image = any(map(_has_image, (*ce_examples, *groups)))
  mixed = {name: any_image and not all(map(_has_image, items))
           for name, items in (("ce", ce_examples), ("con", groups))}
  blank_cache: list[np.ndarray] = []

  def blank() -> np.ndarray:
    if not blank_cache:
      first = next(item for item in (*ce_examples, *groups) if _has_image(item))
      blank_cache.append(np.zeros_like(_pixels(first, pixels)))
    return blank_cache[0]

  def pictures(name: str, items: Sequence[dict]) -> list[dict | None] | None:
    """This process's block of the global batch's pixel rows (None: each row's own picture)."""
    if not mixed[name]:
      return None
    arranged = arrange_pictures(items)
    return [arranged[i] for i in _my_rows(np.arange(len(items)), process)]

  def make(step: int) -> dict:
    batch = {}
    idx = epoch_order(len(ce_examples), step, batch_size, seed)
    mine = _my_rows(idx, process)
    if cfg.ce_weight:
      width = round_up(max(len(ce_examples[i]["prompt"]) + len(ce_examples[i]["target"]) for i in idx),
                       32)
      # Every process pads its rows to the global batch's widths: the same shapes everywhere.
      head_width = round_up(max(max(len(ce_examples[i]["target"]) for i in idx), 1), HEAD_BUCKET)
      batch["ce"] = ce_batch([ce_examples[i] for i in mine], pad_id, width=width, pixels=pixels,
                             head_width=head_width, blank=blank, images=images,
                             pictures=pictures("ce", [ce_examples[i] for i in idx]))
    if cfg.contrastive_weight and cfg.objective == "align":  # captions of the same images
      tokens, mask = right_pad([ce_examples[i]["caption"] for i in mine],
                               round_up(max(len(ce_examples[i]["caption"]) for i in idx), 32), pad_id)
      batch["align"] = {"pixels": np.stack([_pixels(ce_examples[i], pixels) for i in mine]),
                        "caption_tokens": tokens, "caption_mask": mask}
    elif cfg.contrastive_weight:
      idx = epoch_order(len(groups), step, group_batch, seed + 1)
      batch["con"] = contrastive_batch([groups[i] for i in _my_rows(idx, process)], pad_id,
                                       max_samples, widths=_group_widths([groups[i] for i in idx], 32),
                                       pixels=pixels, blank=blank, images=images,
                                       pictures=pictures("con", [groups[i] for i in idx]),
                                       left_pad_anchor=cfg.anchor == "generated")
    return batch

  return make


__all__ = ["Generator", "NonFiniteError", "TrainConfig", "Trainer", "batch_fn", "ce_batch",
           "contrastive_batch", "decay_mask", "epoch_order", "make_optimizer", "train_step",
           "trainable_filter", "trainable_paths"]
