"""What the model stages share: one loaded model per process, batched text generation, stage inputs.

Inference stages (`initial`, `score`, `final`, `eval`) are data-parallel over processes: each process
loads the model on a mesh of its *local* devices (`config.inference.mesh`) and takes the shards
`runtime.get().my_shards(...)` gives it, so hosts never wait on each other until the stage's end (a
`barrier`). Generation is deterministic per row: every row's PRNG key is derived
from (seed, stage, shard, row), never from the batch it happens to land in. `Progress` is every
sharded stage's tqdm bar and per-shard log line.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from etils import epath

from c3l_jax import console, runtime, sampling, sharding
from c3l_jax.data.batching import round_up
from c3l_jax.data.prompts import PromptBuilder, load_processor
from c3l_jax.data.records import BadInput, read_records
from c3l_jax.data.sources import ImageSource, open_source
from c3l_jax.models.vlm import image_inputs
from c3l_jax.pipeline import shards

# Salts that keep the stages' random streams apart.
SALTS = {"initial": 1, "final": 2, "eval": 3, "select": 4}


class Progress:
  """A stage's tqdm bar over its items (items/s, tokens/s where the stage counts tokens, ETA) and an
  absl log line per finished shard. Use as a context manager; `shard_done` after each shard."""

  def __init__(self, stage: str, total: int, unit: str):
    self.stage, self.tokens, self.start = stage, 0, time.perf_counter()
    self.bar = tqdm.tqdm(total=total, desc=stage, unit=unit, disable=not console.is_lead())

  def shard_done(self, index: int, items: int, tokens: int | None = None, **counts: int) -> None:
    """Shard `index` of `items` items finished; `counts` (name=number) go to the log line."""
    self.bar.update(items)
    if tokens is not None:
      self.tokens += tokens
      self.bar.set_postfix(tok_s=f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):.0f}")
      counts = {**counts, "tokens": tokens}
    logging.info("%s: shard %d done (%s)", self.stage, index,
                 ", ".join(f"{n} {name}" for name, n in counts.items()))
    runtime.get().check(f"{self.stage.split(':')[0]}:shard")  # stop if another process failed

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.bar.close()


def row_keys(seed: int, stage: str, shard: int, rows: Sequence[int]) -> jax.Array:
  """`[len(rows)]` PRNG keys, a pure function of (seed, stage, shard, row)."""
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), SALTS[stage]), shard)
  return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(np.asarray(rows, np.uint32)))


def stage_done(workdir: str, stage: str) -> bool:
  """Whether `stage` finished in `workdir` (`run_stages` writes WORKDIR/<stage>/DONE.json)."""
  return (epath.Path(workdir) / stage / "DONE.json").exists()


def input_stage(config: Any, workdir: str, previous: Sequence[str]) -> str | None:
  """The stage of `previous` (searched in order) whose output this stage reads, or None for
  `config.data.records`.

  A stage of `previous` that runs in this job (`config.stages`) or has started in this workdir must have
  finished: reading anything else (a later stage, `data.records`) would silently change the run's data,
  so that is a `BadInput`. A stage neither run nor started is skipped; with none left, the input is
  `config.data.records` (`--config.stages=score --config.data.records=FILE`), which must be set.
  """
  from c3l_jax.pipeline import parse_stages  # the package imports this module lazily
  running = parse_stages(config.stages)
  for stage in previous:
    if stage_done(workdir, stage):
      return stage
    if stage in running or (epath.Path(workdir) / stage).exists():
      raise BadInput(f"the input of this stage, WORKDIR/{stage}, is not finished ({stage}/DONE.json is "
                     f"missing in {workdir}): run the {stage} stage to its end first")
  if not config.data.records:
    raise BadInput(f"no input: none of the stages {', '.join(previous) or '(none)'} ran in this workdir "
                   "and config.data.records is not set")
  return None


def stage_input(config: Any, workdir: str, previous: Sequence[str],
                required: Sequence[str] = ("id", "image", "question", "answer")
                ) -> tuple[list[dict], list[dict], str]:
  """Records of `input_stage(config, workdir, previous)`, or of `data.records` when it is None.

  Returns `(records, rejected lines, where they came from)`; records from a stage's own output are
  trusted, `data.records` lines are checked (bad ones come back as rejections, or raise under strict).
  """
  stage = input_stage(config, workdir, previous)
  if stage is not None:
    return shards.read_parts(os.path.join(workdir, stage)), [], f"WORKDIR/{stage}"
  records, rejected = read_records(config.data.records, required=required, strict=config.strict)
  return records, rejected, config.data.records


def model_runtime(config: Any) -> dict[str, Any]:
  """The run's model settings that are not architecture (`models.configs.RUNTIME_FIELDS`)."""
  m = config.model
  return dict(dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat=m.remat,
              attention=m.attention)


class Inference:
  """A model loaded for generation / scoring on this process's devices, with its prompt builder."""

  def __init__(self, config: Any, checkpoint: str | None = None, split: str | None = None,
               sampling: dict[str, float] | None = None):
    self.config = config
    self.sampling = dict(sampling or {})  # overrides of generation.temperature / top_p / top_k
    self.checkpoint = checkpoint or config.model.checkpoint
    self.mesh = sharding.make_mesh(config.inference.mesh, devices=jax.local_devices())
    self.model = sharding.load_model(self.checkpoint, self.mesh, **model_runtime(config))
    self.builder = PromptBuilder(
        load_processor(self.checkpoint, config.model.get("min_pixels", 0), config.model.get("max_pixels", 0)),
        self.model.cfg.image_token_id, self.model.cfg.image_seq_length)
    # How pictures enter the model: stacked (fixed-size families) or packed with host-computed M-RoPE
    # positions (Qwen2.5-VL); `c3l_jax.models.vlm.image_inputs`.
    self.images = image_inputs(self.model.cfg)
    self.source: ImageSource = open_source(config, self.builder, split)
    shards = int(np.prod([self.mesh.shape[a] for a in sharding.BATCH_AXES]))
    self.batch_rows = round_up(config.data.batch_size, shards)
    self.max_len = self.model.cfg.text.max_position_embeddings
    logging.info("loaded %s on %d local device(s), mesh %s", self.checkpoint, len(jax.local_devices()),
                 dict(self.mesh.shape))

  @property
  def stop_strings(self) -> tuple[str, ...]:
    return tuple(getattr(self.builder, "stop_strings", ()))

  def sampling_config(self, max_new_tokens: int) -> sampling.SamplingConfig:
    gen = {k: self.config.generation[k] for k in ("temperature", "top_k", "top_p")}
    gen.update(self.sampling)
    return sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=gen["temperature"],
                                   top_k=gen["top_k"], top_p=gen["top_p"], eos_ids=self.builder.eos_ids,
                                   stop_sequences=self.builder.stop_sequences,
                                   pad_id=self.builder.pad_id)

  def generate(self, prompts: Sequence[list[int]], pixels: Sequence[np.ndarray] | None,
               keys: jax.Array, max_new_tokens: int, expected: Sequence[float] | None = None
               ) -> tuple[list[str], int]:
    """Texts generated for `prompts` (all with an image, `pixels[i]`, or all text-only).

    `generation.batching = continuous` (default): `batch_rows` decode slots, a finished row's slot
    taking the next prompt (`sampling.generate_many`); `static`: batches of `batch_rows` rows (the last
    one padded with copies of the first prompt), each decoding until its longest row ends. Prompts are
    left-padded to a multiple of `generation.prompt_bucket`, so shapes come from a small fixed set.
    `expected`: a hint of each prompt's output length (e.g. long for detailed descriptions); continuous
    batching admits the longest first, so no long row starts late and runs on alone at the end.
    The outputs are the same either way. Returns the texts (cut at EOS and the builder's stop
    strings) and the number of generated tokens.
    """
    cfg = self.sampling_config(max_new_tokens)
    bucket = self.config.generation.prompt_bucket
    variable = pixels is not None and self.images.variable

    def images(idx, tokens, mask):
      pictures = [pixels[i] for i in idx]
      return self.images.batch(pictures), self.images.rope_positions(tokens, mask, pictures)

    if self.config.generation.get("batching", "continuous") == "continuous":
      out, lengths, occupancy = sampling.generate_many(
          self.model, prompts, pixels, cfg, keys, slots=self.batch_rows, bucket=bucket,
          order=None if expected is None else sampling.longest_first(expected),
          place=lambda batch: sharding.shard_batch(batch, self.mesh),
          images=images if variable else None)
      logging.info("generated %d rows in %d slots: %d decode steps, %.0f%% of slot-steps idle, "
                   "%d prefills", len(prompts), self.batch_rows, occupancy.decode_steps,
                   100 * occupancy.wasted, occupancy.prefills)
      texts = sampling.decode_texts(self.builder.tokenizer, out, lengths, self.stop_strings)
      return texts, int(lengths.sum())
    texts: list[str] = []
    n_tokens = 0
    b = self.batch_rows
    for start in range(0, len(prompts), b):
      chunk = list(prompts[start:start + b])
      real = len(chunk)
      chunk += [chunk[0]] * (b - real)
      tokens, mask = sampling.pad_prompts(chunk, bucket, self.builder.pad_id)
      batch = {"tokens": tokens, "mask": mask}
      rope = None
      if pixels is not None:
        px = list(pixels[start:start + b])
        px += [px[0]] * (b - real)
        if not variable:
          batch["pixels"] = self.images.batch(px)
      k = keys[start:start + b]
      if real < b:
        k = jnp.concatenate([k, jnp.broadcast_to(k[:1], (b - real,) + k.shape[1:])])
      batch = sharding.shard_batch(batch, self.mesh)
      if variable:  # packed patches are not split by rows: they stay whole on every device
        batch["pixels"] = self.images.batch(px)
        rope = self.images.rope_positions(tokens, mask, px)
      with jax.set_mesh(self.mesh):  # activations stay row-sharded (`layers.batch_sharded`)
        out, lengths = sampling.generate(self.model, batch["tokens"], batch["mask"],
                                         batch.get("pixels"), cfg, k, rope)
      texts += sampling.decode_texts(self.builder.tokenizer, out[:real], lengths[:real],
                                     self.stop_strings)
      n_tokens += int(lengths[:real].sum())
    return texts, n_tokens


__all__ = ["Inference", "Progress", "input_stage", "row_keys", "stage_done", "stage_input"]
