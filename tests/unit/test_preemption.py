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


def test_a_stop_during_a_stages_last_step_ends_the_pipeline_before_the_next_stage(monkeypatch, tmp_path):
    """The trainer acts on a stop only between steps it still has to run: a signal during a stage's
    last step (or between stages) is the pipeline's to act on, before it starts the next stage, with
    the launcher's marker written. The stage here stands in for training (covered elsewhere); the
    signal and the handlers are real."""
    from train.loop.pipeline import run_pipeline

    ran = []

    def stage_signalled_in_its_last_step(cfg, preemption):
        ran.append(cfg.stage)
        preemption.mark_stepped()
        os.kill(os.getpid(), signal.SIGTERM)
        return {"final_loss": 1.0, "checkpoint": str(tmp_path / cfg.stage / "checkpoints" / "step_0000008")}

    monkeypatch.setattr("train.loop.trainer.run_stage", stage_signalled_in_its_last_step)
    monkeypatch.setenv("HVL_PREEMPTED_FILE", str(tmp_path / "preempted"))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="stopped before stage1_image_sft"):
        run_pipeline(["smoke=cpu", f"run.dir={tmp_path}", "stages=[stage0_projector_warmup,stage1_image_sft]"])
    assert ran == ["stage0_projector_warmup"]
    assert "stopped before stage1_image_sft" in (tmp_path / "preempted").read_text()
    assert signal.getsignal(signal.SIGTERM) == before
