"""The scenes testbed's training recipes: a tiny LLaVA-1.5-architecture model from scratch on the world.

    python -m c3l_jax.scenes.pretrain [--config=configs/scenes_pretrain.py] [--workdir=DIR] \
        [--config.pretrain.out=DIR] [--config.pretrain.grounded.steps=N ...]
    # writes checkpoints/scenes_tiny and checkpoints/scenes_student

This is how the shipped generator `checkpoints/scenes_tiny` (the default `model.checkpoint` of the
scenes demo) and the ablation's student `checkpoints/scenes_student` are made; everything is a function
of `config.seed` and `config.pretrain`. The default `pretrain.recipe` is "grounded"
(`c3l_jax.scenes.grounded`, whose docstring describes it); the rest of this docstring is the old recipe,
`recipe="mix"`, kept for comparison (docs/scenes.md):

1. **Build.** The world's processor (`c3l_jax.scenes.processor`: word-level tokenizer, CLIP image
   processor at 64 px, LLaVA-1.5 chat template) and a random `transformers.LlavaForConditionalGeneration`
   of the configured size, saved as a transformers checkpoint (WORKDIR/pretrain/hf) and converted with
   `c3l_jax.convert` (WORKDIR/pretrain/base), exactly as a downloaded LLaVA would be.
2. **Stage 1a, CG-VLM alignment** (`train.objective = align`, CE weight `align_ce_weight`, 0 by
   default): the contrastive alignment between pooled projected patches and the caption's token
   embeddings (`c3l_jax.train.alignment_term`) trains the connector and, since this CLIP is random
   rather than pretrained, the vision tower. The alignment is scale-free, so the connector's output
   layer is then rescaled to give image tokens the norm of word embeddings (`match_feature_scale`).
   **Stage 1b, captioning**: captioning CE (+ a little alignment) with the decoder trained too, so the
   from-scratch decoder learns to read the image before the instruction mix.
3. **Stage 2, instruction tuning** (CE; connector, decoder and vision tower): each step's batch is one
   task, drawn with the configured weights. With the image: captions (`CAPTION_INSTRUCTIONS`),
   VIGC "generate a question and answer it" samples (`VIGC_INSTRUCTIONS` -> `Question: q Answer: a`),
   VQA (grounded questions; half with LLaVA's "Answer the question using a single word or phrase."
   and a short answer), generic questions asked about an image. Text only: the two-step prompt
   `qa_from_caption_prompt(caption, instruction)` -> `Question: q Answer: a`, and generic chat. In the
   VIGC and QA-from-caption data a share `pretrain.p_generic` of the QA is generic (true for any
   image, `scenes.generic_qa`): the language prior that C3L's content-relevance score should filter.
4. **Export and measure.** The model is saved as a model directory (`export_generator`: params,
   `c3l_model.json`, the processor files) and measured through the pipeline's own loading path
   (`sharding.load_model`, `PromptBuilder(load_processor(...))`) on held-out scenes (`evaluate`): VQA
   accuracy (with and without the image), POPE-style existence accuracy, how often VIGC and
   QA-from-caption outputs parse as `Question: ... Answer: ...`, and among parsed QA the share that is
   image-dependent / correct / hallucinating (`scenes.check`). The loss curves and these numbers go to
   `training_metrics.json` in the model directory and to WORKDIR/metrics.json; the directory is then
   copied to `pretrain.out`.

Resumable: the training phases checkpoint under WORKDIR/pretrain/stage{1,1b,2}/checkpoints (a rerun
with the same `--workdir` resumes; batches are pure functions of (seed, step)). The metrics also go to
WORKDIR/metrics.json (`{"pretrain": ...}`); library logs to WORKDIR/logs/run.log (`c3l_jax.console`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from c3l_jax import console, runtime, sharding
from c3l_jax import train as trainer_lib
from c3l_jax.data import instructions as ins
from c3l_jax.data.batching import right_pad
from c3l_jax.data.prompts import VIGC_INSTRUCTIONS, PromptBuilder, load_processor, vigc_target
from c3l_jax.data.records import BadInput
from c3l_jax.scenes import checker as checker_lib
from c3l_jax.scenes import processor as sm
from c3l_jax.scenes import text as text_lib
from c3l_jax.scenes import world as world_lib
from c3l_jax.scenes.modelio import (METRICS_FILE, Evaluator, build_base, curve, feature_scale,  # noqa: F401
                                     match_feature_scale, publish, qa_quality, rate as _rate)

IMAGE_TASKS = ("caption", "vigc", "vqa", "generic_image")  # mixed in the short image batches
TEXT_TASKS = ("caption_qa", "chat")  # mixed in the text-only batches
BATCH_KINDS = ("image", "detail", "text")  # detail: VIGC detailed_description samples (long)
CAPTION_LEN = 64  # caption tokens of the alignment loss (captions are ~10-40 tokens)
_SALT_STAGE1, _SALT_STAGE2, _SALT_EVAL = 11, 12, 13
_SHORT_VIGC_TYPES = tuple(t for t in ins.INSTRUCTION_TYPES if t != "detailed_description")


# ----------------------------------------------------------------------------------------- examples


class ExampleMaker:
  """Encodes training examples (prompt ids, target ids + EOS, pixels) through the model's own prompts.

  Prompt ids of image prompts do not depend on the image (every scene has the same size), so they are
  cached per text; pixels come from `pixels[scene_index]`.
  """

  def __init__(self, builder: PromptBuilder, world: Sequence[world_lib.Scene], pixels: np.ndarray,
               p_generic: float, p_short: float):
    self.builder, self.world, self.pixels = builder, world, pixels
    self.p_generic, self.p_short = p_generic, p_short
    self.prompt = sm.PromptIds(builder, world[0])

  def target(self, text: str) -> list[int]:
    return self.builder.encode_answer(text) + list(self.builder.eos_ids)

  def example(self, task: str, index: int, rng: np.random.Generator) -> dict:
    """One example of `task` for scene `index` (text-only tasks ignore the pixels)."""
    scene = self.world[index]
    px = self.pixels[index]
    if task == "caption":
      instruction = ins.CAPTION_INSTRUCTIONS[int(rng.integers(len(ins.CAPTION_INSTRUCTIONS)))]
      caption = text_lib.captions(scene, rng, 1)[0]
      return {"prompt": self.prompt(instruction, True), "target": self.target(caption), "pixels": px}
    if task in ("vigc", "vigc_detail"):
      kind = ("detailed_description" if task == "vigc_detail" else
              _SHORT_VIGC_TYPES[int(rng.integers(len(_SHORT_VIGC_TYPES)))])
      q, a, _ = sm.vigc_qa(scene, kind, rng, self.p_generic)
      return {"prompt": self.prompt(VIGC_INSTRUCTIONS[kind], True),
              "target": self.target(vigc_target(q, a)), "pixels": px}
    if task == "vqa":
      q, a = sm.vqa_qa(scene, rng, self.p_short)
      return {"prompt": self.prompt(q, True), "target": self.target(a), "pixels": px}
    if task == "generic_image":
      q, a = sm.generic_chat(rng)
      return {"prompt": self.prompt(q, True), "target": self.target(a), "pixels": px}
    if task == "caption_qa":
      kind = ins.INSTRUCTION_TYPES[int(rng.integers(len(ins.INSTRUCTION_TYPES)))]
      prompt, q, a, _ = sm.caption_qa(scene, kind, rng, self.p_generic)
      return {"prompt": self.prompt(prompt, False), "target": self.target(vigc_target(q, a)),
              "pixels": None}
    if task == "chat":
      q, a = sm.generic_chat(rng)
      return {"prompt": self.prompt(q, False), "target": self.target(a), "pixels": None}
    raise ValueError(f"unknown task {task!r}")


def batch_schedule(p: Any, seed: int) -> Callable[[int], str]:
  """`step -> batch kind` of stage 2 (a pure function of (seed, step)): every `text_every`-th step a
  text-only batch, else a `detail` batch with probability `p_detail`, else a short image batch."""

  def kind(step: int) -> str:
    if p.text_every and step % p.text_every == p.text_every - 1:
      return "text"
    rng = np.random.default_rng([seed, _SALT_STAGE2, step, 0])
    return "detail" if rng.random() < p.p_detail else "image"

  return kind


def stage2_batches(maker: ExampleMaker, p: Any, seed: int, pad_id: int
                   ) -> tuple[Callable[[int], dict], Callable[[int], str]]:
  """`step -> {"ce": batch}` and `step -> batch kind`.

  Each batch is one kind, padded to that kind's fixed length (`seq_image`, `seq_detail`, `seq_text`:
  three compiled shapes); its examples draw their scene uniformly and their task with the `w_*` weights.
  """
  schedule = batch_schedule(p, seed)
  image_w = np.asarray([p.w_caption, p.w_vigc, p.w_vqa, p.w_generic_image], np.float64)
  text_w = np.asarray([p.w_caption_qa, p.w_chat], np.float64)
  lengths = {"image": p.seq_image, "detail": p.seq_detail, "text": p.seq_text}

  def make(step: int) -> dict:
    kind = schedule(step)
    rng = np.random.default_rng([seed, _SALT_STAGE2, step, 1])
    idx = rng.integers(len(maker.world), size=p.batch_size)
    if kind == "image":
      tasks = [IMAGE_TASKS[i] for i in rng.choice(len(IMAGE_TASKS), size=p.batch_size,
                                                  p=image_w / image_w.sum())]
    elif kind == "text":
      tasks = [TEXT_TASKS[i] for i in rng.choice(len(TEXT_TASKS), size=p.batch_size,
                                                 p=text_w / text_w.sum())]
    else:
      tasks = ["vigc_detail"] * p.batch_size
    examples = [fit(maker.example(t, int(i), rng), lengths[kind]) for t, i in zip(tasks, idx)]
    return {"ce": trainer_lib.ce_batch(examples, pad_id, bucket=lengths[kind])}

  return make, schedule


def fit(example: dict, length: int) -> dict:
  """Cut an example's target so that prompt + target fit in `length` tokens (a fixed batch shape)."""
  room = length - len(example["prompt"])
  if room < 1:
    raise BadInput(f"a prompt of {len(example['prompt'])} tokens does not fit the batch length {length}")
  return {**example, "target": example["target"][:room]}


def stage1_examples(maker: ExampleMaker, seed: int, per_scene: int) -> list[dict]:
  """`per_scene` captioning examples per scene (random captions and instructions), each with the
  caption's token ids (no EOS) for the alignment loss."""
  examples = []
  for i in range(len(maker.world)):
    rng = np.random.default_rng([seed, _SALT_STAGE1, i])
    for _ in range(per_scene):
      ex = maker.example("caption", i, rng)
      ex["caption"] = ex["target"][:-len(maker.builder.eos_ids) or None]
      examples.append(ex)
  return examples


def stage1_batches(examples: Sequence[dict], batch_size: int, seed: int, pad_id: int, with_ce: bool,
                   length: int) -> Callable[[int], dict]:
  """`step -> batch` of the align objective with fixed shapes: the CG-VLM alignment part (pixels,
  caption tokens padded to `CAPTION_LEN`) and, `with_ce`, the captioning CE part (padded to `length`)."""

  def make(step: int) -> dict:
    ex = [examples[i] for i in trainer_lib.epoch_order(len(examples), step, batch_size, seed)]
    tokens, mask = right_pad([e["caption"][:CAPTION_LEN] for e in ex], CAPTION_LEN, pad_id)
    batch = {"align": {"pixels": np.stack([e["pixels"] for e in ex]), "caption_tokens": tokens,
                       "caption_mask": mask}}
    if with_ce:
      batch["ce"] = trainer_lib.ce_batch([fit(e, length) for e in ex], pad_id, bucket=length)
    return batch

  return make


# --------------------------------------------------------------------------------------- evaluation


def vqa_questions(world: Sequence[world_lib.Scene], seed: int) -> tuple[list[tuple[int, str, str]],
                                                                     list[tuple[int, str, bool]]]:
  """Held-out VQA: one grounded question per scene and kind (`(scene, question, kind)`), and POPE-style
  existence questions, one present and one absent shape per scene (`(scene, shape, exists)`)."""
  vqa, pope = [], []
  for i, scene in enumerate(world):
    rng = np.random.default_rng([seed, _SALT_EVAL, i])
    for kind in text_lib.QA_KINDS:
      q, _ = text_lib.grounded_qa(scene, rng, kind)
      vqa.append((i, q, kind))
    present = world_lib.object_names(scene)
    absent = [s for s in world_lib.SHAPES if s not in present]
    pope.append((i, present[int(rng.integers(len(present)))], True))
    if absent:
      pope.append((i, absent[int(rng.integers(len(absent)))], False))
  return vqa, pope


def evaluate(model_dir: str, world: Sequence[world_lib.Scene], mesh: jax.sharding.Mesh, seed: int = 0,
             batch_size: int = 32, max_new_tokens: int = 128, sample: bool = False) -> dict:
  """Quality numbers of a model directory on `world` (scenes it was not trained on).

  Every generation uses the same batch size, prompt length (128) and `max_new_tokens`, so there are
  two compiled shapes (with and without the image) per decoding mode: greedy, and with `sample`
  temperature-1 sampling too.
  """
  ev = Evaluator(model_dir, mesh, batch_size)
  images = [world_lib.render(s) for s in world]
  out: dict[str, Any] = {"eval_scenes": len(world)}
  start = time.perf_counter()

  # VQA with LLaVA's short-answer suffix, with and without the image (the blind score is the prior).
  vqa, pope = vqa_questions(world, seed)
  prompts = [f"{q} {sm.SHORT_ANSWER_SUFFIX}" for _, q, _ in vqa]
  for name, imgs in (("vqa", [images[i] for i, _, _ in vqa]), ("vqa_blind", None)):
    answers = ev.generate(prompts, imgs, max_new_tokens)
    verdicts = [checker_lib.check(world[i], q, a) for (i, q, _), a in zip(vqa, answers)]
    by_kind = {k: _rate([v.correct is True for (_, _, kk), v in zip(vqa, verdicts) if kk == k])
               for k in text_lib.QA_KINDS}
    out[name] = {"accuracy": _rate([v.correct is True for v in verdicts]), "by_kind": by_kind}
    if name == "vqa":
      out[name]["examples"] = [{"question": q, "answer": a} for (_, q, _), a in
                               list(zip(vqa, answers))[:8]]
  pope_prompts = [f"Is there a {s} in the image? {sm.SHORT_ANSWER_SUFFIX}" for _, s, _ in pope]
  answers = ev.generate(pope_prompts, [images[i] for i, _, _ in pope], max_new_tokens)
  said_yes = [a.strip().lower().startswith("yes") for a in answers]
  out["pope"] = {"n": len(pope), "accuracy": _rate([y == e for y, (_, _, e) in zip(said_yes, pope)]),
                 "yes_ratio": _rate(said_yes), "chance": 0.5}

  # Captions (with the image), judged as descriptions.
  instruction = ins.CAPTION_INSTRUCTIONS[0]
  caps = ev.generate([instruction] * len(world), images, max_new_tokens)
  verdicts = [checker_lib.check(s, "Describe the image.", c) for s, c in zip(world, caps)]
  out["caption"] = {"correct": _rate([v.correct is True for v in verdicts]),
                    "hallucinated": _rate([bool(v.hallucinated) for v in verdicts]),
                    "examples": caps[:4]}

  # VIGC ("direct") generation per instruction type, greedy and sampled (temperature 1).
  modes = [("greedy", 0.0)] + ([("sampled", 1.0)] if sample else [])
  for mode, temperature in modes:
    per_type = {}
    all_texts, all_scenes = [], []
    for kind in ins.INSTRUCTION_TYPES:
      texts = ev.generate([VIGC_INSTRUCTIONS[kind]] * len(world), images, max_new_tokens,
                          temperature, seed)
      per_type[kind] = qa_quality(world, texts)
      all_texts += texts
      all_scenes += list(world)
    out[f"vigc_{mode}"] = {"all": qa_quality(all_scenes, all_texts), "by_type": per_type,
                           "examples": all_texts[:2] + all_texts[len(world):len(world) + 1]}

  # Two-step QA from (ground-truth) captions, text only.
  prompts = sm.caption_qa_prompts(world, np.random.default_rng([seed, _SALT_EVAL, 1 << 20]))
  for mode, temperature in modes:
    texts = ev.generate(prompts, None, max_new_tokens, temperature, seed)
    out[f"caption_qa_{mode}"] = {**qa_quality(world, texts), "examples": texts[:3]}
  out["eval_seconds"] = round(time.perf_counter() - start, 1)
  return out


# ------------------------------------------------------------------------------------------- stage


def _check(p: Any) -> None:
  for name in ("num_scenes", "batch_size", "align_batch_size"):
    if p[name] < 1:
      raise BadInput(f"config.pretrain.{name}={p[name]} must be >= 1")
  for name in ("align_steps", "caption_steps", "tune_steps", "text_every", "eval_scenes"):
    if p[name] < 0:
      raise BadInput(f"config.pretrain.{name}={p[name]} must be >= 0")
  for name in ("p_generic", "p_short"):
    if not 0.0 <= p[name] <= 1.0:
      raise BadInput(f"config.pretrain.{name}={p[name]} must be in [0, 1]")
  if not 0.0 <= p.p_detail <= 1.0:
    raise BadInput(f"config.pretrain.p_detail={p.p_detail} must be in [0, 1]")
  if p.w_caption + p.w_vigc + p.w_vqa + p.w_generic_image <= 0 or \
      p.text_every and p.w_caption_qa + p.w_chat <= 0:
    raise BadInput("config.pretrain task weights (w_*) must have a positive sum")


def train_stage(vlm: Any, mesh: jax.sharding.Mesh, cfg: trainer_lib.TrainConfig, batches: Callable,
                checkpoint_dir: str, seed: int, checkpoint_every: int) -> tuple[Any, list[dict], float]:
  """Train (resuming from `checkpoint_dir`); returns the trained VLM, the history and the seconds."""
  start = time.perf_counter()
  trainer = trainer_lib.Trainer(trainer_lib.Generator(vlm, rngs=nnx.Rngs(seed)), mesh, cfg,
                                checkpoint_dir, checkpoint_every)
  trainer.restore_latest()
  history = trainer.run(batches)
  return trainer.model().vlm, history, time.perf_counter() - start


def check_config(config: Any) -> None:
  """Raises `BadInput` (one line) when `config.pretrain` cannot be trained."""
  if "pretrain" not in config:
    raise BadInput("the config has no `pretrain` section (use configs/scenes_pretrain.py)")
  _check(config.pretrain)


def run(config: Any, workdir: str) -> dict:
  """Build, train, export to `config.pretrain.out` and measure; returns the metrics."""
  from c3l_jax.pipeline.train import export_generator

  p = config.pretrain
  check_config(config)
  if p.recipe == "grounded":
    from c3l_jax.scenes import grounded

    return grounded.run(config, workdir)
  seed = config.seed
  stage_dir = os.path.join(workdir, "pretrain")
  os.makedirs(stage_dir, exist_ok=True)
  t0 = time.perf_counter()
  base = build_base(p, stage_dir, seed)
  mesh = sharding.make_mesh(config.train.mesh)
  vlm = sharding.load_model(base, mesh, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                            scan_layers=config.model.scan_layers, remat=config.model.remat)
  builder = PromptBuilder(load_processor(base), vlm.cfg.image_token_id, vlm.cfg.image_seq_length)
  world = world_lib.generate_world(p.num_scenes, p.world_seed)
  pixels = np.asarray(builder.processor.image_processor(
      images=[world_lib.render(s) for s in world], return_tensors="np")["pixel_values"],
      np.float32)
  maker = ExampleMaker(builder, world, pixels, p.p_generic, p.p_short)
  build_seconds = time.perf_counter() - t0

  # Stage 1a: CG-VLM contrastive alignment (the decoder does not run when align_ce_weight = 0).
  examples = stage1_examples(maker, seed, p.caption_examples_per_scene)
  cfg1 = trainer_lib.TrainConfig(
      learning_rate=p.align_lr, weight_decay=0.0, warmup_steps=p.warmup_steps, steps=p.align_steps,
      grad_clip=1.0, ce_weight=p.align_ce_weight, contrastive_weight=p.align_weight,
      trainable=tuple(p.align_trainable) + ("temperature",), objective="align")
  vlm, hist1, sec1 = train_stage(
      vlm, mesh, cfg1, stage1_batches(examples, p.align_batch_size, seed, builder.pad_id,
                                      bool(p.align_ce_weight), p.seq_image),
      os.path.join(stage_dir, "stage1", "checkpoints"), seed, p.checkpoint_every)
  scale_before, scale_after = match_feature_scale(vlm, pixels[:64])
  console.say("pretrain stage 1a (align): %d steps in %.0fs, loss %.3f -> %.3f; image feature / "
              "embedding norm %.3g -> %.3g" % (
                  len(hist1), sec1, hist1[0]["loss"] if hist1 else float("nan"),
                  hist1[-1]["loss"] if hist1 else float("nan"), scale_before, scale_after))

  # Stage 1b: captioning CE + alignment with the decoder trained too (it starts from scratch).
  cfg1b = trainer_lib.TrainConfig(
      learning_rate=p.caption_lr, weight_decay=p.weight_decay, warmup_steps=p.warmup_steps,
      steps=p.caption_steps, grad_clip=1.0, ce_weight=1.0, contrastive_weight=p.caption_align_weight,
      trainable=tuple(p.tune_trainable) + ("temperature",), objective="align")
  vlm, hist1b, sec1b = train_stage(
      vlm, mesh, cfg1b, stage1_batches(examples, p.batch_size, seed + 1, builder.pad_id, True,
                                       p.seq_image),
      os.path.join(stage_dir, "stage1b", "checkpoints"), seed, p.checkpoint_every)
  console.say("pretrain stage 1b (captions): %d steps in %.0fs, loss %.3f -> %.3f" % (
      len(hist1b), sec1b, hist1b[0]["loss"] if hist1b else float("nan"),
      hist1b[-1]["loss"] if hist1b else float("nan")))

  # Stage 2: instruction tuning on the mix.
  cfg2 = trainer_lib.TrainConfig(
      learning_rate=p.tune_lr, weight_decay=p.weight_decay, warmup_steps=p.warmup_steps,
      steps=p.tune_steps, grad_clip=1.0, ce_weight=1.0, contrastive_weight=0.0,
      trainable=tuple(p.tune_trainable), objective="c3l")
  batches2, kind_of = stage2_batches(maker, p, seed, builder.pad_id)
  vlm, hist2, sec2 = train_stage(vlm, mesh, cfg2, batches2, os.path.join(stage_dir, "stage2",
                                                                         "checkpoints"),
                                 seed, p.checkpoint_every)
  console.say(f"pretrain stage 2 (tune): {len(hist2)} steps in {sec2:.0f}s")

  model_dir = os.path.join(stage_dir, "model")
  export_generator(vlm, base, model_dir)
  scale_final = feature_scale(vlm, pixels[:64])
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(vlm, nnx.Param)))
  del vlm
  eval_world = world_lib.generate_world(p.eval_scenes, p.world_seed, start_id=p.num_scenes)
  quality = evaluate(model_dir, eval_world, mesh, seed, max_new_tokens=p.eval_max_new_tokens,
                     sample=p.eval_sampled) if p.eval_scenes else {}

  per_task: dict[str, list[float]] = {}
  for h in hist2:
    per_task.setdefault(kind_of(h["step"] - 1), []).append(h["loss"])
  tail = lambda xs: round(float(np.mean(xs[-max(1, len(xs) // 10):])), 4)  # noqa: E731

  def summary(history: list[dict], seconds: float) -> dict:
    return {"steps": len(history), "seconds": round(seconds, 1),
            "first_loss": history[0]["loss"] if history else None,
            **{f"final_{k}": tail([h[k] for h in history])
               for k in ("loss", "ce", "alignment") if history and k in history[0]},
            "curve": curve(history)}
  metrics = {
      "model": {**dataclasses.asdict(sm.ModelSize.from_config(p)), "parameters": n_params,
                "vocab_size": len(builder.tokenizer)},
      "data": {"train_scenes": p.num_scenes, "world_seed": p.world_seed, "p_generic": p.p_generic,
               "p_short": p.p_short, "seed": seed},
      "stage1_align": {**summary(hist1, sec1),
                       "feature_scale_before_rescale": round(scale_before, 4)},
      "stage1b_captions": summary(hist1b, sec1b),
      "stage2_tune": {"steps": len(hist2), "seconds": round(sec2, 1),
                      "first_loss": hist2[0]["loss"] if hist2 else None,
                      "final_loss": tail([h["loss"] for h in hist2]) if hist2 else None,
                      "final_loss_by_batch_kind": {k: tail(v) for k, v in sorted(per_task.items())},
                      "steps_by_batch_kind": {k: len(v) for k, v in sorted(per_task.items())},
                      "feature_scale": round(scale_final, 4),
                      "curve": curve(hist2)},
      "quality": quality,
      "seconds": {"build": round(build_seconds, 1), "total": round(time.perf_counter() - t0, 1)},
  }
  with open(os.path.join(model_dir, METRICS_FILE), "w") as f:
    json.dump(metrics, f, indent=2)
    f.write("\n")
  if runtime.get().is_lead:
    publish(model_dir, p.out)
  return {**metrics, "out": p.out}


def main(argv: Sequence[str]) -> None:
  """`python -m c3l_jax.scenes.pretrain`: the flags are defined below, under `__main__`."""
  import datetime
  import sys

  from absl import flags

  from c3l_jax.pipeline import write_json

  if len(argv) > 1:
    print(f"error: unexpected arguments {' '.join(argv[1:])!r} (flags look like --name=value)",
          file=sys.stderr)
    sys.exit(2)
  config = flags.FLAGS.config
  try:
    check_config(config)
  except BadInput as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  workdir = os.path.abspath(flags.FLAGS.workdir or os.path.join("runs", f"scenes_pretrain-{stamp}"))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2) + "\n")
  log = console.setup(workdir)
  console.say(f"workdir {workdir}; log {os.path.relpath(log, workdir)}")
  console.say("pretrain: start")
  start = time.perf_counter()
  metrics = run(config, workdir)
  if runtime.get().is_lead:
    write_json(os.path.join(workdir, "metrics.json"), {"pretrain": metrics})
  stages = (("student_captions", "generator_mix") if metrics.get("recipe") == "grounded" else
            ("stage1_align", "stage1b_captions", "stage2_tune"))
  steps = ", ".join(f"{k} {metrics[k]['steps']} steps" for k in stages)
  console.say(f"pretrain: done in {time.perf_counter() - start:.1f}s ({steps}; "
              f"{metrics['model']['parameters']:,} parameters)")
  quality = metrics.get("quality") or {}
  if "vqa" in quality:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    console.say(f"held-out scenes ({quality['eval_scenes']}): VQA accuracy "
                f"{fmt(quality['vqa']['accuracy'])} (without the image "
                f"{fmt(quality['vqa_blind']['accuracy'])}), POPE accuracy {fmt(quality['pope']['accuracy'])}")
  if "grounding" in quality:
    r = quality["grounding"]
    console.say(f"held-out scenes ({r['scenes']}): VQA {r['vqa']['accuracy']} {r['vqa']['by_kind']}; POPE "
                + ", ".join(f"{k} {v['accuracy']} (yes {v['yes_ratio']})" for k, v in r["pope"].items())
                + f"; captions correct {r['caption']['correct']}; generic: VIGC {r['vigc']['generic']}, "
                f"two-step {r['caption_qa']['generic']}")
    failures = r.get("failures") or []
    console.say("grounding thresholds (grounding.THRESHOLDS): " + ("all met" if not failures else
                                                        "missed: " + "; ".join(failures)))
  print(f"model: {metrics['out']}; workdir: {workdir} (metrics.json, {METRICS_FILE} in the model)")


__all__ = ["ExampleMaker", "Evaluator", "check_config", "evaluate", "main", "qa_quality", "run",
           "stage1_examples", "stage2_batches", "batch_schedule", "vqa_questions"]


if __name__ == "__main__":
  from c3l_jax import console as _console

  _console.quiet_environment()
  import sys as _sys

  from absl import app as _app
  from absl import flags as _flags
  from ml_collections import config_flags as _config_flags

  _REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if _REPO not in _sys.path:  # configs/*.py import `configs.common`
    _sys.path.insert(0, _REPO)
  _config_flags.DEFINE_config_file(
      "config", default=os.path.join(_REPO, "configs", "scenes_pretrain.py"),
      help_string="The recipe: configs/scenes_pretrain.py; override fields with --config.pretrain.x=v.",
      lock_config=True)
  _flags.DEFINE_string("workdir", None, "Where the build, checkpoints, metrics and logs go; default: a "
                       "fresh runs/scenes_pretrain-<UTC timestamp>. The model goes to pretrain.out.")
  _app.run(main)
