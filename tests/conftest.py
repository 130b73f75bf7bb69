"""Test setup: 8 simulated CPU devices (so sharded code runs on a laptop), a shared compilation cache,
unoptimised CPU code generation, and the repo root on sys.path.

Runs when pytest imports it, before any test module, so jax has no backend yet when the device count is
set (each pytest-xdist worker is its own process and does the same).
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
# One persistent compilation cache for every test process and the launch.py subprocesses they start
# (they inherit the environment): the tiny models' programs are compiled once per machine, not once
# per process. Entries are keyed by the program and the jax version, so a stale entry is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "c3l-jax-tests-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# LLVM without its optimisation passes for the CPU programs (the same HLO and XLA passes, plainer machine
# code): the suite mostly compiles tiny models, and compiles them faster so (the grounded-recipe and
# shrunken-demo tests, cold cache, one core each: 148 s -> 107 s). Every test passes either way; a
# --xla_backend_optimization_level in XLA_FLAGS is left as it is.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402  (after JAX_PLATFORMS)
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `configs` (the config files) and `launch` are not installed
  sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def repo_root() -> pathlib.Path:
  return REPO_ROOT
