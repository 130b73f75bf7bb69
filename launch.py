r"""Run the C3L pipeline (or some of its stages) from an ml_collections config.

    python launch.py                                            # configs/scenes_demo.py, all stages
    python launch.py --config=configs/llava15.py:7b --workdir=runs/llava7b \
        --config.model.checkpoint=checkpoints/llava15-7b --config.stages=score,select
    python launch.py --config=configs/llava15.py:tiny --dry_run  # validate, write config.json, stop

Everything is checked before jax is imported or a device is touched: the flags and overrides
(unknown keys, wrong types: absl / ml_collections), the values (`c3l_jax.pipeline.check_config`), and
then whether the run can happen here (the model directory exists, the stages are implemented). Any
problem ends the run with one `error: ...` line on stderr and exit status 2.

`--dry_run` stops after the value checks and writing WORKDIR/config.json; the "can it run here"
problems are reported as `warning: ...` lines instead of errors (exit status 0). When the checkpoint
exists it also prints the memory plan: per stage, the bytes one device holds (`c3l_jax.memory`). A
real run checks that plan against `config.device_memory_gb` (0: what the backend reports) before
any stage starts, and stops with one `error:` line naming the stage and the remedy when it does not fit.

The console shows the workdir, a line per stage start / end with its counts, progress bars, warnings,
errors and the final tables; every library log line goes to WORKDIR/logs/run.log (`--verbosity=1`: to
the console too). See `c3l_jax.console`.
"""

from __future__ import annotations

import datetime
import difflib
import errno
import os
import re
import signal
import sys
from typing import NoReturn, Sequence

from c3l_jax import console

console.quiet_environment()  # before anything imports transformers / jax

from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from c3l_jax import pipeline, runtime  # noqa: E402
from c3l_jax.data.records import BadInput, disk_error  # noqa: E402

_REPO = os.path.dirname(os.path.abspath(__file__))


def _fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


# Config fields that moved: `--config.OLD...` -> the message naming where they went.
_MOVED = {"mesh": "config.mesh was split: config.inference.mesh (each process's local devices, the "
                  "inference stages) and config.train.mesh (every device of every process)"}


def _aliases(argv: list[str]) -> list[str]:
  """`--config.distributed=BOOL` (a bool before config.distributed became a group) means
  `--config.distributed.enabled=BOOL`; a moved field is an error that says where it went."""
  out = []
  for arg in argv:
    name, eq, value = arg.partition("=")
    if name.lstrip("-") == "config.distributed":
      arg = f"--config.distributed.enabled{eq}{value}" if eq else "--config.distributed.enabled"
    moved = name.lstrip("-").split(".")[1:2]
    if name.lstrip("-").startswith("config.") and moved and moved[0] in _MOVED:
      _fail(f"{arg}: {_MOVED[moved[0]]}")
    out.append(arg)
  return out


def _config_overrides(argv: Sequence[str]) -> list[str]:
  return [a for a in argv if a.startswith(("--config.", "-config."))]


def _abbreviates(typo: str, field: str) -> bool:
  """`lr` for `learning_rate`, `bs` for `batch_size`: the typo's letters are the initials of the
  field's words, or the field starts with the typo (`learn` for `learning_rate`)."""
  words = [w for w in field.split("_") if w]
  return len(typo) >= 2 and (typo == "".join(w[0] for w in words) or field.startswith(typo))


def _closest_fields(key: str, fields: Sequence[str]) -> list[str]:
  """The section's fields a mistyped `key` most likely meant: difflib's close matches (misspellings),
  then abbreviations (initials or a prefix), at most three."""
  close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
  return (close + [f for f in sorted(fields) if f not in close and _abbreviates(key, f)])[:3]


def _unknown_field(argv: Sequence[str], error: Exception) -> NoReturn:
  """ml_collections raised for `--config.SECTION.KEY=...` with a KEY the config lacks: one `error:`
  line naming the override and the SECTION's fields closest to KEY (exit status 2)."""
  found = re.search(r"[A-Za-z_][A-Za-z_0-9]*", str(error))
  key = found.group(0) if found else str(error)
  overrides = _config_overrides(argv)
  culprits = [a for a in overrides if key in a.split("=", 1)[0].split(".")[1:]] or overrides
  message = f"the config has no field {key!r}"
  if culprits:
    path = culprits[0].split("=", 1)[0].lstrip("-").split(".")[1:]
    section_path = path[:path.index(key)] if key in path else path[:-1]
    from configs import common  # pylint: disable=g-import-not-at-top  (only to name the fields)
    section = common.get_base_config()
    for name in section_path:
      section = section.get(name) if hasattr(section, "get") else None
    if hasattr(section, "keys"):
      prefix = "".join(f"{name}." for name in section_path)
      suggestions = [f"{prefix}{f}" for f in _closest_fields(key, list(section.keys()))]
      if suggestions:
        message += f"; did you mean {' or '.join(suggestions)}?"
    message = f"{culprits[0]}: {message}"
  _fail(f"{message} (see configs/common.py for all fields)")


if __name__ == "__main__":  # ml_collections reads the --config.* overrides from sys.argv, on DEFINE too
  sys.argv[1:] = _aliases(sys.argv)[1:]

try:  # with no --config, DEFINE applies the overrides to the default config and raises right here
  _CONFIG = config_flags.DEFINE_config_file(
      "config", default=os.path.join(_REPO, "configs", "scenes_demo.py"),
      help_string="Config file, configs/<name>.py[:arg]; override fields with --config.a.b=v.",
      lock_config=True)
except (AttributeError, KeyError) as _error:
  _unknown_field(sys.argv, _error)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory; default: a fresh runs/<config>-<UTC timestamp>.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate the config, write WORKDIR/config.json and exit without running stages.")


def _last_line(text: str) -> str:
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return lines[-1] if lines else ""


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure turned into one `error:` line and exit status 2."""
  argv = _aliases(argv)
  try:
    args = flags.FLAGS(argv)
    flags.FLAGS.config.to_dict()  # a missing config file only raises when the config is first used
    return args
  except flags.Error as e:
    message = str(e)
    marker = ": Error whilst parsing config file"
    if marker in message:  # get_config(arg) raised: keep its last line.
      config_arg = message.split(marker, 1)[0].removeprefix("flag ")
      cause = _last_line(message).removeprefix("ValueError: ")
      _fail(f"could not load {config_arg}: {cause}")
    _fail(" ".join(message.split()))
  except (AttributeError, KeyError) as e:  # ml_collections: override of a field the config lacks.
    _unknown_field(argv, e)
  except OSError as e:  # the config file itself cannot be loaded.
    _fail(f"could not load the config file: {_last_line(str(e))}")
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"could not parse the flags: {type(e).__name__}: {_last_line(str(e))}")


def _config_name() -> str:
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return f"{name}-{arg}" if arg else name


def _default_workdir() -> str:
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  base = os.path.join("runs", f"{_config_name()}-{stamp}")
  workdir, n = base, 1
  while os.path.exists(workdir):  # fresh, even for two launches within one second
    workdir, n = f"{base}-{n}", n + 1
  return workdir


def _resolve_workdir(path: str) -> epath.Path:
  """An absolute local path (orbax refuses relative checkpoint paths) or a gs:// (etc.) URI."""
  return epath.Path(path if "://" in path else os.path.abspath(path))


def _write_config(config, workdir: epath.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  except OSError as e:
    raise BadInput(f"cannot write to workdir {os.fspath(workdir)!r}: {e.strerror or e}") from None


def _check_devices(config, stages: Sequence[str]) -> None:
  """Mesh sizes against the devices there are (jax.distributed is up; nothing is on a device yet)."""
  import jax  # pylint: disable=g-import-not-at-top  (kept out of the validation path)
  from c3l_jax import sharding  # pylint: disable=g-import-not-at-top

  try:
    sharding.mesh_shape(dict(config.inference.mesh), jax.local_device_count())
    if "train" in stages or "ablation" in stages:
      shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(dict(config.train.mesh),
                                                               jax.device_count())))
      rows = shape["data"] * shape["fsdp"]
      if config.train.batch_size % rows or config.train.batch_size % jax.process_count():
        raise ValueError(f"config.train.batch_size={config.train.batch_size} (global) does not divide "
                         f"over the train mesh's data x fsdp = {rows} devices and "
                         f"{jax.process_count()} process(es)")
  except ValueError as e:
    raise pipeline.ConfigError(str(e)) from None


def _end_in_failure(rt: runtime.Runtime, e: BaseException) -> NoReturn:
  """One `error:` line; the other processes learn of it and stop too; leave together; exit non-zero.

  Exit status: 2 for bad input or config (`BadInput`, `ConfigError`), 143 when SIGTERM ended the run
  (training: after saving a checkpoint; an inference stage: at a shard boundary, `runtime.Preempted`;
  the rerun resumes), 1 otherwise (the traceback is in the log). A disk that cannot take
  a write (ENOSPC, EDQUOT, EROFS) is status 1 with the path and the errno: every write is atomic, so
  nothing half-written is marked done, and the rerun after freeing space resumes."""
  if isinstance(e, SystemExit) and e.code in (0, None):
    runtime.shutdown()
    raise e
  if isinstance(e, SystemExit) and e.code == 143:
    status, cause = 143, ("stopped by SIGTERM after saving a checkpoint (rerun with the same --workdir "
                          "to resume)")
  elif isinstance(e, runtime.Preempted):
    status, cause = 143, (f"{e}: every shard written is whole, the one in hand was not written; "
                          "rerun with the same --workdir to resume")
  elif isinstance(e, SystemExit):
    status, cause = int(e.code) if isinstance(e.code, int) else 1, f"stopped (exit status {e.code})"
  elif isinstance(e, runtime.JobFailed):
    status, cause = 1, f"another process failed: {e}"
  elif isinstance(e, (BadInput, pipeline.ConfigError)):
    status, cause = 2, str(e)
  elif disk_error(e) is not None:
    disk = disk_error(e)
    where = f"cannot write {disk.filename}" if disk.filename else f"cannot write to {rt.workdir}"
    status, cause = 1, (f"{where}: [Errno {disk.errno}] {errno.errorcode[disk.errno]} ({disk.strerror}); "
                        "free space or make it writable, then rerun with the same --workdir to resume")
    logging.info("the run failed", exc_info=e)
  else:
    status, cause = 1, f"{type(e).__name__}: {_last_line(str(e)) or '(no message)'}"
    logging.info("the run failed", exc_info=e)  # the traceback: to the log only
    cause += f" (traceback in {rt.workdir}/{console.log_file(rt.index)})"
  if not isinstance(e, runtime.JobFailed) and status != 143:
    rt.fail(cause)
  prefix = f"process {rt.index}: " if rt.distributed else ""
  print(f"error: {prefix}{cause}" if status != 143 else f"{prefix}{cause}", file=sys.stderr, flush=True)
  runtime.shutdown()
  sys.stdout.flush()
  os._exit(status)  # pylint: disable=protected-access  (jax's atexit hooks would wait for peers again)


def _memory_plan(config, stages: Sequence[str]):
  """The run's memory plan (`c3l_jax.memory`; None without a checkpoint to read the architecture from)
  and the line saying which stage does not fit, if one does not. Imports jax: after
  `jax.distributed.initialize()`."""
  from c3l_jax import memory  # pylint: disable=g-import-not-at-top
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  if (any(k.startswith("inference.mesh.") for k in overrides)
      and "inference.auto_mesh" not in overrides):
    config.inference.auto_mesh = False  # a mesh given on the command line is the user's choice
  plan = memory.run_plan(config, stages)
  if plan is None or not plan.stages:
    return None, None
  if plan.inference_mesh:  # the stages load their models on the mesh the plan chose
    config.inference.mesh.update(plan.inference_mesh)
  return plan, memory.misfit(plan, config)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])!r} (flags look like --name=value)")
  config = _CONFIG.value
  try:
    stages = pipeline.check_config(config)
  except pipeline.ConfigError as e:
    _fail(str(e))
  problems = pipeline.environment_problems(config, stages)
  if problems and not _DRY_RUN.value:
    _fail(problems[0])

  if _DRY_RUN.value:
    workdir = _resolve_workdir(_WORKDIR.value or _default_workdir())
    try:
      _write_config(config, workdir)
    except BadInput as e:
      _fail(str(e))
    for problem in problems:
      print(f"warning: {problem}", file=sys.stderr)
    plan, misfit = _memory_plan(config, stages) if not problems else (None, None)
    if plan is not None:
      if plan.mesh_choice:
        print(plan.mesh_choice)
      print(plan.table())
    if misfit:
      print(f"warning: {misfit}", file=sys.stderr)
    if "curate" in stages and not problems:  # the entries, tokens and projected time of the dataset
      from c3l_jax.pipeline import curate  # pylint: disable=g-import-not-at-top
      try:
        print("\n".join(curate.dry_run_lines(config)))
      except BadInput as e:
        _fail(str(e))
    print(f"dry run: config OK; stages {', '.join(stages)}; wrote {workdir / 'config.json'}")
    return

  console.quiet_until_setup()
  rt = runtime.init(config.distributed)
  try:
    # One workdir for the whole job: the lead picks it (a fresh timestamped one without --workdir).
    workdir = _resolve_workdir(rt.broadcast("workdir", _WORKDIR.value or
                                            (_default_workdir() if rt.is_lead else "")))
    rt.workdir = os.fspath(workdir)
    rt.grace_s = config.preemption_grace_s
    if not rt.distributed:  # with several, jax's preemption service takes SIGTERM (runtime.Watchdog)
      signal.signal(signal.SIGTERM, lambda signum, frame: rt.notice_preemption("SIGTERM"))
    rt.lead_writes("config.json", lambda: _write_config(config, workdir))
    log = console.setup(os.fspath(workdir), process=rt.index)
    import jax  # pylint: disable=g-import-not-at-top  (runtime.init imported it)
    logging.info("process %d of %d, %d local / %d global devices", rt.index, rt.count,
                 jax.local_device_count(), jax.device_count())
    where = log if "://" in rt.workdir else log.relative_to(workdir)
    console.say(f"workdir {workdir}; stages {', '.join(stages)}; log {where}"
                + (f"; {rt.count} processes" if rt.distributed else ""))
    _check_devices(config, stages)
    plan, misfit = _memory_plan(config, stages)  # before anything is on a device
    if plan is not None:
      if plan.mesh_choice:
        console.say(plan.mesh_choice)
      logging.info("memory plan:\n%s", plan.table())
    if misfit:
      raise pipeline.ConfigError(misfit)
    metrics = pipeline.run_stages(config, rt.workdir, stages)
  except BaseException as e:  # pylint: disable=broad-except
    _end_in_failure(rt, e)
  runtime.shutdown()
  quality = metrics.get("export", {}).get("quality")
  if quality:  # the source has ground truth (e.g. the scenes world): end with the initial-vs-final table
    from c3l_jax.pipeline.export import quality_table, quality_title  # pylint: disable=g-import-not-at-top
    console.say(f"\n{quality_title(config)}\n{quality_table(quality)}")
  outputs = [f for f in ("metrics.json", "export/c3l_vlit.json", "export/selected.json", "report.html",
                          "eval/table.txt", "ablation/table.txt") if (workdir / f).exists()]
  console.say(f"workdir: {workdir} ({', '.join(outputs)})")
  logging.info("done: metrics in %s", workdir / "metrics.json")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
