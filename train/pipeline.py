"""`python -m train.pipeline [overrides]`: run stages 0..4 in order with weight hand-off.

Stage k runs in `<run.dir>/<recipe>/`; stage k+1 starts from stage k's final checkpoint
(weights only: fresh optimizer and schedule). A rerun skips finished stages and resumes an
unfinished one from its latest checkpoint. Overrides other than `run.dir` and `stages` go to
every stage.
"""

from __future__ import annotations

import sys

from data_pipelines.training.shards import DataError
from train.config.schema import ConfigError
from train.loop.pipeline import run_pipeline


def main() -> int:
    from train.checkpoint.store import CheckpointWriteError
    from train.loop.preemption import EXIT_PREEMPTED, Preempted

    try:
        run_pipeline(sys.argv[1:])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        if isinstance(stop.args[0] if stop.args else None, str):  # stopped during start-up
            print(f"preempted: {stop.args[0]} (exit {EXIT_PREEMPTED}: rerun to resume)", file=sys.stderr)
        return EXIT_PREEMPTED
    except CheckpointWriteError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (exit 130); rerun the same command to resume from the latest checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
