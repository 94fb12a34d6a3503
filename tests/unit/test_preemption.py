from __future__ import annotations

import os
import signal

import pytest

from train.loop.preemption import Preempted, PreemptionHandler


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_stop_flag_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    handler = PreemptionHandler().install()
    handler.mark_stepped()  # after the first step: a flag, acted on at the next step boundary
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), sig)
        assert handler.should_stop()
    finally:
        handler.uninstall()
    assert signal.getsignal(sig) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_before_the_first_step_stops_at_once(sig):
    handler = PreemptionHandler().install()
    try:
        with pytest.raises(Preempted, match=f"{signal.Signals(sig).name} before the first step"):
            os.kill(os.getpid(), sig)
            signal.sigtimedwait([], 0.1)  # the handler runs at the next bytecode; give it one
    finally:
        handler.uninstall()
