"""Headless Chromium for the tests, driven through chromedriver's W3C WebDriver endpoint.

Debian's `chromium` and `chromium-driver` packages (`.ci/run` installs them) are all it needs: the
protocol is a few JSON requests, sent with urllib, so no selenium or playwright is involved.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def binaries() -> tuple[str, str] | None:
  """(chromium, chromedriver) paths, or None when either is not installed."""
  browser = next((p for p in map(shutil.which, CHROMIUM) if p), None)
  driver = shutil.which("chromedriver")
  return (browser, driver) if browser and driver else None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Page:
  """One browser session: `open(url)`, `run(js)` (the script's return value), `screenshot()` (PNG)."""

  def __init__(self, base: str, session: str):
    self._url = f"{base}/session/{session}"

  def _call(self, method: str, path: str, body: dict | None = None) -> Any:
    return _request(method, self._url + path, body)

  def open(self, url: str) -> None:
    self._call("POST", "/url", {"url": url})

  def run(self, script: str) -> Any:
    return self._call("POST", "/execute/sync", {"script": script, "args": []})

  def screenshot(self) -> bytes:
    return base64.b64decode(self._call("GET", "/screenshot"))


def _request(method: str, url: str, body: dict | None = None, timeout: float = 60) -> Any:
  data = None if body is None else json.dumps(body).encode()
  req = urllib.request.Request(url, data=data, method=method,
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as resp:
      return json.loads(resp.read())["value"]
  except urllib.error.HTTPError as e:  # WebDriver errors carry a JSON body naming the problem
    raise RuntimeError(f"webdriver {method} {url}: {e.read().decode(errors='replace')}") from None


@contextlib.contextmanager
def headless_page(width: int = 1200, height: int = 900) -> Iterator[Page]:
  """A fresh headless Chromium window of `width` x `height` CSS px."""
  found = binaries()
  if found is None:
    raise FileNotFoundError("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
  browser, driver = found
  port = _free_port()
  base = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  profile = tempfile.TemporaryDirectory()
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        if _request("GET", f"{base}/status", timeout=5)["ready"]:
          break
      except (OSError, RuntimeError):
        pass
      if time.monotonic() > deadline:
        raise TimeoutError("chromedriver did not start")
      time.sleep(0.2)
    args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", f"--window-size={width},{height}", f"--user-data-dir={profile.name}"]
    caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
        "binary": browser, "args": args}}}}
    session = _request("POST", f"{base}/session", caps)["sessionId"]
    try:
      yield Page(base, session)
    finally:
      with contextlib.suppress(OSError, RuntimeError):
        _request("DELETE", f"{base}/session/{session}")
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    profile.cleanup()
