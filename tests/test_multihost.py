"""The whole pipeline as a 2-task SLURM job on one machine: two `jax.distributed` processes x 4 CPU devices.

Each process is started as `srun` starts a task (SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID,
SLURM_STEP_NODELIST=localhost; jax derives the coordinator port from the job id) with
`--config.distributed=True`, on the shrunken scenes demo. The reference is one process with 8 devices.
Which process is slow, fails or is killed is decided by the `C3L_FAULT` test hook (c3l_jax/runtime.py),
at a fixed point of the run, so nothing here depends on the machine's speed.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import ports
from hf_reference import REPO

SCENES = os.path.join(REPO, "checkpoints", "scenes_tiny")
STAGES = ("initial", "filter", "score", "select", "train", "final", "export", "eval")
# The demo shrunk: 16 images x 3 samples in 4 initial shards, 4 score shards, 4 final shards, 3 steps.
SHRINK = ("--config.data.scenes_images=40", "--config.data.max_images=16",
          "--config.generation.per_image=3", "--config.generation.shard_size=4",
          "--config.generation.num_final=16", "--config.scoring.shard_size=12",
          "--config.train.steps=3", "--config.train.checkpoint_every=3",
          "--config.select.top_fraction=0.3", "--config.eval.pope_num_images=4",
          "--config.eval.max_items=8", "--config.eval.max_new_tokens=4",
          "--config.data.eval_batch_size=8")
TIMEOUT = 600


def _env(**extra):
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **extra}


def _cmd(workdir, tfds, *extra):
  return [sys.executable, "launch.py", f"--workdir={workdir}", f"--config.data.tfds_dir={tfds}",
          *SHRINK, *extra]


def _slurm_port() -> tuple[int, ports.Reservation]:
  """(SLURM_JOB_ID, the coordinator's port, held): jax's SLURM detection puts the coordinator on port
  61440 + job id % 4096; the port stays reserved (tests/ports.py) until the job's processes exit."""
  jobs = random.Random(os.urandom(8)).sample(range(4096), 200)
  reservation = ports.reserve(61440 + job for job in jobs)
  return reservation.port - 61440, reservation


class _Job(list):
  """The processes of one launch and the port reservation of their coordinator."""
  reservation: ports.Reservation


def launch_two(workdir, tfds, *extra, fault: str = "") -> list[subprocess.Popen]:
  """Start the two tasks of a SLURM step; each one's output goes to WORKDIR/../task-N.log.
  `fault`: the C3L_FAULT test hook (c3l_jax/runtime.py, `fault_point`)."""
  job, reservation = _slurm_port()
  procs = _Job()
  procs.reservation = reservation
  for i in range(2):
    env = _env(SLURM_JOB_ID=str(job), SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
               SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1", SLURM_NODEID="0",
               JAX_NUM_CPU_DEVICES="4", C3L_FAULT=fault)
    cmd = _cmd(workdir, tfds, "--config.distributed=True", *extra)
    log = open(os.path.join(os.path.dirname(workdir), f"task-{i}.log"), "a")
    procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env))
  return procs


def wait_all(procs, workdir, timeout=TIMEOUT) -> list[int]:
  deadline = time.time() + timeout
  codes = []
  try:
    for p in procs:
      try:
        codes.append(p.wait(timeout=max(1, deadline - time.time())))
      except subprocess.TimeoutExpired:
        for q in procs:
          q.kill()
        raise AssertionError(f"the job hung; logs:\n{_logs(workdir)}") from None
  finally:
    procs.reservation.release()
  return codes


def _logs(workdir) -> str:
  out = []
  for i in range(2):
    path = os.path.join(os.path.dirname(workdir), f"task-{i}.log")
    if os.path.exists(path):
      out.append(f"--- task {i}\n" + open(path, encoding="utf-8", errors="replace").read()[-3000:])
  return "\n".join(out)


def _rows(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _parts(d):
  return [r for p in sorted(os.listdir(d)) if p.startswith("part-") and p.endswith(".jsonl")
          and "rejected" not in p for r in _rows(os.path.join(d, p))]


def _copy_through(src, dst, stages):
  """A copy of workdir `src` in which only `stages` have run (their outputs and metrics)."""
  import shutil
  os.makedirs(dst)
  shutil.copy(src / "config.json", dst / "config.json")
  for stage in stages:
    shutil.copytree(src / stage, dst / stage)
  metrics = json.loads((src / "metrics.json").read_text())
  (dst / "metrics.json").write_text(json.dumps({s: metrics[s] for s in stages}))



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The one-process reference (every stage) and an uninterrupted two-process run in which, at
  alternate stage starts, process 0 and then process 1 sleeps 1 s, so that each enters half of the
  stages behind the other (the test checks this order from the two logs' timestamps)."""
  if not os.path.exists(os.path.join(SCENES, "c3l_model.json")):
    pytest.skip("the shipped scenes checkpoint is missing")
  root = tmp_path_factory.mktemp("multihost")
  tfds = root / "tfds"
  one = root / "one" / "w"
  proc = subprocess.run(_cmd(str(one), tfds), cwd=REPO, capture_output=True, text=True, env=_env())
  assert proc.returncode == 0, proc.stderr[-4000:]
  two = root / "two" / "w"
  os.makedirs(two.parent)
  slow = ",".join(f"{i % 2}:{stage}:start:sleep=1" for i, stage in enumerate(STAGES))
  procs = launch_two(str(two), tfds, fault=slow)
  assert wait_all(procs, str(two)) == [0, 0], _logs(str(two))
  return {"one": one, "two": two, "tfds": tfds, "root": root}


def _same_records(a, b, stage):
  ra, rb = _parts(a / stage), _parts(b / stage)
  assert [r["id"] for r in ra] == [r["id"] for r in rb], stage
  for x, y in zip(ra, rb):
    for key in set(x) | set(y):
      if key in ("i2c", "logp_image", "logp_text"):
        assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(x[key])), (stage, x["id"], key)
      else:
        assert x[key] == y[key], (stage, x["id"], key)


def test_two_processes_run_the_whole_pipeline_as_one(runs):
  one, two = runs["one"], runs["two"]
  metrics = json.loads((two / "metrics.json").read_text())
  assert list(metrics) == list(STAGES)
  for stage in STAGES:  # every stage finished once, its output written once
    assert (two / stage / "DONE.json").exists()
    assert not [p for p in os.listdir(two / stage) if p.endswith(".tmp")], stage
  # The inference stages hold the same records as the one-process run (text identical, S(I2C) 1e-5).
  for stage in ("initial", "filter", "score"):
    _same_records(one, two, stage)
  reference = json.loads((one / "metrics.json").read_text())
  for stage in ("initial", "filter", "score", "select", "final", "export", "eval"):
    _same_metrics(reference[stage], metrics[stage], (stage,), str(one), str(two))
  # Counts add up, no id twice, each shard by the process my_shards gives it.
  m = metrics["initial"]
  assert m["read"] == m["images"] + m["rejected"] and m["samples"] == m["written"] + m["samples_rejected"]
  for stage in ("initial", "filter", "score", "select", "final"):
    ids = [r["id"] for r in _parts(two / stage)]
    assert len(ids) == len(set(ids)), stage
  assert metrics["filter"]["read"] == metrics["filter"]["written"] + metrics["filter"]["rejected"]
  assert metrics["score"]["read"] == metrics["filter"]["written"]
  assert metrics["score"]["read"] == metrics["score"]["written"] + metrics["score"]["rejected"]
  assert metrics["final"]["written"] == metrics["final"]["kept"] + metrics["final"]["filtered_out"]
  assert len(_parts(two / "final" / "filtered")) == metrics["final"]["kept"]
  export = json.loads((two / "export" / "c3l_vlit.json").read_text())
  assert len(export) == metrics["final"]["kept"] == len({d["id"] for d in export})
  # Train, final, export and eval equal the one-process run's: the loss history (the same global batch
  # on 8 devices, gloo's reductions: 1e-4 as in tests/test_train.py), then greedy text, the exported
  # dataset byte for byte and the benchmark metrics.
  h1, h2 = _rows(one / "train" / "history.jsonl"), _rows(two / "train" / "history.jsonl")
  assert [h["step"] for h in h1] == [h["step"] for h in h2] == [1, 2, 3]
  for a, b in zip(h1, h2):
    for key in a:
      assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a, b)
  for stage in ("final", "final/filtered"):
    _same_records(one, two, stage)
  for name in ("c3l_vlit.json", "stats.json"):
    assert (one / "export" / name).read_bytes() == (two / "export" / name).read_bytes(), name
  # One workdir, one config.json, a log per process.
  assert (two / "config.json").exists()
  run0 = (two / "logs" / "run.log").read_text()
  run1 = (two / "logs" / "run.process-1.log").read_text()
  assert "process 0 of 2" in run0 and "process 1 of 2" in run1
  # The slow process really was behind: at each stage, the process that slept ended its sleep after
  # the other one had started the stage (each process's own log timestamps; one machine, one clock).
  logs = (run0, run1)
  for i, stage in enumerate(STAGES):
    sleeper, other = i % 2, 1 - i % 2
    woke = _log_time(logs[sleeper], f"fault injection: slept 1s at {stage}:start")
    started = _log_time(logs[other], f"stage {stage}: start")
    assert started < woke, (stage, sleeper, started, woke)
    assert f"fault injection: sleeping 1s at {stage}:start" not in logs[other], stage


def _same_metrics(want, got, where, one: str, two: str) -> None:
  """Counts and texts equal, floats (means of S(I2C), quality numbers) within 1e-5, paths in the
  workdir equal up to the workdir."""
  if isinstance(want, dict):
    assert isinstance(got, dict) and want.keys() == got.keys(), where
    for key in want:
      _same_metrics(want[key], got[key], where + (key,), one, two)
  elif isinstance(want, float):
    assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (where, want, got)
  elif isinstance(want, str) and one in want:
    assert got == want.replace(one, two), where
  else:
    assert got == want, (where, want, got)


def _log_time(log: str, needle: str) -> float:
  """Seconds since midnight of the first absl log line containing `needle` (`I1207 21:12:06.159424`)."""
  for line in log.splitlines():
    if needle in line:
      found = re.match(r"[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+)", line)
      assert found, line
      h, m, sec = found.groups()
      return int(h) * 3600 + int(m) * 60 + float(sec)
  raise AssertionError(f"no log line with {needle!r}")


def test_a_failing_process_ends_the_job_then_the_rerun_finishes(runs):
  """Process 1 raises after its first `score` shard: both exit non-zero, with the cause, promptly."""
  work = runs["root"] / "fail" / "w"
  _copy_through(runs["two"], work, ("initial", "filter"))
  procs = launch_two(str(work), runs["tfds"], "--config.stages=initial,filter,score",
                     fault="1:score:shard:fail")
  codes = wait_all(procs, str(work), timeout=TIMEOUT)
  assert codes[0] != 0 and codes[1] != 0, _logs(str(work))
  logs = _logs(str(work))
  assert "error: process 1: RuntimeError: injected failure at score:shard" in logs, logs
  assert "error: process 0: another process failed: process 1: RuntimeError" in logs, logs
  assert "Check failure stack trace" not in logs and "Terminating process" not in logs, logs
  assert not (work / "score" / "DONE.json").exists()
  assert (work / "logs" / "failure.txt").read_text().startswith("process 1: RuntimeError")
  procs = launch_two(str(work), runs["tfds"], "--config.stages=initial,filter,score")
  assert wait_all(procs, str(work)) == [0, 0], _logs(str(work))
  _same_records(runs["one"], work, "score")


def test_sigterm_then_sigkill_mid_stage_then_relaunch_exports_the_same(runs):
  """`final`, twice interrupted. First a preemption notice: SIGTERM to process 1 right after its first
  shard; jax's preemption service tells process 0 too, both stop at their next shard boundary, write
  nothing half-done and exit 143. Then a lost host: process 1 SIGKILLs itself after its first shard of
  the rerun; process 0's watchdog names it and exits 1. The relaunched job finishes and exports what
  the uninterrupted run did."""
  from c3l_jax.pipeline import shards

  work = runs["root"] / "kill" / "w"
  _copy_through(runs["two"], work, ("initial", "filter", "score", "select", "train"))
  final = work / "final"
  procs = launch_two(str(work), runs["tfds"], fault="1:final:shard:term")
  assert wait_all(procs, str(work)) == [143, 143], _logs(str(work))
  logs = _logs(str(work))
  assert "process 1: stopped by SIGTERM (a preemption notice)" in logs, logs
  assert "process 0: stopped by SIGTERM (a preemption notice)" in logs, logs
  assert "error:" not in logs and "Terminating process" not in logs, logs
  assert not (final / "DONE.json").exists() and (final / "part-00001.done").exists()
  done = [i for i in range(4) if (final / f"part-{i:05d}.done").exists()]
  assert all(shards.verify(str(final), i) is None for i in done), done  # the written parts are whole
  # The survivor's watchdog learns of the loss within 2/5 of the heartbeat timeout (100 s by default),
  # before jax's coordination service, which may declare the loss after half of it (16 s < 20 s here).
  procs = launch_two(str(work), runs["tfds"], "--config.distributed.heartbeat_timeout_s=40",
                     fault="1:final:shard:kill")
  codes = wait_all(procs, str(work))
  assert codes == [1, -signal.SIGKILL], (codes, _logs(str(work)))
  # The survivor's watchdog names the lost process (before jax's heartbeat timeout would abort it
  # with a crash dump, exit status 134).
  logs = _logs(str(work))
  assert "error: process 0: process 1 stopped responding (no heartbeat for" in logs, logs
  assert "Terminating process" not in logs and "Check failure" not in logs, logs
  assert not (work / "final" / "DONE.json").exists()
  procs = launch_two(str(work), runs["tfds"])
  assert wait_all(procs, str(work)) == [0, 0], _logs(str(work))
  for name in ("c3l_vlit.json", "stats.json"):
    assert (work / "export" / name).read_bytes() == (runs["two"] / "export" / name).read_bytes(), name
  assert "stage train: already done" in (work / "logs" / "run.log").read_text()


def test_sigterm_to_one_process_saves_one_step_everywhere_and_the_rerun_resumes(runs):
  """SIGTERM to process 1 after its first training step: jax's preemption service makes both processes
  save at the same step (one checkpoint) and exit 143; the rerun resumes from that step."""
  work = runs["root"] / "term" / "w"
  _copy_through(runs["two"], work, ("initial", "filter", "score", "select"))
  train = ("--config.stages=train", "--config.train.checkpoint_every=100")  # the run's 3 steps
  procs = launch_two(str(work), runs["tfds"], *train, fault="1:train:step:term")
  assert wait_all(procs, str(work)) == [143, 143], _logs(str(work))
  saved = [int(p) for p in os.listdir(work / "train" / "checkpoints") if p.isdigit()]
  assert len(saved) == 1 and 1 <= saved[0] < 3, saved
  logs = [(work / "logs" / name).read_text() for name in ("run.log", "run.process-1.log")]
  for log in logs:
    assert f"SIGTERM: saving a checkpoint at step {saved[0]}" in log
  procs = launch_two(str(work), runs["tfds"], *train)
  assert wait_all(procs, str(work)) == [0, 0], _logs(str(work))
  for name in ("run.log", "run.process-1.log"):
    assert f"resumed training from step {saved[0]}" in (work / "logs" / name).read_text()
  # The resumed run is the uninterrupted one: its loss history and its trained generator's weights.
  history = _rows(work / "train" / "history.jsonl")
  assert history == _rows(runs["two"] / "train" / "history.jsonl")
  assert json.loads((work / "train" / "DONE.json").read_text())["steps"] == 3
  resumed, uninterrupted = _generator(work), _generator(runs["two"])
  assert resumed.keys() == uninterrupted.keys() and resumed
  for name, value in uninterrupted.items():
    np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def _generator(workdir) -> dict:
  """The trained generator's parameters (WORKDIR/train/generator/params/<name>, one orbax item each)."""
  import orbax.checkpoint as ocp
  root = workdir / "train" / "generator" / "params"
  with ocp.PyTreeCheckpointer() as ckptr:
    numpy = {"value": ocp.RestoreArgs(restore_type=np.ndarray)}
    return {name: ckptr.restore(root / name, restore_args=numpy)["value"]
            for name in sorted(os.listdir(root))}
