"""Run a script in this process and SIGKILL the process the moment a given path is renamed into place.

    python tests/kill_at.py WORKDIR/initial/part-00000.done launch.py --config=... --workdir=WORKDIR

Shards, their `.done` markers and orbax checkpoints are written to a temporary name and renamed
(`os.replace` / `os.rename`); this wraps both, so the kill lands right after that rename, at the same
point of the run however fast or loaded the machine is (a test that polls for the file and then kills
the process would depend on how much the run does in between).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def _killing(rename):
  def wrapped(src, dst, *args, **kwargs):
    out = rename(src, dst, *args, **kwargs)
    if os.path.abspath(os.fspath(dst)) == MARKER:
      os.kill(os.getpid(), signal.SIGKILL)
    return out
  return wrapped


MARKER = os.path.abspath(sys.argv[1])
os.replace, os.rename = _killing(os.replace), _killing(os.rename)
script, sys.argv = sys.argv[2], sys.argv[2:]
sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script` would have it
runpy.run_path(script, run_name="__main__")
