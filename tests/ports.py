"""A free TCP port for a test's coordinator, taken without a race.

`reserve(candidates)` holds the port until the job is over: an exclusive lock file per port (so two
tests of the suite, in any worker, never pick the same one) and a socket bound to it with SO_REUSEPORT
(so nothing else on the machine binds it in the meantime, while jax's coordinator -- gRPC, which sets
SO_REUSEPORT too -- still can). `release()` when the processes have exited.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from typing import Iterable


class Reservation:
  def __init__(self, port: int, lock, sock: socket.socket):
    self.port, self._lock, self._sock = port, lock, sock

  def release(self) -> None:
    self._sock.close()
    fcntl.flock(self._lock, fcntl.LOCK_UN)
    self._lock.close()


def reserve(candidates: Iterable[int]) -> Reservation:
  for port in candidates:
    lock = open(os.path.join(tempfile.gettempdir(), f"c3l-test-port-{port}.lock"), "w")
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      lock.close()
      continue
    sock = socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
      sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", port))
    except OSError:
      sock.close()
      fcntl.flock(lock, fcntl.LOCK_UN)
      lock.close()
      continue
    return Reservation(port, lock, sock)
  raise RuntimeError("no free port for the coordinator")
