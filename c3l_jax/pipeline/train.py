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

import os
from typing import Any

import numpy as np
from etils import epath
from flax import nnx

from c3l_jax import checkpoint, runtime, sharding
from c3l_jax import train as trainer_lib
from c3l_jax.data.images import ImageError
from c3l_jax.data.prompts import VIGC_INSTRUCTIONS, PromptBuilder, load_processor, vigc_target
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
  images = image_inputs(vlm.cfg)
  source = open_source(config, builder)
  if not rows:
    raise BadInput("train: no training records")
  # Token ids do not depend on the picture for fixed-size image processors (one reference picture);
  # a variable-resolution family's prompt holds as many image tokens as its own picture makes.
  prompts: dict[tuple, np.ndarray] = {}

  def prompt(text: str, image: str) -> np.ndarray:
    key = (text, image if images.variable else None)
    if key not in prompts:
      try:
        picture = source.load(image)
      except ImageError as e:
        raise BadInput(f"train: image {image!r}: {e}") from None
      prompts[key] = np.asarray(builder.encode_prompt(text, picture)[0], np.int32)
    return prompts[key]

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
    encoded = {}
    for rec in rows:
      kind = rec.get("instruction_type", "conversation")
      if kind not in VIGC_INSTRUCTIONS:
        raise BadInput(f"record {rec.get('id')!r}: unknown instruction_type {kind!r}")
      sample = builder.encode_answer(vigc_target(rec["question"], rec["answer"]))
      encoded[rec["id"]] = {"prompt": prompt(VIGC_INSTRUCTIONS[kind], rec["image"]), "target": ids(sample + eos),
                            "sample": ids(sample), "image": rec["image"], "id": rec["id"]}
    if cfg.ce_weight:  # L_r on the top fraction, best first
      top = [r for r in rows if r["top_fraction"]]
      ce_examples = [encoded[r["id"]] for r in sorted(top, key=lambda r: -r["i2c"])]
    if cfg.contrastive_weight:  # L_c per image: its positive first, then its negatives
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
        first = encoded[chosen[0]["id"]]
        groups.append({"prompt": first["prompt"], "image": first["image"], "id": first["id"],
                       "samples": [encoded[r["id"]]["sample"] for r in chosen], "positive": 0})
      if not groups:
        raise BadInput("no image has two or more scored samples: the contrastive loss needs them "
                       "(set --config.train.contrastive_weight=0 to train with CE only)")

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
  return {"steps": trainer.step, "ce_examples": len(ce_examples), "groups": len(groups),
          "first_loss": history[0]["loss"] if history else None,
          "last_loss": history[-1]["loss"] if history else None}
