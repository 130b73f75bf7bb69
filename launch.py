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
real run checks that plan against `config.mesh.device_memory_gb` (0: what the backend reports) before
any stage starts, and stops with one `error:` line naming the stage and the remedy when it does not fit.

The console shows the workdir, a line per stage start / end with its counts, progress bars, warnings,
errors and the final tables; every library log line goes to WORKDIR/logs/run.log (`--verbosity=1`: to
the console too). See `c3l_jax.console`.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import NoReturn, Sequence

from c3l_jax import console

console.quiet_environment()  # before anything imports transformers / jax

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from c3l_jax import pipeline  # noqa: E402
from c3l_jax.data.records import BadInput  # noqa: E402

_REPO = os.path.dirname(os.path.abspath(__file__))

_CONFIG = config_flags.DEFINE_config_file(
    "config", default=os.path.join(_REPO, "configs", "scenes_demo.py"),
    help_string="Config file, configs/<name>.py[:arg]; override fields with --config.a.b=v.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory; default: a fresh runs/<config>-<UTC timestamp>.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate the config, write WORKDIR/config.json and exit without running stages.")


def _fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _last_line(text: str) -> str:
  lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
  return lines[-1] if lines else ""


def _config_overrides(argv: Sequence[str]) -> list[str]:
  return [a for a in argv if a.startswith(("--config.", "-config."))]


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure turned into one `error:` line and exit status 2."""
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
    key = str(e).strip("'\"")
    culprits = [a for a in _config_overrides(argv)
                if key in a.split("=", 1)[0].split(".")[1:]] or _config_overrides(argv)
    where = f"{culprits[0]}: " if culprits else ""
    _fail(f"{where}the config has no field {key!r} (see configs/common.py for all fields)")
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


def _memory_plan(config, stages: Sequence[str]):
  """The run's memory plan (`c3l_jax.memory`; None without a checkpoint to read the architecture from)
  and the line saying which stage does not fit, if one does not. Imports jax: after
  `jax.distributed.initialize()`."""
  from c3l_jax import memory  # pylint: disable=g-import-not-at-top
  plan = memory.run_plan(config, stages)
  if plan is None or not plan.stages:
    return None, None
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

  # Absolute: orbax refuses relative checkpoint paths.
  workdir = os.path.abspath(_WORKDIR.value or _default_workdir())
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) + "\n")
  except OSError as e:
    _fail(f"cannot write to workdir {workdir!r}: {e.strerror or e}")

  if _DRY_RUN.value:
    for problem in problems:
      print(f"warning: {problem}", file=sys.stderr)
    plan, misfit = _memory_plan(config, stages) if not problems else (None, None)
    if plan is not None:
      print(plan.table())
    if misfit:
      print(f"warning: {misfit}", file=sys.stderr)
    print(f"dry run: config OK; stages {', '.join(stages)}; wrote {os.path.join(workdir, 'config.json')}")
    return

  log = console.setup(workdir)
  console.say(f"workdir {workdir}; stages {', '.join(stages)}; log {os.path.relpath(log, workdir)}")
  if config.distributed:
    import jax  # pylint: disable=g-import-not-at-top  (kept out of the validation path)
    jax.distributed.initialize()
  plan, misfit = _memory_plan(config, stages)
  if plan is not None:
    logging.info("%s", plan.table())
  if misfit:
    _fail(misfit)
  try:
    metrics = pipeline.run_stages(config, workdir, stages)
  except BadInput as e:  # strict mode, or an input no stage can start from
    _fail(str(e))
  quality = metrics.get("export", {}).get("quality")
  if quality:  # the source has ground truth (e.g. the scenes world): end with the initial-vs-final table
    from c3l_jax.pipeline.export import quality_table, quality_title  # pylint: disable=g-import-not-at-top
    print(f"\n{quality_title(config)}")
    print(quality_table(quality))
  outputs = [f for f in ("metrics.json", "export/c3l_vlit.json", "report.html", "eval/table.txt",
                          "ablation/table.txt") if os.path.exists(os.path.join(workdir, f))]
  print(f"workdir: {workdir} ({', '.join(outputs)})")
  logging.info("done: metrics in %s", os.path.join(workdir, "metrics.json"))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
