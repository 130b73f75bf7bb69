"""The run's processes: who this one is, who leads, how they meet, and how one failure ends them all.

One `Runtime` per process (`get()`); every stage asks it instead of asking jax:

- `index` / `count` / `is_lead` (process 0 leads: it writes the files every process shares, e.g.
  `DONE.json`, `metrics.json`, the export and the report);
- `my_shards(indices)`: the shards of a data-parallel stage this process computes (`i % count == index`);
- `barrier(name)`: every process waits here until all have arrived; `lead_writes(name, fn)`: `fn()` on
  the lead, then a barrier, so nobody reads a file before it is complete;
- `broadcast(name, value)`: the lead's value on every process (the resolved workdir);
- `fail(cause)` / `check()`: failure propagation (below).

Several processes (`--config.distributed=True`): `init` calls `jax.distributed.initialize()`, which finds a
TPU pod slice, a SLURM job or an Open MPI launch by itself, or uses `config.distributed.{coordinator_address,
num_processes, process_id}` when they are set. Barriers go through the coordination service's key-value
store (no device collective, no gloo rendezvous), polling once a second for a published failure.

A process that fails publishes its one-line cause (`fail`: the key `c3l/failed`, and
WORKDIR/logs/failure.txt for people); every other process sees it at its next barrier or shard boundary
(`check`, which raises `JobFailed`) and ends too. Then all of them leave through `shutdown()` (the
coordination service's own shutdown barrier, which they all reach), so the job exits non-zero within
seconds instead of hanging until a timeout aborts it. A process that vanishes without a word (SIGKILL,
a lost host) is noticed by the coordination service (`heartbeat_timeout_s`), which aborts the others.

Test hooks (`C3L_FAULT`, see `fault_point`) make a chosen process sleep, raise, or kill itself at a chosen
point, so the tests can make one process slower or failing deterministically.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys
import time
from typing import Any, Callable, Sequence, TypeVar

from absl import logging

T = TypeVar("T")

FAILED_KEY = "c3l/failed"
FAULT_ENV = "C3L_FAULT"
POLL_MS = 1000


class JobFailed(RuntimeError):
  """Another process of the job failed; the message is its one-line cause."""


class Runtime:
  """The processes of a run, as seen from one of them. `Runtime()` is the one-process runtime."""

  def __init__(self, index: int = 0, count: int = 1, client: Any = None, workdir: str = ""):
    self.index, self.count, self.client, self.workdir = index, count, client, workdir
    self._barriers = 0
    self._fired: set[str] = set()

  @property
  def is_lead(self) -> bool:
    return self.index == 0

  @property
  def distributed(self) -> bool:
    return self.count > 1

  def my_shards(self, indices: Sequence[int]) -> list[int]:
    """The shard indices this process handles (all of them with one process)."""
    return [i for i in indices if i % self.count == self.index]

  # -- meeting ---------------------------------------------------------------------------------------
  def barrier(self, name: str) -> None:
    """Wait until every process has arrived here. Raises `JobFailed` if one of them failed instead.

    Barriers are numbered in the order a process passes them, so every process must pass the same
    barriers in the same order (they do: stages run in the same order everywhere); `name` is for logs.
    """
    self.check()
    if self.count == 1:
      return
    self._barriers += 1
    key = f"c3l/barrier/{self._barriers:06d}/{name}"
    if self.client.key_value_increment(f"{key}/arrived", 1) == self.count:
      self.client.key_value_set(f"{key}/open", "1")
    start = time.monotonic()
    while True:
      try:
        self.client.blocking_key_value_get(f"{key}/open", POLL_MS)
        break
      except Exception as e:  # pylint: disable=broad-except  (jax's runtime error type is private)
        if "DEADLINE_EXCEEDED" not in str(e):
          raise JobFailed(f"lost the coordination service at barrier {name!r}: {_first_line(e)}"
                          ) from None
      self.check()
      if time.monotonic() - start > 60:
        logging.log_every_n_seconds(logging.INFO, "barrier %s: waiting for the other processes "
                                    "(%.0fs)", 60, name, time.monotonic() - start)
    logging.info("barrier %s: all %d processes arrived", name, self.count)

  def lead_writes(self, name: str, write: Callable[[], Any]) -> None:
    """`write()` on the lead only, then a barrier: after it, every process can read what was written."""
    if self.is_lead:
      write()
    self.barrier(name)

  def broadcast(self, name: str, value: str) -> str:
    """The lead's `value` (a string) on every process."""
    self.check()
    if self.count == 1:
      return value
    key = f"c3l/broadcast/{name}"
    if self.is_lead:
      self.client.key_value_set(key, value)
    while True:
      try:
        return self.client.blocking_key_value_get(key, POLL_MS)
      except Exception as e:  # pylint: disable=broad-except
        if "DEADLINE_EXCEEDED" not in str(e):
          raise JobFailed(f"lost the coordination service waiting for {name!r}: {_first_line(e)}"
                          ) from None
      self.check()

  # -- failure ---------------------------------------------------------------------------------------
  def check(self, point: str = "") -> None:
    """Raise `JobFailed` if another process has published a failure (cheap: one key lookup).
    `point` (e.g. "score:shard") is where the `C3L_FAULT` test hook may act."""
    if point:
      fault_point(self, point)
    if self.count == 1:
      return
    try:
      cause = self.client.key_value_try_get(FAILED_KEY)
    except Exception as e:  # pylint: disable=broad-except
      if "NOT_FOUND" in str(e):
        return
      raise JobFailed(f"lost the coordination service: {_first_line(e)}") from None
    raise JobFailed(cause)

  def fail(self, cause: str) -> None:
    """Publish this process's failure so that every other process stops at its next `check`."""
    cause = f"process {self.index}: {cause}" if self.count > 1 else cause
    if self.workdir:
      try:
        from etils import epath
        path = epath.Path(self.workdir) / "logs" / "failure.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cause + "\n")
      except Exception:  # pylint: disable=broad-except  (an unwritable workdir may be why it failed)
        pass
    if self.count > 1:
      try:
        self.client.key_value_set(FAILED_KEY, cause)
      except Exception:  # pylint: disable=broad-except  (already set by another process, or gone)
        pass


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


_RUNTIME: Runtime | None = None


def get() -> Runtime:
  """This process's runtime: the one `init` made, else what jax says (one process unless something
  else initialised `jax.distributed`)."""
  global _RUNTIME
  if _RUNTIME is None:
    import jax
    from jax._src import distributed as jax_distributed
    _RUNTIME = Runtime(jax.process_index(), jax.process_count(), jax_distributed.global_state.client)
  return _RUNTIME


def init(dist: Any) -> Runtime:
  """Start `jax.distributed` when `dist.enabled` (`config.distributed`), and make the runtime.

  Explicit `dist.coordinator_address` / `num_processes` / `process_id` are used where set; the rest
  `jax.distributed.initialize()` finds in the environment (TPU VM metadata, SLURM_*, OMPI_*).
  On CPU the cross-process collectives (training) use gloo.
  """
  global _RUNTIME
  import jax
  if dist.enabled:
    if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=dist.initialization_timeout_s,
                  heartbeat_timeout_seconds=dist.heartbeat_timeout_s,
                  shutdown_timeout_seconds=dist.shutdown_timeout_s)
    if dist.coordinator_address:
      kwargs["coordinator_address"] = dist.coordinator_address
    if dist.num_processes > 0:
      kwargs["num_processes"] = dist.num_processes
    if dist.process_id >= 0:
      kwargs["process_id"] = dist.process_id
    jax.distributed.initialize(**kwargs)
  from jax._src import distributed as jax_distributed
  _RUNTIME = Runtime(jax.process_index(), jax.process_count(), jax_distributed.global_state.client)
  return _RUNTIME


def shutdown() -> None:
  """Leave the job: with several processes, meet the others at the coordination service's shutdown
  barrier (every process reaches it, on success and on failure), so nobody is left waiting."""
  import jax
  from jax._src import distributed as jax_distributed
  if jax_distributed.global_state.client is not None:
    try:
      jax.distributed.shutdown()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("jax.distributed.shutdown: %s", _first_line(e))


def fault_point(rt: Runtime, point: str) -> None:
  """Test hook: `C3L_FAULT="PROCESS:STAGE:EVENT:ACTION[,...]"` acts when process PROCESS reaches
  `STAGE:EVENT` (e.g. `score:start`, `initial:shard`: after a shard is written; STAGE may be `*`).
  ACTION: `sleep=S` (every time), `fail` (raise RuntimeError), `kill` (SIGKILL itself), `term` (SIGTERM
  itself); `fail` / `kill` / `term` act once per process."""
  spec = os.environ.get(FAULT_ENV, "")
  for entry in filter(None, (s.strip() for s in spec.split(","))):
    process, stage, event, action = entry.split(":", 3)
    if int(process) != rt.index or not fnmatch.fnmatch(point, f"{stage}:{event}"):
      continue
    if action.startswith("sleep="):
      logging.info("fault injection: sleeping %ss at %s", action[6:], point)
      time.sleep(float(action[6:]))
      continue
    if entry in rt._fired:  # pylint: disable=protected-access
      continue
    rt._fired.add(entry)  # pylint: disable=protected-access
    logging.warning("fault injection: %s at %s", action, point)
    if action == "fail":
      raise RuntimeError(f"injected failure at {point}")
    if action in ("kill", "term"):
      sys.stdout.flush()
      sys.stderr.flush()
      os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGTERM)


__all__ = ["JobFailed", "Runtime", "fault_point", "get", "init", "shutdown"]
