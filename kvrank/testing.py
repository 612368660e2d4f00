"""Helpers for tests and benchmarks that start `kvrank serve` in a subprocess (needs httpx, in the `test` extra)."""

from __future__ import annotations

import subprocess
import time


class ServerNotReady(RuntimeError):
    """The server process exited, or /readyz did not answer 200 in time."""


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float, poll_s: float = 0.2) -> float:
    """Poll `url`/readyz until it answers 200; return the seconds waited. Raise `ServerNotReady` as soon as
    `process` exits, or after `timeout_s` (callers add the server's log to the message)."""
    import httpx

    start = time.time()
    while True:
        if process.poll() is not None:
            raise ServerNotReady(f"kvrank serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.time() - start
        except httpx.TransportError:
            pass
        if time.time() - start > timeout_s:
            raise ServerNotReady(f"kvrank serve did not become ready within {timeout_s:.0f} s")
        time.sleep(poll_s)
