"""The `train` stage: fine-tune the generator (C3L), or a downstream model on VLIT data.

`train.objective`:
  c3l   scored records (WORKDIR/score/part-*.jsonl, else `data.records` with an `i2c` field): L_r on the
        top `select.top_fraction` by S(I2C) in VIGC format, L_c (eq. 3) on image groups (>= 2 samples).
  vlit  plain instruction tuning: CE on (image + question -> answer) conversations of `data.records`
        (that is how the generated dataset fine-tunes a downstream model).
  align CG-VLM: records with a `caption`; CE of image + "describe briefly" -> caption, plus the CG-VLM
        alignment loss (weight `train.contrastive_weight`) between projected patches and caption token
        embeddings, with a learnable temperature. Stage 1 of the paper trains the connector only:
        --config.train.trainable="('connector',)".

Resumable (`WORKDIR/train/checkpoints`, orbax) and preemptible (SIGTERM saves). Writes the loss history
to `WORKDIR/train/history.jsonl` and the trained model (no projection head) to `WORKDIR/train/generator`,
a model directory the `final` stage loads like any converted checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np
from etils import epath
from flax import nnx

from c3l_jax import checkpoint, runtime, sharding
from c3l_jax import train as trainer_lib
from c3l_jax.data import instructions as ins
from c3l_jax.data.images import ImageError
from c3l_jax.data.prompts import (VIGC_INSTRUCTIONS, VIGC_NEUTRAL_INSTRUCTION, PromptBuilder,
                                  load_processor, vigc_target)
from c3l_jax.data.records import BadInput, read_records, write_jsonl
from c3l_jax.data.sources import open_source
from c3l_jax.models.vlm import image_inputs
from c3l_jax.pipeline import common, select

CAPTION_INSTRUCTION = "Describe the image briefly."


def training_records(config: Any, workdir: str, objective: str = "c3l") -> list[dict]:
  """c3l: selected records (WORKDIR/select, else WORKDIR/score or `data.records` with `i2c`, selected
  here the same way); vlit / align: `data.records`."""
  if objective == "c3l":
    rows, _, where = common.stage_input(config, workdir, ("select", "score"))
    if not all("role" in r and "top_fraction" in r for r in rows):
      missing = [r.get("id") for r in rows if not isinstance(r.get("i2c"), (int, float))]
      if missing:
        raise BadInput(f"the train stage needs S(I2C) scores: {len(missing)} record(s) of {where} have "
                       f"no 'i2c' (e.g. {missing[0]!r}); run the score stage first")
      rows = select.METHODS[config.select.method](rows, config)
    return rows
  required = ("id", "image", "caption") if objective == "align" else ("id", "image", "question",
                                                                      "answer")
  if not config.data.records:
    raise BadInput(f"train.objective={objective} needs config.data.records")
  rows, rejected = read_records(config.data.records, required=required, strict=True)
  del rejected
  return rows


def prompt_encoder(builder: PromptBuilder, load: Callable[[str], Any], variable: bool = False
                   ) -> Callable[[str, str | None], np.ndarray]:
  """`prompt(text, image)` -> the prompt's token ids (`image` None: a text-only prompt), memoised.

  For fixed-size image processors token ids do not depend on the picture, so the first picture
  `load`ed stands in for every image; a variable-resolution family (`variable`, e.g. Qwen2.5-VL)
  holds as many image tokens as each picture makes, so its prompts are encoded per image.
  """
  cache: dict[tuple[str, str | bool | None], np.ndarray] = {}
  reference: list[Any] = []

  def picture(image: str) -> Any:
    try:
      if variable:
        return load(image)
      if not reference:
        reference.append(load(image))
      return reference[0]
    except ImageError as e:
      raise BadInput(f"train: image {image!r}: {e}") from None

  def prompt(text: str, image: str | None) -> np.ndarray:
    key = (text, image if variable else image is not None)
    if key not in cache:
      cache[key] = np.asarray(
          builder.encode_prompt(text, None if image is None else picture(image))[0], np.int32)
    return cache[key]

  return prompt


def sample_prompt(rec: dict, inputs: str) -> tuple[str, bool]:
  """The prompt a C3L sample is trained with: `(the user turn's text, whether the image is in it)`.

  `vigc`: the image + the VIGC instruction of the sample's type (one prompt for data made any way).
  `as_generated`: the prompt that produced the sample, as the generating stage recorded it (`prompt`,
  `mode`): two-step's QA-from-caption prompt (text-only: the caption stands in for the image), or
  direct's image + instruction.
  """
  kind = rec.get("instruction_type", "conversation")
  if kind not in VIGC_INSTRUCTIONS:
    raise BadInput(f"record {rec.get('id')!r}: unknown instruction_type {kind!r}")
  if inputs == "vigc":
    return VIGC_INSTRUCTIONS[kind], True
  text, mode = rec.get("prompt"), rec.get("mode")
  if not isinstance(text, str) or not text.strip() or mode not in ("two_step", "direct") or (
      mode == "two_step" and not str(rec.get("caption_instruction", "")).strip()):
    raise BadInput(f"train.inputs=as_generated needs the prompt that produced each sample ('prompt', "
                   f"'mode' and, two-step, 'caption_instruction', written by the initial stage); "
                   f"record {rec.get('id')!r} lacks them (generate the data again, or use "
                   f"--config.train.inputs=vigc)")
  return text, mode == "direct"


def anchor_prompt(rec: dict, inputs: str, instruction: str) -> tuple[str, bool]:
  """The contrastive anchor's prompt for a group whose positive is `rec` (`train.anchor_instruction`):
  `positive` the positive's own training prompt (`sample_prompt`); `neutral` one that names no
  instruction type, in the same form (image + instruction, or two-step's caption + instruction)."""
  text, with_image = sample_prompt(rec, inputs)
  if instruction == "positive":
    return text, with_image
  if with_image:
    return VIGC_NEUTRAL_INSTRUCTION, True
  return ins.qa_from_caption_prompt(rec["caption"], ins.QA_FROM_CAPTION_NEUTRAL), False


def c3l_examples(rows: list[dict], config: Any, builder: PromptBuilder,
                 prompt: Callable[[str, str | None], np.ndarray], ce: bool = True, contrastive: bool = True
                 ) -> tuple[list[dict], list[dict]]:
  """The C3L objective's CE examples (L_r) and contrastive groups (L_c) of selected records.

  CE: the top fraction, best S(I2C) first, each as `sample_prompt` -> "Question: q Answer: a" + EOS;
  with `train.inputs=as_generated` on two-step data, each image of the top fraction also trains the
  caption step: its caption instruction + the image -> the caption the selected QA were written from
  (once per image, after the image's first selected sample). Groups: per image, the positive first,
  then up to `train.max_negatives` negatives by S(I2C), with the anchor prompt of `anchor_prompt`.
  An example's `image` is None when its prompt is text-only. `prompt(text, image or None)` encodes.
  """
  inputs = config.train.inputs
  eos = list(builder.eos_ids)
  as_ids = lambda tokens: np.asarray(tokens, np.int32)  # noqa: E731
  encoded = {}
  for rec in rows:
    text, with_image = sample_prompt(rec, inputs)
    sample = builder.encode_answer(vigc_target(rec["question"], rec["answer"]))
    encoded[rec["id"]] = {"prompt": prompt(text, rec["image"] if with_image else None),
                          "target": as_ids(sample + eos),
                          "sample": as_ids(sample), "image": rec["image"] if with_image else None,
                          "id": rec["id"]}
  ce_examples, groups = [], []
  if ce:  # L_r on the top fraction, best first
    captioned = set()
    for r in sorted((r for r in rows if r["top_fraction"]), key=lambda r: -r["i2c"]):
      ce_examples.append(encoded[r["id"]])
      if inputs == "as_generated" and r["mode"] == "two_step" and r["image"] not in captioned:
        captioned.add(r["image"])
        ce_examples.append({"prompt": prompt(r["caption_instruction"], r["image"]),
                            "target": as_ids(builder.encode_answer(r["caption"]) + eos),
                            "image": r["image"], "id": f"{r['id']}:caption"})
  if contrastive:  # L_c per image: its positive first, then its negatives
    by_image: dict[str, list[dict]] = {}
    for r in rows:
      if r["role"] in ("positive", "negative"):
        by_image.setdefault(r["image"], []).append(r)
    for members in by_image.values():
      positives = [r for r in members if r["role"] == "positive"]
      negatives = sorted((r for r in members if r["role"] == "negative"), key=lambda r: -r["i2c"])
      if len(positives) != 1 or not negatives:
        continue
      chosen = positives + negatives[:config.train.max_negatives]
      text, with_image = anchor_prompt(chosen[0], inputs, config.train.anchor_instruction)
      image = chosen[0]["image"] if with_image else None
      groups.append({"prompt": prompt(text, image), "image": image, "id": chosen[0]["id"],
                     "samples": [encoded[r["id"]]["sample"] for r in chosen], "positive": 0})
    if not groups:
      raise BadInput("no image has two or more scored samples: the contrastive loss needs them "
                     "(set --config.train.contrastive_weight=0 to train with CE only)")
  return ce_examples, groups


def export_generator(vlm, base_dir: str, out: str) -> None:
  """Save the VLM (not the head) as a self-contained model directory.

  Multi-host: every process takes part in the orbax saves (arrays may span hosts); only process 0
  writes the other files and renames the directory into place, between barriers.
  """
  tmp, out = epath.Path(out + ".partial"), epath.Path(out)
  rt = runtime.get()
  def clear():
    if tmp.exists():
      tmp.rmtree()

  rt.lead_writes("export_generator:start", clear)
  checkpoint.save_params(os.fspath(tmp), nnx.to_pure_dict(nnx.state(vlm, nnx.Param)))
  rt.barrier("export_generator:params")
  if rt.is_lead:
    checkpoint.save_model_config(os.fspath(tmp), vlm.cfg)
    for src in epath.Path(base_dir).iterdir():
      if src.is_file() and src.name != checkpoint.MODEL_CONFIG:
        src.copy(tmp / src.name, overwrite=True)
    if out.exists():
      out.rmtree()
    tmp.rename(out)
  rt.barrier("export_generator:done")


def run(config: Any, workdir: str) -> dict:
  stage_dir = os.path.join(workdir, "train")
  epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)
  objective = config.train.objective
  rows = training_records(config, workdir, objective)
  cfg = trainer_lib.TrainConfig.from_config(config.train)
  if objective == "vlit":
    cfg = trainer_lib.TrainConfig(**{**cfg.__dict__, "contrastive_weight": 0.0, "ce_weight": 1.0})

  mesh = sharding.make_mesh(config.train.mesh)
  # Frozen parameters in model.param_dtype (bf16 for the 7b / 13b configs); the trained ones in
  # train.param_dtype (fp32 master weights), restored from the checkpoint in that dtype.
  trained = trainer_lib.trainable_paths(cfg.trainable)
  vlm = sharding.load_model(
      config.model.checkpoint, mesh,
      param_dtypes=lambda path: config.train.param_dtype if trained(f"vlm/{path}") else None,
      **common.model_runtime(config))
  builder = PromptBuilder(load_processor(config.model.checkpoint, config.model.get("min_pixels", 0),
                                         config.model.get("max_pixels", 0)),
                          vlm.cfg.image_token_id, vlm.cfg.image_seq_length)
  cfg = dataclasses.replace(cfg, eos_ids=tuple(builder.eos_ids))  # ends a generated anchor
  images = image_inputs(vlm.cfg)
  source = open_source(config, builder)
  if not rows:
    raise BadInput("train: no training records")
  prompt = prompt_encoder(builder, source.load, images.variable)

  def ids(tokens) -> np.ndarray:
    return np.asarray(tokens, np.int32)

  eos = list(builder.eos_ids)
  # Examples hold token ids and the image's key: pictures are decoded when a batch needs them
  # (`pixels`, on the trainer's prefetch thread), through the source's bounded cache.
  ce_examples, groups = [], []
  if objective == "align":
    for rec in rows:
      if not str(rec.get("caption", "")).strip():
        raise BadInput(f"train.objective=align needs a non-empty 'caption' in every record; "
                       f"record {rec.get('id')!r} has none")
      caption = builder.encode_answer(rec["caption"])
      ce_examples.append({"prompt": prompt(CAPTION_INSTRUCTION, rec["image"]), "target": ids(caption + eos),
                          "caption": ids(caption), "image": rec["image"], "id": rec["id"]})
  elif objective == "vlit":
    for rec in rows:
      ce_examples.append({"prompt": prompt(rec["question"], rec["image"]),
                          "target": ids(builder.encode_answer(rec["answer"]) + eos),
                          "image": rec["image"], "id": rec["id"]})
  else:
    ce_examples, groups = c3l_examples(rows, config, builder, prompt, ce=bool(cfg.ce_weight),
                                       contrastive=bool(cfg.contrastive_weight))

  def pixels(image: str) -> np.ndarray:
    try:
      return builder.encode_prompt("", source.load(image))[1]
    except ImageError as e:
      raise BadInput(f"train: {e}") from None

  # The processes meet before the first computation over every device (see Trainer._step_for).
  runtime.get().barrier("train:loaded")
  model = trainer_lib.Generator(vlm, rngs=nnx.Rngs(config.seed))
  trainer = trainer_lib.Trainer(model, mesh, cfg, os.path.join(stage_dir, "checkpoints"),
                                config.train.checkpoint_every)
  trainer.restore_latest()
  history = trainer.run(trainer_lib.batch_fn(
      ce_examples, groups, cfg, config.train.batch_size, config.train.batch_size,
      1 + config.train.max_negatives, builder.pad_id, config.seed, pixels=pixels, images=images))
  # Every process holds the same history (its metrics are global); one writes it.
  runtime.get().lead_writes("train:history",
                            lambda: write_jsonl(os.path.join(stage_dir, "history.jsonl"), history))
  export_generator(trainer.model().vlm, config.model.checkpoint, os.path.join(stage_dir, "generator"))
  return {"checkpoint": config.model.checkpoint,  # the model the training started from
          "steps": trainer.step, "ce_examples": len(ce_examples), "groups": len(groups),
          "first_loss": history[0]["loss"] if history else None,
          "last_loss": history[-1]["loss"] if history else None}
