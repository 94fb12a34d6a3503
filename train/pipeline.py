"""`python -m train.pipeline [overrides]`: run stages 0..4 in order with weight hand-off.

Stage k runs in `<run.dir>/<recipe>/`; stage k+1 starts from stage k's final checkpoint
(weights only: fresh optimizer and schedule). A rerun skips finished stages and resumes an
unfinished one from its latest checkpoint. Overrides other than `run.dir` and `stages` go to
every stage.
"""

from __future__ import annotations

import sys

from train.loop.pipeline import run_pipeline


def main() -> int:
    from train.loop.exits import run_to_exit_code

    return run_to_exit_code(lambda: run_pipeline(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
