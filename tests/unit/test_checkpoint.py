from __future__ import annotations

import random
import time
import warnings

import numpy as np
import pytest
import torch

from train.checkpoint.store import (
    Checkpointer,
    complete_checkpoints,
    find_latest,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)


def model_and_optim(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def test_roundtrip_restores_model_optimizer_rng_and_state(tmp_path):
    model, opt = model_and_optim()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    save_checkpoint(tmp_path, 3, model, opt, {"step": 3, "data": {"draws": 7}}, keep_last=2)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    other, other_opt = model_and_optim(seed=1)
    saved = load_checkpoint(find_latest(tmp_path), other, other_opt)
    assert saved == {"step": 3, "data": {"draws": 7}}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_latest_pruning_and_fallback_on_corruption(tmp_path):
    model, opt = model_and_optim()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {"step": step}, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert (tmp_path / "latest").read_text().strip() == "step_0000003"
    # A newest checkpoint missing its marker (crash mid-write) is never chosen.
    (tmp_path / "step_0000003" / "COMPLETE").unlink()
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        assert find_latest(tmp_path).name == "step_0000002"
    (tmp_path / "latest").unlink()
    with pytest.warns(UserWarning, match="missing"):
        assert find_latest(tmp_path).name == "step_0000002"


def test_weights_only_load_for_stage_handoff(tmp_path):
    model, opt = model_and_optim()
    path = save_checkpoint(tmp_path, 1, model, opt, {"step": 1}, keep_last=1)
    fresh, _ = model_and_optim(seed=3)
    load_model_weights(path, fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_no_checkpoint_means_none(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_latest(tmp_path / "nothing") is None


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import train.checkpoint.store as ckpt

    model, opt = model_and_optim()
    save_checkpoint(tmp_path, 1, model, opt, {"step": 1}, keep_last=2)

    def full_disk(state, checkpoint_id):
        from pathlib import Path

        Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.dcp, "save", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match=rf"no space left on device writing checkpoint step 2 to {tmp_path}.*"
                                                         r"step_0000001\) stays latest"):
        save_checkpoint(tmp_path, 2, model, opt, {"step": 2}, keep_last=2)
    assert find_latest(tmp_path).name == "step_0000001"
    assert not (tmp_path / ".tmp_step_0000002").exists()
    monkeypatch.undo()
    fresh, fresh_opt = model_and_optim(seed=4)
    assert load_checkpoint(find_latest(tmp_path), fresh, fresh_opt) == {"step": 1}


@pytest.mark.parametrize("where", ["torch_writer", "async_thread", "rename"])
def test_a_full_disk_is_one_line_wherever_the_write_fails(tmp_path, monkeypatch, where):
    """torch's writer reports a short write as "unexpected pos" without an errno; the async thread's
    failure arrives at completion; the final rename can fail too. Each is the same one-line
    CheckpointWriteError on a full disk, and the previous checkpoint stays latest."""
    import errno
    import shutil
    from collections import namedtuple
    from concurrent.futures import Future

    import train.checkpoint.store as ckpt

    model, opt = model_and_optim()
    save_checkpoint(tmp_path, 1, model, opt, {"step": 1}, keep_last=2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    if where == "torch_writer":
        def short_write(state, checkpoint_id):
            raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed, unexpected pos 704 vs 598")
        monkeypatch.setattr(ckpt.dcp, "save", short_write)
        writer = ckpt.Checkpointer(tmp_path, keep_last=2)
    elif where == "async_thread":
        def failing_async(state, checkpoint_id, process_group=None):
            done = Future()
            done.set_exception(OSError(errno.ENOSPC, "No space left on device"))
            return done
        monkeypatch.setattr(ckpt.dcp, "async_save", failing_async)
        writer = ckpt.Checkpointer(tmp_path, keep_last=2, async_save=True)
    else:
        import os

        real_replace = os.replace
        monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
                            if str(a).endswith(".tmp_step_0000002") else real_replace(a, b))
        writer = ckpt.Checkpointer(tmp_path, keep_last=2)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"no space left on device writing checkpoint step 2 .*"
                                                         r"step_0000001\) stays latest"):
        writer.save(2, model, opt, {"step": 2})
        writer.wait()
    assert find_latest(tmp_path).name == "step_0000001" and not (tmp_path / ".tmp_step_0000002").exists()


def test_a_failed_write_on_a_roomy_disk_is_not_called_a_full_disk(tmp_path, monkeypatch):
    import train.checkpoint.store as ckpt

    model, opt = model_and_optim()
    monkeypatch.setattr(ckpt.dcp, "save", lambda state, checkpoint_id: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        save_checkpoint(tmp_path, 1, model, opt, {"step": 1}, keep_last=2)
    assert not (tmp_path / ".tmp_step_0000001").exists()


def test_handoff_from_a_checkpoint_holding_only_some_parts(tmp_path):
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.language_model = torch.nn.Linear(3, 3)
            self.vision_model = torch.nn.Linear(2, 2)

    src, dst = Two(), Two()
    only_lm = torch.nn.Module()
    only_lm.language_model = src.language_model
    path = save_checkpoint(tmp_path, 0, only_lm, torch.optim.AdamW(only_lm.parameters()), {"step": 0}, keep_last=1)
    vision_before = dst.vision_model.weight.detach().clone()
    with pytest.warns(UserWarning, match="vision_model"):
        load_model_weights(path, dst)
    assert torch.equal(dst.language_model.weight, src.language_model.weight)
    assert torch.equal(dst.vision_model.weight, vision_before)


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    from train.checkpoint.store import load_newest_readable

    model, opt = model_and_optim()
    save_checkpoint(tmp_path, 1, model, opt, {"step": 1}, keep_last=3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 2, model, opt, {"step": 2}, keep_last=3)
    shard = next((tmp_path / "step_0000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # truncated on disk
    fresh, fresh_opt = model_and_optim(seed=7)
    with pytest.warns(UserWarning, match="cannot be read.*falling back to step_0000001"):
        path, saved = load_newest_readable(tmp_path, fresh, fresh_opt)
    assert path.name == "step_0000001" and saved == {"step": 1}


def test_async_save_keeps_the_state_of_its_step_and_completes_in_the_background(tmp_path):
    model, opt = model_and_optim()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer = Checkpointer(tmp_path, keep_last=2, async_save=True)
    checkpointer.save(1, model, opt, {"step": 1})
    with torch.no_grad():  # training goes on while the shards are written
        for p in model.parameters():
            p.add_(100.0)
    # Complete only once its writes are done: never `latest` before (poll until then).
    deadline = time.monotonic() + 60
    while checkpointer.poll() is None:
        assert find_latest(tmp_path) is None
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert (tmp_path / "latest").read_text().strip() == "step_0000001"
    fresh, fresh_opt = model_and_optim(seed=1)
    assert load_checkpoint(find_latest(tmp_path), fresh, fresh_opt) == {"step": 1}
    assert all(torch.equal(expected[k], v) for k, v in fresh.state_dict().items())
    assert checkpointer.wait() is None  # nothing pending


def test_async_save_finishes_the_previous_one_first(tmp_path):
    model, opt = model_and_optim()
    checkpointer = Checkpointer(tmp_path, keep_last=2, async_save=True)
    for step in (1, 2, 3):
        checkpointer.save(step, model, opt, {"step": step})
    assert checkpointer.wait().name == "step_0000003"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert not list(tmp_path.glob(".tmp_*"))


def test_model_only_checkpoint_is_published_atomically_and_read_back(tmp_path):
    """What `train.convert` writes: weights only, through the same publish (COMPLETE, rename, latest)."""
    from train.checkpoint.files import read_marker
    from train.checkpoint.store import (
        CheckpointReadError,
        CheckpointShapeError,
        read_model_state,
        write_model_checkpoint,
    )

    gen = torch.Generator().manual_seed(0)
    state = {"language_model.w": torch.randn(4, 3, generator=gen).bfloat16(), "projector.b": torch.arange(5.0)}
    path = write_model_checkpoint(tmp_path, 0, state)
    assert path == find_latest(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step_0000000"
    assert read_marker(path) == {"step": 0} and not list((tmp_path / "checkpoints").glob(".tmp_*"))
    whole = read_model_state(path)  # every tensor, in its stored dtype
    assert sorted(whole) == sorted(state) and all(torch.equal(whole[k], state[k]) for k in state)
    into = {"language_model.w": torch.zeros(4, 3)}  # a subset, read in place and cast to float32
    assert read_model_state(path, into=into) is into and torch.equal(into["language_model.w"], state["language_model.w"].float())
    with pytest.raises(KeyError, match="vision_model.w"):
        read_model_state(path, into={"vision_model.w": torch.zeros(2)})
    with pytest.raises(CheckpointShapeError, match=r"projector.b is \(5,\)"):
        read_model_state(path, into={"projector.b": torch.zeros(6)})
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointReadError, match=r"step_0000000 \(step 0\) cannot be read .* damaged or cut"):
        read_model_state(path)
