"""`python -m launch.step [torchrun arguments]`: torchrun for one node of a Slurm job step.

The same launcher as `python -m torch.distributed.run`, with two differences made for Slurm:

- SIGTERM and SIGUSR1 (preemption, cancellation, the time-limit warning) are noted in one line
  and otherwise left to the workers. Slurm delivers a step's signals to every process of the
  step, workers included, so they already save and stop on their own; stock torchrun would
  instead raise, signal them a second time and, when a second signal lands during that
  shutdown (Slurm and srun both deliver SIGTERM), cut it short with another traceback.
- Its ends are one line on stderr each, no traceback: workers that failed give the exit code
  of the first one to fail (75 after a preemption save), another handled signal (SIGINT,
  SIGHUP, SIGQUIT) gives 128 + its number.

A stop signal before any worker started exits 75 at once (nothing ran, so nothing is lost) and,
like a worker that stops for preemption, writes $HVL_PREEMPTED_FILE so the job is requeued.
"""

from __future__ import annotations

import os
import signal
import sys

EXIT_PREEMPTED = 75  # train.loop.preemption.EXIT_PREEMPTED (tests/unit/test_slurm.py holds them equal)
PREEMPTED_FILE_ENV = "HVL_PREEMPTED_FILE"  # train.loop.preemption.PREEMPTED_FILE_ENV
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _say(message: str) -> None:
    # os.write: a signal handler may run in the middle of a print to the same stream.
    os.write(2, f"launch.step: {message}\n".encode())


def _stop_before_start(signum, frame) -> None:
    name = signal.Signals(signum).name
    path = os.environ.get(PREEMPTED_FILE_ENV)
    if path:
        with open(path, "w") as f:
            f.write(f"{name} before the workers started: stopped, nothing to save\n")
    _say(f"{name} before the workers started: stopped (exit {EXIT_PREEMPTED})")
    os._exit(EXIT_PREEMPTED)


_noted: set[int] = set()


def _note_stop(signum, frame) -> None:
    if signum not in _noted:
        _noted.add(signum)
        _say(f"{signal.Signals(signum).name}: the workers save and stop; waiting for them")


def main(argv: list[str] | None = None) -> int:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_before_start)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import api as mp_api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    stock_handler = mp_api._terminate_process_handler

    def on_signal(signum, frame) -> None:  # installed by torchrun when it starts its workers
        if signum in STOP_SIGNALS:
            _note_stop(signum, frame)
        else:
            stock_handler(signum, frame)

    mp_api._terminate_process_handler = on_signal
    try:
        torchrun.run(torchrun.parse_args(sys.argv[1:] if argv is None else argv))  # run(), not main(): no @record
    except ChildFailedError as err:
        rank, first = err.get_first_failure()
        code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # -N: killed by signal N
        others = {r: f.exitcode for r, f in err.failures.items() if r != rank}
        _say(f"worker rank {rank} exited with code {first.exitcode}"
             + (f" (then {', '.join(f'rank {r}: {c}' for r, c in sorted(others.items()))})" if others else "")
             + f"; exit {code}")
        return code
    except mp_api.SignalException as err:
        _say(f"stopped by {err.sigval.name}; exit {128 + err.sigval}")
        return 128 + err.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())
