"""How a training command ends: every expected failure as one line on stderr and an exit code.

    0   done
    1   checkpoint could not be written (e.g. no space left; the previous one stays `latest`)
    2   config or data error (named field, file or source)
    75  preempted (saved at a step boundary, or stopped before the first step): rerun to resume
    130 interrupted (SIGINT)
"""

from __future__ import annotations

import sys
from typing import Callable

from data_pipelines.training.shards import DataError
from train.checkpoint.store import CheckpointWriteError
from train.config.schema import ConfigError
from train.loop.preemption import EXIT_PREEMPTED, Preempted

EXIT_INTERRUPTED = 130


def run_to_exit_code(run: Callable[[], object]) -> int:
    """`run()`, its expected failures printed as one line each and turned into exit codes."""
    try:
        run()
    except Preempted as stop:
        if stop.args and isinstance(stop.args[0], str):  # stopped during start-up; a saved stop logged itself
            print(f"preempted: {stop.args[0]} (exit {EXIT_PREEMPTED}: rerun to resume)", file=sys.stderr)
        return EXIT_PREEMPTED
    except CheckpointWriteError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted (exit {EXIT_INTERRUPTED}); rerun the same command to resume from the latest checkpoint",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as err:  # also found while building (e.g. weights a frozen part lacks)
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:  # nothing usable in a source, an unreadable shard with on_corrupt_shard=error...
        print(f"data error: {err}", file=sys.stderr)
        return 2
    return 0
