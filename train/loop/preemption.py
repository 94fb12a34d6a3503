"""Preemption: SIGTERM / SIGUSR1 ask the run to save at the next step boundary and exit; before
the first step they stop it at once (nothing new to save).

Slurm sends SIGUSR1 before the time limit (`--signal=B:USR1@300`) and SIGTERM on preemption;
the run exits with EXIT_PREEMPTED, and the requeued job resumes from the checkpoint written here.
Exit codes do not survive torchrun (it reports a failed worker as 1), so the batch script learns
of the stop from a file instead: rank 0 writes the file named by $HVL_PREEMPTED_FILE (see
`mark_preempted`) once the newest state is on disk, and the script requeues the job when it exists.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from train.parallel.distributed import all_reduce_max_

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"
# Set by the sbatch script (launch/templates/sbatch.sh), fresh for each start of the job.
PREEMPTED_FILE_ENV = "HVL_PREEMPTED_FILE"


def mark_preempted(what: str) -> None:
    """Tell the launcher this run stopped for preemption with its newest state on disk (so a
    rerun resumes): rank 0 writes `what` to $HVL_PREEMPTED_FILE, when that is set."""
    path = os.environ.get(PREEMPTED_FILE_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        Path(path).write_text(what + "\n")


class Preempted(Exception):
    """Raised at a step boundary after the checkpoint is written, or at once when the signal
    comes before this process took a step (start-up, resume, data warm-up): the checkpoint on
    disk is then still the newest state, so there is nothing to save."""


class PreemptionHandler:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")  # nccl reduces only CUDA tensors
        self._requested = False
        self._previous = {}
        # Until the first step, a signal stops the run at once (see Preempted).
        self.stepped = False

    def mark_stepped(self) -> None:
        self.stepped = True

    def install(self) -> "PreemptionHandler":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if not self.stepped:  # start-up can take minutes (data warm-up): do not make Slurm wait for it
            if self._requested:  # the same stop delivered twice (Slurm signals and srun forwards): unwinding
                return
            self._requested = True
            message = f"{signal.Signals(signum).name} before the first step: stopped, nothing to save"
            mark_preempted(message)
            raise Preempted(message)
        # Only a flag: saving inside a signal handler could interrupt a half-done step.
        self._requested = True

    @property
    def requested(self) -> bool:
        """This process was signalled (no collective: for between stages, where no group exists)."""
        return self._requested

    def should_stop(self) -> bool:
        """True on every rank when any rank was signalled (ranks must save together)."""
        flag = torch.tensor([1.0 if self._requested else 0.0], device=self.device)
        return bool(all_reduce_max_(flag, "world").item())
