"""Headless Chromium for the `browser` tests: Debian's `chromium` driven by Playwright (`executable_path`, so no
browser download), and a real `kvrank serve` in a subprocess on a free loopback port.

scripts/test installs both (playwright from the `test` extra, chromium with apt-get); where that was not possible
the tests skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import kvrank
from kvrank.testing import ServerNotReady, wait_ready

CHROMIUM = os.environ.get("KVRANK_CHROMIUM", "/usr/bin/chromium")


def chromium_or_skip() -> str:
    """The Chromium binary, or skip the test saying what is missing and how to get it."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[test]' (scripts/test does)")
    path = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    if path is None:
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (scripts/test does where it can), or "
                    "set KVRANK_CHROMIUM to a Chromium binary")
    return path


@contextmanager
def browser() -> Iterator[Any]:
    """A headless Chromium (Playwright `Browser`)."""
    from playwright.sync_api import sync_playwright

    path = chromium_or_skip()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, headless=True,
                                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield launched
        finally:
            launched.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def kvrank_serve(model: Path, env: dict[str, str] | None = None, timeout_s: float = 120) -> Iterator[str]:
    """`kvrank serve` (the CLI, in a subprocess) on the demo corpus with `model`, BM25 first stage and
    uncompressed KV; yields its base URL once /readyz answers, and stops it with SIGTERM."""
    port = free_port()
    command = [sys.executable, "-m", "kvrank.cli", "serve", "--model", str(model), "--retriever", "bm25",
               "--kv-format", "none", "--port", str(port), "--host", "127.0.0.1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: an unread pipe would block the server
    # run from above the kvrank package this test imported, so that the server runs the same code
    process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, text=True,
                               cwd=Path(kvrank.__file__).parents[1])
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, process, timeout_s)
        except ServerNotReady as error:
            log.seek(0)
            raise AssertionError(f"{error}:\n{log.read()[-4000:]}") from None
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()
