from __future__ import annotations

import os
import signal

import pytest

from train.loop.preemption import PreemptionHandler


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_sets_the_stop_flag_and_handlers_are_restored(sig):
    before = signal.getsignal(sig)
    handler = PreemptionHandler().install()
    try:
        assert not handler.should_stop()
        os.kill(os.getpid(), sig)
        assert handler.should_stop()
    finally:
        handler.uninstall()
    assert signal.getsignal(sig) == before
