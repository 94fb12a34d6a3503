"""One trainer per run directory: an exclusive `flock` on `<run.dir>/.lock`, held for the run's life.

The kernel drops a flock when its holder dies, SIGKILL included, so a crash never leaves the
directory stuck. The lock file records who holds it (pid, host, command) for the refusal's one
line. In a torchrun job only global rank 0 takes it (the ranks of one job are one trainer); the
pipeline takes its root directory for all its stages, and each stage its own directory, so a
second pipeline or a lone stage started on either is refused. Within one process a held lock is
re-entered, not re-taken (a second flock on a new descriptor would block against ourselves).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from train.config.schema import ConfigError

LOCK_NAME = ".lock"

# realpath -> (open file holding the flock, depth of nested holds in this process)
_held: dict[str, list] = {}


class RunDirBusy(ConfigError):
    """Another live trainer holds this run directory (exit 2, one line naming it)."""


def _describe(lock_file: Path) -> str:
    try:
        owner = json.loads(lock_file.read_text())
        return f"pid {owner['pid']} on {owner['host']} ({owner['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def hold_run_dir(run_dir: Path | str, rank: int = 0) -> Iterator[None]:
    """Hold `run_dir` exclusively while the block runs; raise RunDirBusy if a live process holds it."""
    if rank != 0:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    lock_file = run_dir / LOCK_NAME
    handle = open(lock_file, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunDirBusy(f"run.dir={run_dir} is in use by {_describe(lock_file)}: wait for it to end, stop it, or "
                         "set another run.dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "command": " ".join(sys.argv)[:200]}) + "\n")
    handle.flush()
    _held[key] = [handle, 1]
    try:
        yield
    finally:
        _held.pop(key)
        handle.close()  # closing the last descriptor releases the flock
