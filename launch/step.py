"""`python -m launch.step [torchrun arguments]`: torchrun for one node of a Slurm job step.

The same launcher as `python -m torch.distributed.run`, with three differences made for Slurm:

- SIGTERM and SIGUSR1 (preemption, cancellation, the time-limit warning) are noted in one line
  and otherwise left to the workers. Slurm delivers a step's signals to every process of the
  step, workers included, so they already save and stop on their own; stock torchrun would
  instead raise, signal them a second time and, when a second signal lands during that
  shutdown (Slurm and srun both deliver SIGTERM), cut it short with another traceback.
- Workers that stopped for preemption (exit 75: state saved, or stopped before their first step
  with nothing to save; see `stopped_for_preemption`) end it with exit 0, and so does losing the
  rendezvous after a stop signal (the first node, its host, finished stopping first). The step
  runs under `srun --kill-on-bad-exit=1`, where a non-zero exit ends every other node at once: a
  node done saving must not end the others while they still write their part, or while rank 0
  still writes $HVL_PREEMPTED_FILE. That file, not this exit code, has the batch script requeue.
- Its ends are one line on stderr each, no traceback: any other failure gives the exit code of
  the first worker to fail other than by such a stop (128 + N when signal N killed it), another
  handled signal (SIGINT, SIGHUP, SIGQUIT) 128 + its number, a lost rendezvous without a stop 1.

A stop signal before any worker started writes $HVL_PREEMPTED_FILE and exits 0 at once (nothing
ran, so nothing is lost), as workers stopped for preemption do.
"""

from __future__ import annotations

import os
import signal
import sys

# A worker's exit after a preemption stop: train.loop.preemption.EXIT_PREEMPTED (tests/unit/test_slurm.py holds
# them equal). `python -m train` keeps it; this wrapper turns it into 0 for srun.
EXIT_PREEMPTED = 75
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
    _say(f"{name} before the workers started: stopped (exit 0; the batch script requeues from ${PREEMPTED_FILE_ENV})")
    os._exit(0)


_noted: set[int] = set()


def _note_stop(signum, frame) -> None:
    if signum not in _noted:
        _noted.add(signum)
        _say(f"{signal.Signals(signum).name}: the workers save and stop; waiting for them")


def stopped_for_preemption(codes: dict[int, int]) -> bool:
    """Whether workers that ended with these exit codes (-N: killed by signal N) stopped for
    preemption: one exited 75 and every other one did too or, once Slurm signalled this node to
    stop, was killed by SIGTERM or SIGKILL. torchrun ends the rest of its workers with SIGTERM when
    the first one exits, and a worker already shutting down after its own stop has no handler left
    for it. Without a stop signal such a kill may be a crash (the OOM killer), and a worker that
    then stops "for preemption" on torchrun's SIGTERM before its first step is no reason to requeue."""
    if EXIT_PREEMPTED not in codes.values():
        return False
    killed_after_stop = {-signal.SIGTERM, -signal.SIGKILL} if _noted else set()
    return all(code == EXIT_PREEMPTED or code in killed_after_stop for code in codes.values())


def main(argv: list[str] | None = None) -> int:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_before_start)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import api as mp_api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

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
        codes = {r: f.exitcode for r, f in err.failures.items()}  # global rank -> exit code (-N: signal N)
        if stopped_for_preemption(codes):
            stopped = sorted(r for r, c in codes.items() if c == EXIT_PREEMPTED)
            _say(f"worker rank(s) {', '.join(map(str, stopped))} stopped for preemption (exit {EXIT_PREEMPTED}); "
                 f"exit 0 (the batch script requeues from ${PREEMPTED_FILE_ENV})")
            return 0
        # The first worker to fail other than by a preemption stop (one that stopped beside it is no cause).
        by_time = sorted(err.failures.items(), key=lambda item: item[1].timestamp)
        rank, first = next((r, f) for r, f in by_time if f.exitcode != EXIT_PREEMPTED)
        code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode  # -N: killed by signal N
        others = {r: f.exitcode for r, f in err.failures.items() if r != rank}
        _say(f"worker rank {rank} exited with code {first.exitcode}"
             + (f" (also {', '.join(f'rank {r}: {c}' for r, c in sorted(others.items()))})" if others else "")
             + f"; exit {code}")
        return code
    except RendezvousError as err:
        # The c10d store lives in the first node's torchrun. That node may end first after a
        # preemption save (its workers exited after the save's last barrier, while ours were still
        # exiting); torchrun has then stopped our workers (SIGTERM, which ours take as the stop they
        # are already making) and waited for them. After a stop signal that is a stop, not a crash.
        if _noted:
            _say(f"{', '.join(signal.Signals(s).name for s in sorted(_noted))} noted, then the rendezvous "
                 f"(hosted by the first node) ended: that node is done; this node's workers stopped; exit 0")
            return 0
        _say(f"lost the rendezvous (the first node's torchrun hosts it and has ended): {err}; exit 1")
        return 1
    except mp_api.SignalException as err:
        _say(f"stopped by {err.sigval.name}; exit {128 + err.sigval}")
        return 128 + err.sigval
    return 0


if __name__ == "__main__":
    sys.exit(main())
