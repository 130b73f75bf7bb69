"""`bench/gpu.py --size=small` runs to the end on CPU and prints one JSON line per figure, each with
c3l_jax's and torch's measurements (their values are timings: not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIELDS = {"score": ("tokens_per_s", "mfu"), "generate": ("tokens_per_s", "hbm_gbs"),
          "train": ("mfu", "seconds")}


def test_gpu_suite_small_runs_on_cpu():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one device per side, as on one GPU
  proc = subprocess.run([sys.executable, "bench/gpu.py", "--size=small", "--repeats=1"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(line) for line in proc.stdout.splitlines()]
  figures = {line["figure"]: line for line in lines}
  assert [line["figure"] for line in lines] == ["score", "generate", "train", "device"]
  for name, fields in FIELDS.items():
    for side in ("ours", "torch"):
      got = figures[name][side]
      assert "error" not in got, (name, side, got)
      assert all(isinstance(got[f], float) and got[f] > 0 for f in fields), (name, side, got)
    assert figures[name]["ratio"] > 0
  assert figures["train"]["ours"]["layers"] == figures["train"]["torch"]["layers"] == 2
  assert figures["generate"]["ours"]["batch"] == figures["generate"]["torch"]["batch"] == 4
  assert {"ours", "torch"} <= set(figures["device"]) and figures["device"]["size"] == "small"
