"""Atomic writes: a file is written to a temporary file in the same folder, fsynced, then renamed over the target;
a folder is built in a staging folder beside its target and published with one rename (`publishing`)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """`$KVRANK_CACHE_DIR`, else `$XDG_CACHE_HOME/kvrank`, else `~/.cache/kvrank`."""
    if env := os.environ.get("KVRANK_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kvrank"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def publish_dir(staging: Path, target: Path) -> None:
    """Replace `target` with the fully written folder `staging` (same parent): readers see the old or the new."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def publishing(target: Path) -> Iterator[Path]:
    """Yield a staging folder beside `target`; publish it over `target` on success, else delete it.

    Staging folders carry their writer's pid; those of writers that died without cleaning up (SIGKILL, power
    loss) are removed here, before the next build of the same target."""
    _remove_dead_staging(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.pid{os.getpid()}.", suffix=".partial",
                                    dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_dir(staging, target)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_dead_staging(target: Path) -> None:
    if not target.parent.is_dir():
        return
    for leftover in target.parent.glob(f".{target.name}.pid*.partial"):
        match = re.match(rf"\.{re.escape(target.name)}\.pid(\d+)\.", leftover.name)
        if match and not pid_alive(int(match.group(1))):
            logger.info("removing %s, left by a build that did not finish", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
