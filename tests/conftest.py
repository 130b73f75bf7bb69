"""Test setup: 8 simulated CPU devices (so sharded code runs on a laptop) and the repo root on sys.path.

Runs when pytest imports it, before any test module, so jax has no backend yet when the device count is
set (each pytest-xdist worker is its own process and does the same).
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402  (after JAX_PLATFORMS)
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `configs` (the config files) and `launch` are not installed
  sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def repo_root() -> pathlib.Path:
  return REPO_ROOT
