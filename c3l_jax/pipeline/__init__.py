"""Pipeline stages and the checks `launch.py` runs before any device work.

Stages read files and write files under WORKDIR; nothing else passes between them (docs/design.md,
"Data flow"). Each stage is the module `c3l_jax.pipeline.<name>` with a function

    run(config: ml_collections.ConfigDict, workdir: str) -> dict   # the stage's metrics

loaded lazily by `get_stage`, so importing this package (and validating a config) imports neither jax
nor any stage.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import time
from typing import Any, Callable, Sequence

from absl import logging
from etils import epath

from c3l_jax import console, registry
from c3l_jax.data.records import read_records, write_text_atomic
from c3l_jax.models.configs import MODEL_CONFIG_FILE

STAGE_ORDER: tuple[str, ...] = (
    "initial", "filter", "score", "select", "train", "final", "export", "eval", "ablation", "curate")
# Stages that never load the model; every other stage needs `config.model.checkpoint`.
MODEL_FREE_STAGES: frozenset[str] = frozenset({"filter", "select", "export"})

CONVERT_HINT = "convert a HF checkpoint with: python -m c3l_jax.convert --hf_path=DIR --out=DIR"

# The ablation's extra C3L rows (`config.ablation.variants`, c3l_jax/pipeline/ablation.py): named
# variants, the readings of the paper by name (docs/pipeline.md, "Readings of the paper"), or
# `FIELD=VALUE[+FIELD=VALUE...]` (a C3L row with those config overrides).
READING_VARIANTS: dict[str, dict[str, Any]] = {
    "as_generated": {"train.inputs": "as_generated"},
    "anchor_generated": {"train.anchor": "generated"},
    "anchor_neutral": {"train.anchor_instruction": "neutral"},
    "negatives": {"train.contrastive_denominator": "negatives"},
}
ABLATION_VARIANTS: tuple[str, ...] = ("final_mode", "length_norm") + tuple(READING_VARIANTS)


def variant_overrides(config: Any, name: str) -> dict[str, Any] | None:
  """The config overrides of a C3L variant row: a reading's (`READING_VARIANTS`), or those spelt
  `FIELD=VALUE[+FIELD=VALUE...]`, each VALUE parsed as its field's type; None for the other named
  variants. Raises `ConfigError` for an unknown field or a value its type does not parse."""
  if name in READING_VARIANTS:
    return dict(READING_VARIANTS[name])
  if "=" not in name:
    return None
  out = {}
  for part in name.split("+"):
    path, _, text = part.partition("=")
    path, text = path.strip(), text.strip()
    try:
      current = _get(config, path)
    except (AttributeError, KeyError):
      current = None
    if current is None or isinstance(current, (tuple, list)) or hasattr(current, "keys"):
      raise ConfigError(f"config.ablation.variants: {part.strip()!r}: {path!r} is not a config field "
                        "with a single value")
    try:
      if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
          raise ValueError(text)
        value: Any = text.lower() == "true"
      else:
        value = type(current)(text)
    except ValueError:
      raise ConfigError(f"config.ablation.variants: {part.strip()!r}: {text!r} is not of the "
                        f"field's type, {type(current).__name__}") from None
    out[path] = value
  return out

# Fields with a closed set of values. Extend a tuple when an issue adds a value (and implements it).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.family": ("llava15", "minigpt4", "qwen25vl"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "train.param_dtype": ("float32", "bfloat16", "float16"),
    "model.attention": ("auto", "xla", "cudnn", "splash"),
    "generation.mode": ("two_step", "direct"),
    "generation.final_mode": ("two_step", "direct"),
    "generation.batching": ("continuous", "static"),
    "data.split": ("train", "val"),
    "data.image_aspect": ("resize", "pad"),
    "scoring.mode": ("eq1", "full_kl"),
    "select.method": ("i2c", "self_instruct", "vigc", "random"),
    "train.objective": ("c3l", "vlit", "align"),
    "train.optimizer": ("adamw",),
    "train.contrastive_denominator": ("all", "negatives"),
    "train.inputs": ("vigc", "as_generated"),
    "train.anchor": ("prompt", "generated"),
    "train.anchor_instruction": ("positive", "neutral"),
    "eval.mc_mode": ("loglik", "generate"),
    "curate.format": ("auto", "json", "jsonl"),
    "curate.rank_by": ("sum", "per_token"),
}

# Numeric fields and the range they must lie in: (low, low_inclusive, high, high_inclusive).
_RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "preemption_grace_s": (0.0, False, math.inf, False),
    "select.top_fraction": (0.0, False, 1.0, True),
    "generation.top_p": (0.0, False, 1.0, True),
    "generation.temperature": (0.0, True, math.inf, False),
    "generation.top_k": (0, True, math.inf, False),
    "generation.max_new_tokens": (1, True, math.inf, False),
    "generation.num_final": (1, True, math.inf, False),
    "generation.prompt_bucket": (1, True, math.inf, False),
    "generation.per_image": (1, True, math.inf, False),
    "generation.qa_per_prompt": (1, True, math.inf, False),
    "generation.caption_max_new_tokens": (1, True, math.inf, False),
    "generation.shard_size": (1, True, math.inf, False),
    "train.anchor_max_new_tokens": (1, True, math.inf, False),
    "ablation.vlit_steps": (1, True, math.inf, False),
    "ablation.seeds": (1, True, math.inf, False),
    "ablation.vlit_learning_rate": (0.0, False, math.inf, False),
    "ablation.student_data_share": (0.0, True, 1.0, False),
    "ablation.student_steps": (0, True, math.inf, False),
    "ablation.student_learning_rate": (0.0, False, math.inf, False),
    "data.max_images": (0, True, math.inf, False),
    "data.max_pixels": (1, True, math.inf, False),
    "model.min_pixels": (0, True, math.inf, False),
    "model.max_pixels": (0, True, math.inf, False),
    "data.image_cache": (0, True, math.inf, False),
    "filter.min_question_words": (0, True, math.inf, False),
    "filter.max_question_words": (1, True, math.inf, False),
    "filter.min_answer_words": (0, True, math.inf, False),
    "filter.max_answer_words": (1, True, math.inf, False),
    "filter.near_duplicate": (0.0, False, 1.0, True),
    "filter.caption_overlap": (0.0, False, 1.0, True),
    "data.batch_size": (1, True, math.inf, False),
    "data.eval_batch_size": (1, True, math.inf, False),
    "scoring.batch_size": (1, True, math.inf, False),
    "scoring.shard_size": (1, True, math.inf, False),
    "train.batch_size": (1, True, math.inf, False),
    "train.steps": (0, True, math.inf, False),
    "train.warmup_steps": (0, True, math.inf, False),
    "train.grad_accum": (1, True, math.inf, False),
    "train.grad_clip": (0.0, True, math.inf, False),
    "train.learning_rate": (0.0, True, math.inf, False),
    "train.weight_decay": (0.0, True, math.inf, False),
    "train.tau": (0.0, False, math.inf, False),
    "train.max_negatives": (1, True, math.inf, False),
    "train.checkpoint_every": (1, True, math.inf, False),
    "eval.pope_num_images": (0, True, math.inf, False),
    "eval.pope_objects": (1, True, math.inf, False),
    "eval.max_items": (0, True, math.inf, False),
    "eval.max_new_tokens": (1, True, math.inf, False),
    "eval.long_max_new_tokens": (1, True, math.inf, False),
    "device_memory_gb": (0.0, True, math.inf, False),
    "curate.top_count": (0, True, math.inf, False),
    "curate.shard_size": (1, True, math.inf, False),
}


class ConfigError(ValueError):
  """A config that cannot run; the message is one line, printed by launch.py after `error: `."""


def _get(config: Any, path: str) -> Any:
  value = config
  for key in path.split("."):
    value = value[key]
  return value


def parse_stages(spec: str) -> tuple[str, ...]:
  """`"score, filter"` -> `("filter", "score")`: known names, deduplicated, in pipeline order."""
  names = [s.strip() for s in str(spec).split(",") if s.strip()]
  if not names:
    raise ConfigError(f"config.stages is empty (valid stages: {', '.join(STAGE_ORDER)})")
  unknown = [n for n in names if n not in STAGE_ORDER]
  if unknown:
    raise ConfigError(f"config.stages: unknown stage {unknown[0]!r} "
                      f"(valid stages, run in this order: {', '.join(STAGE_ORDER)})")
  return tuple(s for s in STAGE_ORDER if s in names)


def check_config(config: Any) -> tuple[str, ...]:
  """Check every value that types alone do not; return the stages to run. Raises `ConfigError`."""
  if getattr(config, "command", ""):  # e.g. configs/scenes_pretrain.py: a testbed recipe
    raise ConfigError(f"this config is not a pipeline config: it is run by its own command, "
                      f"{config.command}")
  stages = parse_stages(config.stages)
  try:
    registry.load_plugins(config)
  except ImportError as e:
    raise ConfigError(str(e)) from None
  sources = ("",) + registry.source_names()
  if config.data.source not in sources:
    raise ConfigError(f"config.data.source={config.data.source!r} is not valid (valid: "
                      f"{', '.join(sources)}; a testbed adds its own through config.plugins, "
                      "e.g. --config.plugins=c3l_jax.scenes)")
  plugin = registry.SOURCES.get(config.data.source)
  problem = plugin.check(config) if plugin is not None and plugin.check is not None else None
  if problem:
    raise ConfigError(problem)
  for path, valid in CHOICES.items():
    value = _get(config, path)
    if value not in valid:
      raise ConfigError(f"config.{path}={value!r} is not valid (valid: {', '.join(valid)})")
  for path, (lo, lo_incl, hi, hi_incl) in _RANGES.items():
    value = _get(config, path)
    ok = (value >= lo if lo_incl else value > lo) and (value <= hi if hi_incl else value < hi)
    if not ok or (isinstance(value, float) and math.isnan(value)):
      interval = f"{'[' if lo_incl else '('}{lo}, {hi}{']' if hi_incl else ')'}"
      raise ConfigError(f"config.{path}={value!r} is out of range (must be in {interval})")
  for mesh in ("inference.mesh", "train.mesh"):
    sizes = {axis: _get(config, f"{mesh}.{axis}") for axis in ("data", "fsdp", "tensor")}
    if any(s == 0 or s < -1 for s in sizes.values()) or list(sizes.values()).count(-1) > 1:
      raise ConfigError(f"config.{mesh} {sizes} is not valid (sizes must be positive, or -1 = the "
                        "rest of the devices for at most one axis)")
  batch_shards = math.prod(max(_get(config, f"train.mesh.{a}"), 1) for a in ("data", "fsdp"))
  if config.train.batch_size % batch_shards:
    raise ConfigError(f"config.train.batch_size={config.train.batch_size} does not divide over the "
                      f"train mesh's data x fsdp = {batch_shards} devices")
  dist = config.distributed
  if dist.enabled and dist.num_processes > 0 and config.train.batch_size % dist.num_processes:
    raise ConfigError(f"config.train.batch_size={config.train.batch_size} (global) does not divide over "
                      f"config.distributed.num_processes={dist.num_processes}")
  gen = config.generation
  if not (gen.initial_temperature == -1 or gen.initial_temperature >= 0):
    raise ConfigError(f"config.generation.initial_temperature={gen.initial_temperature!r} must be >= 0 "
                      "(0 = greedy), or -1 for generation.temperature")
  if not (gen.initial_top_p == -1 or 0 < gen.initial_top_p <= 1):
    raise ConfigError(f"config.generation.initial_top_p={gen.initial_top_p!r} must be in (0, 1], or "
                      "-1 for generation.top_p")
  if config.model.family == "qwen25vl":  # what the variable-resolution family does not do (yet)
    listed = {name.strip() for name in str(config.stages).split(",")}
    if config.train.objective == "align" and ("train" in listed or "ablation" in listed):
      raise ConfigError("config.train.objective=align (CG-VLM) is not implemented for qwen25vl "
                        "(its patch features vary in number per picture): use c3l or vlit")
    if dist.enabled and ("train" in listed or "ablation" in listed):
      raise ConfigError("training qwen25vl with several processes (config.distributed) is not "
                        "implemented: train on one host (the inference stages run distributed)")
    if ("train" in listed or "ablation" in listed) and (
        config.train.inputs != "vigc" or config.train.anchor != "prompt"):
      raise ConfigError("config.train.inputs=as_generated and config.train.anchor=generated are not "
                        "implemented for qwen25vl yet (text-only prompts and generated anchors in a "
                        "packed-picture batch): use train.inputs=vigc, train.anchor=prompt")
    if "ablation" in listed:  # its rows train with their own overrides: the same limits hold there
      for name in (v.strip() for v in str(config.ablation.variants).split(",") if v.strip()):
        overrides = variant_overrides(config, name) or {}
        if (overrides.get("train.inputs", "vigc") != "vigc"
            or overrides.get("train.anchor", "prompt") != "prompt"
            or overrides.get("train.objective", "c3l") == "align"):
          raise ConfigError(f"config.ablation.variants: {name!r} trains with "
                            f"{', '.join(f'{k}={v}' for k, v in overrides.items())}, not implemented "
                            "for qwen25vl yet (see config.train.inputs / train.anchor / "
                            "train.objective): drop that variant")
  from c3l_jax.data import instructions  # jax-free
  try:
    instructions.parse_mix(config.generation.instruction_mix)
  except ValueError as e:
    raise ConfigError(f"config.generation.instruction_mix: {e}") from None
  known = registry.benchmark_names()
  benchmarks = [b.strip() for b in str(config.eval.benchmarks).split(",") if b.strip()]
  if not benchmarks or any(b not in known for b in benchmarks):
    bad = next((b for b in benchmarks if b not in known), "")
    raise ConfigError(f"config.eval.benchmarks={config.eval.benchmarks!r}: "
                      f"{'unknown benchmark ' + repr(bad) if bad else 'empty'} "
                      f"(a comma list of: {', '.join(known)})")
  trainable = config.train.trainable
  if isinstance(trainable, str) or not all(isinstance(p, str) for p in trainable):
    raise ConfigError(f"config.train.trainable={trainable!r} must be a tuple of regex strings, "
                      "e.g. --config.train.trainable=\"('connector', 'decoder')\"")
  for pattern in trainable:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"config.train.trainable: {pattern!r} is not a valid regex ({e})") from None
  if "ablation" in stages:
    _check_ablation(config)
  return stages


def _check_ablation(config: Any) -> None:
  for name in (v.strip() for v in config.ablation.variants.split(",") if v.strip()):
    if name not in ABLATION_VARIANTS and variant_overrides(config, name) is None:
      raise ConfigError(f"config.ablation.variants: unknown variant {name!r} (a comma list of: "
                        f"{', '.join(ABLATION_VARIANTS)}, or FIELD=VALUE[+FIELD=VALUE...])")
  for key in (k.strip() for k in config.ablation.seed_keys.split(",") if k.strip()):
    try:
      value = _get(config, key)
    except (AttributeError, KeyError):
      value = None
    if not isinstance(value, int) or isinstance(value, bool):
      raise ConfigError(f"config.ablation.seed_keys: {key!r} is not an integer config field")
  student = config.ablation.get("student", "")
  if student and not (epath.Path(student) / MODEL_CONFIG_FILE).exists():
    raise ConfigError(f"config.ablation.student={student!r} is not a model directory (no "
                      f"{MODEL_CONFIG_FILE}): give a converted or exported model")
  _check_student_data(config)


def _check_student_data(config: Any) -> None:
  """`ablation.student_data`: a source that builds it (and is the config's source, whose images its
  records name), or a records file holding enough records for `generation.num_final` generated ones at
  `ablation.student_data_share`."""
  data, share = config.ablation.student_data, config.ablation.student_data_share
  if not data:
    if config.ablation.student_steps:
      raise ConfigError(f"config.ablation.student_steps={config.ablation.student_steps} needs "
                        "config.ablation.student_data (what the student is instruction-tuned on)")
    return
  if not share > 0:
    raise ConfigError(f"config.ablation.student_data_share={share!r} must be > 0 with "
                      f"config.ablation.student_data={data!r} (the reference row trains on that share "
                      "alone); for fine-tunes on the generated data alone set ablation.student_data=''")
  builders = [name for name, s in registry.SOURCES.items() if s.instruction_data is not None]
  if data in registry.SOURCES or data in registry.BUILTIN_SOURCES:
    if data not in builders:
      raise ConfigError(f"config.ablation.student_data={data!r}: that source builds no instruction "
                        f"data (sources that do: {', '.join(builders) or 'none loaded'})")
    if config.data.source != data:
      raise ConfigError(f"config.ablation.student_data={data!r} needs config.data.source={data!r} "
                        f"(its records name that source's images), not {config.data.source!r}")
    return
  if not os.path.isfile(data):
    raise ConfigError(f"config.ablation.student_data={data!r} is neither a records file nor a source "
                      f"that builds the student's data ({', '.join(builders) or 'none loaded'})")
  rows, _ = read_records(data)
  need = student_count(config.generation.num_final, share)
  if len(rows) < need:
    raise ConfigError(f"config.ablation.student_data={data!r} holds {len(rows)} valid records; a share "
                      f"of {share} beside up to generation.num_final={config.generation.num_final} "
                      f"generated records needs {need}")


def student_count(generated: int, share: float) -> int:
  """How many of the student's own records join `generated` generated ones so that they are `share` of
  the fine-tune's records: round(generated * share / (1 - share))."""
  return int(round(generated * share / (1.0 - share)))


def needs_model(stages: Sequence[str], config: Any = None) -> tuple[str, ...]:
  """The stages that load a model (`select` too when `select.method=vigc`: it generates)."""
  vigc = config is not None and config.select.method == "vigc"
  return tuple(s for s in stages if s not in MODEL_FREE_STAGES or (s == "select" and vigc))


def is_implemented(name: str) -> bool:
  """Whether `c3l_jax.pipeline.<name>` exists (found without importing it)."""
  return importlib.util.find_spec(f"{__name__}.{name}") is not None


def implemented_stages() -> tuple[str, ...]:
  return tuple(s for s in STAGE_ORDER if is_implemented(s))


def environment_problems(config: Any, stages: Sequence[str]) -> list[str]:
  """What stops these stages from running here: a missing model directory, unimplemented stages."""
  problems = []
  model_stages = needs_model(stages, config)
  path = config.model.checkpoint
  if model_stages == ("eval",) and config.eval.checkpoint:  # eval alone, on a given model
    path = config.eval.checkpoint
  if model_stages:
    if not path:
      problems.append(f"model.checkpoint is not set but stage(s) {', '.join(model_stages)} need a model "
                      f"({CONVERT_HINT}, then pass --config.model.checkpoint=DIR)")
    elif not epath.Path(path).is_dir():
      problems.append(f"model.checkpoint {path!r} does not exist ({CONVERT_HINT})")
    elif not (epath.Path(path) / MODEL_CONFIG_FILE).is_file():
      problems.append(f"model.checkpoint {path!r} has no {MODEL_CONFIG_FILE}: not a c3l-jax model "
                      f"directory ({CONVERT_HINT})")
  available = ", ".join(implemented_stages()) or "none"
  for name in stages:
    if not is_implemented(name):
      problems.append(f"stage {name!r} is not implemented yet (available: {available})")
  return problems


def get_stage(name: str) -> Callable[[Any, str], dict]:
  """The `run(config, workdir) -> metrics` function of stage `name` (imports its module)."""
  if name not in STAGE_ORDER:
    raise ValueError(f"unknown stage {name!r} (valid: {', '.join(STAGE_ORDER)})")
  return importlib.import_module(f"{__name__}.{name}").run


def _json_default(obj: Any) -> Any:
  if hasattr(obj, "tolist"):  # numpy / jax scalars and arrays
    return obj.tolist()
  return str(obj)


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Write `obj` as JSON atomically (`records.write_text_atomic`)."""
  write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def run_stages(config: Any, workdir: str, stages: Sequence[str]) -> dict[str, dict]:
  """Run `stages` in order; merge each one's metrics into WORKDIR/metrics.json as `{stage: metrics}`.

  A finished stage leaves WORKDIR/<stage>/DONE.json (its metrics); a rerun in the same workdir skips it,
  and a stage interrupted midway skips the shards it finished (docs/design.md, "Data flow").
  With several processes every one runs every stage (each its share of the shards); the lead writes
  DONE.json and metrics.json, then all meet at a barrier, so no process starts the next stage before
  its input is complete (`runtime.Runtime.lead_writes`).
  """
  from c3l_jax import runtime  # imports jax: not at module level (see the module docstring)

  registry.load_plugins(config)
  rt = runtime.get()
  root = epath.Path(workdir)
  metrics: dict[str, dict] = {}
  if (root / "metrics.json").exists():
    metrics = json.loads((root / "metrics.json").read_text())
  for name in stages:
    done_path = root / name / "DONE.json"
    if done_path.exists():
      metrics[name] = json.loads(done_path.read_text())
      console.say(f"stage {name}: already done in this workdir, skipped")
      continue
    console.say(f"stage {name}: start")
    rt.check(f"{name}:start")
    start = time.perf_counter()
    result = dict(get_stage(name)(config, workdir) or {})
    metrics[name] = result

    def finish(done_path=done_path):  # DONE.json last: a failed write (a full disk) marks nothing done
      done_path.parent.mkdir(parents=True, exist_ok=True)
      write_json(root / "metrics.json", metrics)
      write_json(done_path, result)

    rt.lead_writes(f"{name}:done", finish)
    counts = console.counts(result)
    console.say(f"stage {name}: done in {time.perf_counter() - start:.1f}s"
                + (f" ({counts})" if counts else ""))
    logging.info("stage %s metrics: %s", name, json.dumps(result, default=_json_default))
  return metrics
