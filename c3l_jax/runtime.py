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
an OOM kill, a lost host) is noticed by the others' watchdogs (`Watchdog`: every process publishes a
heartbeat once a second in the key-value store and watches the others'): after two fifths of
`heartbeat_timeout_s` without one, every survivor prints `error: process M: process N stopped
responding (...)` and exits 1, before the coordination service would abort it (jax's fatal error,
exit 134 and a crash dump). A watchdog that loses the coordination service itself (process 0 gone)
says so the same way.

Test hooks (`C3L_FAULT`, see `fault_point`) make a chosen process sleep, raise, or kill itself at a chosen
point, so the tests can make one process slower or failing deterministically.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence, TypeVar

from absl import logging

T = TypeVar("T")

FAILED_KEY = "c3l/failed"
FAULT_ENV = "C3L_FAULT"
POLL_MS = 1000


# The key jax's preemption service (started by `jax.distributed.initialize`, which takes SIGTERM) sets
# in the coordination service when any process receives SIGTERM.
PREEMPTION_NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"
PREEMPTED_STATUS = 143  # 128 + SIGTERM, what a scheduler expects of a process it preempted


class JobFailed(RuntimeError):
  """Another process of the job failed; the message is its one-line cause."""


class Preempted(RuntimeError):
  """SIGTERM (a preemption notice) reached the job outside training: this process stopped at a shard
  boundary, with everything it wrote whole; the rerun resumes."""


class Runtime:
  """The processes of a run, as seen from one of them. `Runtime()` is the one-process runtime."""

  def __init__(self, index: int = 0, count: int = 1, client: Any = None, workdir: str = ""):
    self.index, self.count, self.client, self.workdir = index, count, client, workdir
    self._barriers = 0
    self._fired: set[str] = set()
    # Preemption (`notice_preemption`): when the notice came (time.monotonic), how long the shard in
    # hand may still take, and whether training runs (it saves at a step agreed by jax instead).
    self.preempted_at: float | None = None
    self.grace_s = 20.0
    self.training = False

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
    if self.preempted_at is not None and not self.training:
      raise Preempted(f"stopped by SIGTERM (a preemption notice) at {point or 'a barrier'}")
    if self.count == 1:
      return
    try:
      cause = self.client.key_value_try_get(FAILED_KEY)
    except Exception as e:  # pylint: disable=broad-except
      if "NOT_FOUND" in str(e):
        return
      raise JobFailed(f"lost the coordination service: {_first_line(e)}") from None
    raise JobFailed(cause)

  def notice_preemption(self, how: str) -> None:
    """SIGTERM reached this job (`how`): outside training, `check` raises `Preempted` at the next shard
    boundary or barrier, and after `grace_s` a shard still in hand is abandoned (`_abandon`: exit 143,
    nothing of the shard written). In training the trainer saves at a step every process agrees on."""
    if self.preempted_at is not None:
      return
    self.preempted_at = time.monotonic()
    logging.warning("preemption notice (%s): stopping at the next shard boundary, at most %.0f s from "
                    "now", how, self.grace_s)
    timer = threading.Timer(self.grace_s, _abandon, args=(self,))
    timer.daemon = True
    timer.start()

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


class Watchdog:
  """Heartbeats between the processes, on a daemon thread: once a second this process writes
  `c3l/alive/INDEX` (a counter) and reads the others'. A process whose counter has not moved for
  `limit_s` stopped responding (SIGKILL, OOM kill, lost host): `on_lost(index, how)` is called (it ends
  this process). A process that finished or failed writes `done` and is not watched any more.
  The coordination service's own heartbeat timeout stays the backstop; `limit_s` is below it."""

  PREFIX = "c3l/alive/"

  def __init__(self, rt: "Runtime", limit_s: float, on_lost: Callable[[int, str], None],
               interval_s: float = 1.0):
    self.rt, self.limit_s, self.on_lost, self.interval_s = rt, limit_s, on_lost, interval_s
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="c3l-watchdog", daemon=True)

  def start(self) -> "Watchdog":
    self._thread.start()
    return self

  def stop(self) -> None:
    """Stop watching and tell the others this process left on purpose."""
    if self._stop.is_set():
      return
    self._stop.set()
    try:
      self.rt.client.key_value_set(f"{self.PREFIX}{self.rt.index}", "done", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  (the service may be gone already)
      pass

  def _run(self) -> None:
    client, me = self.rt.client, self.rt.index
    seen = {j: ("", time.monotonic()) for j in range(self.rt.count) if j != me}
    beat = 0
    while not self._stop.wait(self.interval_s):
      beat += 1
      try:
        client.key_value_set(f"{self.PREFIX}{me}", str(beat), allow_overwrite=True)
        values = dict(client.key_value_dir_get(self.PREFIX))
        if _has_key(client, PREEMPTION_NOTICE_KEY):
          self.rt.notice_preemption("SIGTERM to a process of the job, from jax's preemption service")
      except Exception as e:  # pylint: disable=broad-except
        if self.rt.preempted_at is not None and not self.rt.training:
          _abandon(self.rt)  # process 0 left first: the job is being preempted anyway
        elif not self._stop.is_set() and me != 0:
          self.on_lost(0, f"the coordination service it hosts is gone: {_first_line(e)}")
        return
      now = time.monotonic()
      for j in list(seen):
        value = values.get(f"{self.PREFIX}{j}", "")
        if value == "done":
          del seen[j]
        elif value != seen[j][0]:
          seen[j] = (value, now)
        elif now - seen[j][1] > self.limit_s and not self._stop.is_set():
          self.on_lost(j, f"no heartbeat for {now - seen[j][1]:.0f} s: killed, out of memory, or its "
                          "host lost")
          return


def _has_key(client: Any, key: str) -> bool:
  try:
    client.key_value_try_get(key)
    return True
  except Exception as e:  # pylint: disable=broad-except  (jax's runtime error type is private)
    if "NOT_FOUND" in str(e):
      return False
    raise


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
  if _RUNTIME.distributed:
    global _WATCHDOG
    _WATCHDOG = Watchdog(_RUNTIME, watchdog_limit_s(dist.heartbeat_timeout_s), _lost).start()
  return _RUNTIME


_WATCHDOG: Watchdog | None = None


def watchdog_limit_s(heartbeat_timeout_s: float) -> float:
  """How long a silent process is waited for: two fifths of jax's heartbeat timeout (at least 3 s),
  so the watchdog speaks before the coordination service aborts every process. Not two thirds: jax's
  agents send a heartbeat every half timeout, so the service may declare a dead process after only
  half the timeout (seen: 8.6 s after a SIGKILL with a 15 s timeout, and every survivor aborted)."""
  return max(3.0, heartbeat_timeout_s * 2 / 5)


def _lost(index: int, how: str) -> None:
  """A process stopped responding: publish and print one `error:` line, and exit 1 at once (not through
  jax's shutdown barrier, which the lost process would never reach)."""
  rt = get()
  cause = (f"process {index} stopped responding ({how}); rerun the same command with the same "
           "--workdir to resume")
  try:
    logging.info("%s", cause)  # to the log file; the console gets the one `error:` line below
    rt.fail(cause)
  finally:
    print(f"error: process {rt.index}: {cause}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access


def _abandon(rt: Runtime) -> None:
  """The grace after a preemption notice is over and this process is still in a shard (not in
  training): leave without writing it (every write is atomic: nothing half-done stays) and exit 143,
  meeting the other processes at jax's shutdown barrier so none is left waiting."""
  if rt.training:
    return
  logging.warning("preemption: abandoning the shard in hand after the %.0f s grace", rt.grace_s)
  prefix = f"process {rt.index}: " if rt.distributed else ""
  print(f"{prefix}stopped by SIGTERM (a preemption notice): abandoned the shard in hand after "
        f"{rt.grace_s:.0f} s, nothing of it written; rerun with the same --workdir to resume",
        file=sys.stderr, flush=True)
  sys.stdout.flush()
  shutdown()
  os._exit(PREEMPTED_STATUS)  # pylint: disable=protected-access


def shutdown() -> None:
  """Leave the job: with several processes, meet the others at the coordination service's shutdown
  barrier (every process reaches it, on success and on failure), so nobody is left waiting."""
  import jax
  from jax._src import distributed as jax_distributed
  if _WATCHDOG is not None:
    _WATCHDOG.stop()
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
      logging.info("fault injection: slept %ss at %s", action[6:], point)
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


__all__ = ["JobFailed", "Preempted", "Runtime", "Watchdog", "fault_point", "get", "init", "shutdown"]
