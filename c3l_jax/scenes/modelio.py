"""What the scenes recipes (`pretrain`, `grounded`) and the evaluator (`grounding`) share: building the
random base model, the image-feature scale, exporting a model directory, and generation / QA quality
through the pipeline's loading path (`Evaluator`, `qa_quality`)."""

from __future__ import annotations

import os
import shutil
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from c3l_jax import sampling, sharding
from c3l_jax.data import instructions as ins
from c3l_jax.data.batching import round_up
from c3l_jax.data.prompts import PromptBuilder, load_processor
from c3l_jax.models.configs import MODEL_CONFIG_FILE
from c3l_jax.scenes import checker as checker_lib
from c3l_jax.scenes import processor as sm
from c3l_jax.scenes import world as world_lib

METRICS_FILE = "training_metrics.json"


class Evaluator:
  """Generation through the pipeline's loading path (a model directory) for the quality numbers."""

  def __init__(self, model_dir: str, mesh: jax.sharding.Mesh, batch_size: int = 32,
               prompt_bucket: int = 128):
    self.model = sharding.load_model(model_dir, mesh)
    self.builder = PromptBuilder(load_processor(model_dir), self.model.cfg.image_token_id,
                                 self.model.cfg.image_seq_length)
    self.mesh = mesh
    shards = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
    self.batch_size = round_up(batch_size, shards)
    self.prompt_bucket = prompt_bucket

  def generate(self, prompts: Sequence[str], images: Sequence[Any] | None, max_new_tokens: int,
               temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Texts for chat prompts `prompts` (each with `images[i]`, or all text-only when None)."""
    encoded = [self.builder.encode_prompt(p, None if images is None else images[i])
               for i, p in enumerate(prompts)]
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                  eos_ids=self.builder.eos_ids, pad_id=self.builder.pad_id)
    out: list[str] = []
    b = self.batch_size
    for start in range(0, len(encoded), b):
      chunk = encoded[start:start + b]
      real = len(chunk)
      chunk = chunk + [chunk[0]] * (b - real)
      tokens, mask = sampling.pad_prompts([c[0] for c in chunk], self.prompt_bucket, self.builder.pad_id)
      batch = {"tokens": tokens, "mask": mask}
      if images is not None:
        batch["pixels"] = np.stack([c[1] for c in chunk])
      batch = sharding.shard_batch(batch, self.mesh)
      keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), start), b)
      toks, lengths = sampling.generate(self.model, batch["tokens"], batch["mask"], batch.get("pixels"),
                                        cfg, keys)
      out += sampling.decode_texts(self.builder.tokenizer, toks[:real], lengths[:real])
    return out


def rate(flags: Sequence[bool]) -> float | None:
  return round(float(np.mean(flags)), 4) if len(flags) else None


def qa_quality(world: Sequence[world_lib.Scene], texts: Sequence[str]) -> dict:
  """Parse rate of "Question: ... Answer: ..." outputs, and among parsed ones (`scenes.check`): the share
  image-dependent, generic, correct (of the decidable image-dependent ones) and hallucinating."""
  parsed, dependent, correct, hallucinated = [], [], [], []
  for scene, text in zip(world, texts):
    qa = ins.parse_qa(text)
    parsed.append(qa is not None)
    if qa is None:
      continue
    v = checker_lib.check(scene, qa[0], qa[1])
    dependent.append(v.image_dependent)
    if v.image_dependent and v.correct is not None:
      correct.append(bool(v.correct))
    hallucinated.append(bool(v.hallucinated))
  return {"n": len(texts), "parsed": rate(parsed), "image_dependent": rate(dependent),
          "generic": None if not dependent else round(1 - float(np.mean(dependent)), 4),
          "correct": rate(correct), "hallucinated": rate(hallucinated)}


def curve(history: Sequence[dict], key: str = "loss", points: int = 10) -> list[list[float]]:
  """`[[step, mean loss of the steps up to it since the previous point], ...]`: a compact curve."""
  if not history:
    return []
  edges = np.linspace(0, len(history), min(points, len(history)) + 1).astype(int)
  return [[int(history[e - 1]["step"]), round(float(np.mean([h[key] for h in history[s:e]])), 4)]
          for s, e in zip(edges[:-1], edges[1:]) if e > s]


def build_base(p: Any, stage_dir: str, seed: int) -> str:
  """The random HF checkpoint (WORKDIR/pretrain/hf) converted into WORKDIR/pretrain/base."""
  from c3l_jax import convert

  base = os.path.join(stage_dir, "base")
  if not os.path.exists(os.path.join(base, MODEL_CONFIG_FILE)):
    hf = os.path.join(stage_dir, "hf")
    shutil.rmtree(hf, ignore_errors=True)
    sm.build_hf_checkpoint(hf, sm.ModelSize.from_config(p), seed)
    convert.convert(hf, base)
  return base


def feature_scale(vlm: Any, pixels: np.ndarray) -> float:
  """Mean L2 norm of the projected image features of `pixels [N, C, H, W]` over the mean norm of the
  decoder's token embeddings (1 = image tokens on the scale of word tokens)."""
  feats = vlm.encode_images(jax.numpy.asarray(pixels))
  table = vlm.language_model.embed(jax.numpy.arange(vlm.cfg.text.vocab_size)[None])
  return float(jax.numpy.linalg.norm(feats, axis=-1).mean() / jax.numpy.linalg.norm(table, axis=-1).mean())


def match_feature_scale(vlm: Any, pixels: np.ndarray) -> tuple[float, float]:
  """Rescale the connector's output layer so projected image features have the norm of word embeddings.

  The CG-VLM alignment compares directions only (cosines), so it leaves the feature scale free, and
  Adam grows it (here by ~1000x): image tokens then dwarf the word embeddings in the decoder's residual
  stream and their gradients vanish. Scaling `linear_2` (kernel and bias) by one factor keeps every
  cosine, hence the alignment, unchanged. Returns the ratio before and after.
  """
  before = feature_scale(vlm, pixels)
  proj = vlm.multi_modal_projector.linear_2
  proj.kernel[...] = proj.kernel[...] / before
  if getattr(proj, "bias", None) is not None:
    proj.bias[...] = proj.bias[...] / before
  return before, feature_scale(vlm, pixels)


def publish(model_dir: str, out: str) -> None:
  """Copy `model_dir` to `out` (replacing it) through `out.partial`."""
  partial = out.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  shutil.copytree(model_dir, partial)
  shutil.rmtree(out, ignore_errors=True)
  os.replace(partial, out)
  logging.info("pretrain: wrote %s", out)


__all__ = ["METRICS_FILE", "Evaluator", "build_base", "curve", "feature_scale", "match_feature_scale",
           "publish", "qa_quality", "rate"]
