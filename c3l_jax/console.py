"""What a run shows on the console, and where the library's logs go.

The console is for people: the workdir, one line when a stage starts and one when it ends (with its
counts), the stages' progress bars (tqdm, on stderr), warnings, errors and the final tables. Every log
line of the libraries underneath (absl, orbax, tensorflow-datasets, jax, transformers) and the
pipeline's own INFO lines (one per finished shard, the loaded model, ...) go to `WORKDIR/logs/run.log`;
`--verbosity=1` shows them on the console too.

Warnings that do not apply to the run are dropped from the console (they stay in the log): jax's
platform probing (no libtpu, no CUDA on a CPU run), tensorflow-datasets' "Using custom data
configuration" note. `quiet_environment()` (called before jax / transformers are imported) turns off
transformers' advisory warnings ("PyTorch was not found") and TensorFlow / XLA's C++ INFO lines.
"""

from __future__ import annotations

import contextlib
import io
import logging as std_logging
import os
from typing import Any, Iterator, Mapping

from absl import logging
from etils import epath

LOG_FILE = os.path.join("logs", "run.log")

_QUIET_ENV = {
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",  # "PyTorch was not found ..." and the like
    "TF_CPP_MIN_LOG_LEVEL": "2",  # TensorFlow / XLA C++ INFO and WARNING lines
}
# (logger name prefix, message prefix or "" for any): warnings that never apply to a run's outcome.
_NOT_APPLICABLE = (
    ("jax._src.xla_bridge", ""),  # platform probing: "Unable to initialize backend 'tpu'", CUDA fallback
    ("jax._src.cloud_tpu_init", ""),
    ("absl", "Using custom data configuration"),  # tfds, for every builder config it is handed
)
_FILE_HANDLER_NAME = "c3l_jax.run_log"
_LEAD = True  # whether this process prints `say` lines (the lead of several processes, see `setup`)


def quiet_environment() -> None:
  """Environment variables that keep library chatter off the console; call before importing them."""
  for key, value in _QUIET_ENV.items():
    os.environ.setdefault(key, value)


class _ConsoleFilter(std_logging.Filter):
  """Drops from the console what is already printed (`say`) and warnings that do not apply."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if getattr(record, "c3l_console", False):
      return False
    if record.levelno >= std_logging.ERROR:
      return True
    for logger, prefix in _NOT_APPLICABLE:
      if record.name.startswith(logger) and str(record.msg).startswith(prefix):
        return False
    return True


def log_file(process: int = 0) -> str:
  """The log of process `process`, relative to WORKDIR: logs/run.log (process 0, the lead) or
  logs/run.process-N.log."""
  return LOG_FILE if process == 0 else os.path.join("logs", f"run.process-{process}.log")


def quiet_until_setup(verbosity: int | None = None) -> None:
  """Keep library INFO lines (jax.distributed's, before the workdir is known) off the console until
  `setup` opens the log file."""
  if verbosity is None:
    verbosity = max(logging.get_verbosity(), 0)
  logging.get_absl_handler().setLevel(std_logging.INFO if verbosity >= 1 else std_logging.WARNING)


def setup(workdir: str, verbosity: int | None = None, process: int = 0) -> epath.Path:
  """Send every log line to `WORKDIR/logs/run.log` (appended: a resumed run continues the file) and
  keep the console (absl's stderr handler) to warnings and errors, or INFO with `verbosity >= 1`
  (default: absl's `--verbosity` flag). Returns the log file's path. Safe to call again.

  With several processes each writes its own log (`log_file(process)`) and only the lead (process 0)
  prints `say` lines and progress bars; every process prints its warnings and errors. The log is a
  local file: with a gs:// workdir it goes to the same relative path under the current directory."""
  global _LEAD
  _LEAD = process == 0
  if verbosity is None:
    verbosity = max(logging.get_verbosity(), 0)
  path = epath.Path(workdir) / log_file(process)
  if "://" in os.fspath(workdir):  # logging.FileHandler needs a local file
    path = epath.Path(os.path.abspath(log_file(process)))
  path.parent.mkdir(parents=True, exist_ok=True)
  root = std_logging.getLogger()
  for h in [h for h in root.handlers if h.get_name() == _FILE_HANDLER_NAME]:
    root.removeHandler(h)
    h.close()
  file_handler = std_logging.FileHandler(os.fspath(path), encoding="utf-8")
  file_handler.set_name(_FILE_HANDLER_NAME)
  file_handler.setFormatter(logging.PythonFormatter())
  file_handler.setLevel(std_logging.DEBUG if verbosity >= 2 else std_logging.INFO)
  root.addHandler(file_handler)
  root.setLevel(min(root.level or std_logging.INFO, std_logging.INFO))
  logging.set_verbosity(max(verbosity, 0))  # keeps absl's own level <= INFO for the file
  console = logging.get_absl_handler()
  console.setLevel(std_logging.INFO if verbosity >= 1 else std_logging.WARNING)
  if not any(isinstance(f, _ConsoleFilter) for f in console.filters):
    console.addFilter(_ConsoleFilter())
  if console not in root.handlers:
    logging.use_absl_handler()
  std_logging.captureWarnings(True)  # python warnings: to the log, and the console at WARNING
  return path


def say(message: str) -> None:
  """One line for people on stdout (the lead's only, with several processes); the same line in the log."""
  if _LEAD:
    print(message, flush=True)
  logging.info(message, extra={"c3l_console": True})


def is_lead() -> bool:
  """Whether this process prints the run's lines and progress bars (`setup`)."""
  return _LEAD


def counts(metrics: Mapping[str, Any]) -> str:
  """`read 300, written 593, rejected 0, ...`: the integer entries of a stage's metrics, in order."""
  return ", ".join(f"{k} {v}" for k, v in metrics.items()
                   if isinstance(v, int) and not isinstance(v, bool))


@contextlib.contextmanager
def captured_stdout(label: str) -> Iterator[None]:
  """Run a block whose prints (e.g. tensorflow-datasets' preparation notes) go to the log instead."""
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    yield
  for line in buffer.getvalue().splitlines():
    if line.strip():
      logging.info("%s: %s", label, line.strip())


def prepare_tfds(builder: Any, label: str, **kwargs: Any) -> None:
  """`builder.download_and_prepare(**kwargs)` without tensorflow-datasets' own progress bars and
  prints on the console: one line when it prepares (once per dataset), its notes in the log."""
  import tensorflow_datasets as tfds

  if os.path.isfile(os.path.join(os.fspath(builder.data_dir), "dataset_info.json")):
    return  # already prepared: tfds only reads it
  say(f"{label}: preparing the tfds dataset in {os.fspath(builder.data_dir)} (once)")
  tfds.display_progress_bar(False)
  try:
    with captured_stdout(label):
      builder.download_and_prepare(**kwargs)
  finally:
    tfds.display_progress_bar(True)


__all__ = ["LOG_FILE", "captured_stdout", "counts", "is_lead", "log_file", "prepare_tfds",
           "quiet_environment", "quiet_until_setup", "say", "setup"]
