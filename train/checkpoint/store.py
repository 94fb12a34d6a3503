"""Checkpoint contents, written and read with torch.distributed.checkpoint (DCP, sharded per rank):
training checkpoints (model, optimizer, precision state; one `rank_R.json` per rank with counters, data
position and RNG), model-only checkpoints (`write_model_checkpoint`: what `train.convert` writes), and
the readers of both. The files around the shards (COMPLETE, `latest`, the atomic rename, config.yaml)
are `train.checkpoint.files`; every write here ends in its `publish`, so a crash at any point leaves
the previous checkpoint as `latest`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
import shutil
import warnings
from concurrent.futures import Future
from typing import Callable, NoReturn
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from train.checkpoint.files import (  # noqa: F401  (resolve_native_checkpoint: the store's public API too)
    CHECKPOINTS_DIR,
    complete_checkpoints,
    find_latest,
    prune_checkpoints,
    publish,
    read_marker,
    resolve_native_checkpoint,
    step_dir_name,
    temporary_step_dir,
    write_atomic,
)
from train.checkpoint.layout import NativeLayout, StateLayout
from train.parallel.distributed import barrier, world_rank


@contextlib.contextmanager
def dcp_quietly():
    """DCP warns on every single-process save/load; that is our normal CPU case, not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    rank_state: dict, keep_last: int, precision_state: dict | None = None,
                    layout: StateLayout = NativeLayout()) -> Path:
    """Write step `step` atomically and point `latest` at it; prune to `keep_last` complete ones.

    `precision_state` (FP8 amax histories and scales) is saved beside model and optimizer."""
    Checkpointer(root, keep_last, layout=layout).save(step, model, optimizer, rank_state, precision_state)
    return root / step_dir_name(step)


class Checkpointer:
    """Saves checkpoints, with the shard writes either inline or in a background thread.

    Async (`async_save=True`): `save` writes this rank's JSON state, copies model, optimizer and
    precision state to CPU memory (DCP's stager) and returns while a thread writes the shards;
    training goes on. `poll` (every step) makes a finished write complete: COMPLETE, rename,
    `latest`; until then a crash leaves the previous checkpoint as `latest`. Rank 0 alone does
    that, without a collective, since its write finishing means every rank's did (DCP gathers all
    ranks' write results before its write completes). The background writes use their own gloo
    group, so they never interleave with the training collectives. Costs one CPU copy of the state
    while it is written; `wait` blocks until the pending write is done (end of training, preemption).
    """

    def __init__(self, root: Path, keep_last: int, async_save: bool = False, layout: StateLayout = NativeLayout(),
                 marker: dict | None = None):
        self.root, self.keep_last, self.async_save, self.layout = root, keep_last, async_save, layout
        self.marker = marker or {}  # facts about the weights written into each COMPLETE marker
        self._pending: tuple[Future, Path, int] | None = None  # (shard writes, tmp dir, step)
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        if async_save:  # the writer thread warns after `dcp_quietly` has exited: filter it for good
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank_state: dict,
             precision_state: dict | None = None) -> None:
        """Start checkpoint `step` (the previous one is finished first); sync mode: write it whole."""
        self._finish(block=True)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = temporary_step_dir(self.root, step)
        if world_rank() == 0 and tmp.exists():
            shutil.rmtree(tmp)
        barrier()
        model_sd, optim_sd = self.layout.state(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "precision": precision_state or {}}
        try:
            # Before the shards: once rank 0's shard write completes, every rank's JSON is there.
            tmp.mkdir(parents=True, exist_ok=True)
            write_atomic(tmp / f"rank_{world_rank()}.json", {**rank_state, "rng": rng_state()})
            with dcp_quietly():
                if self.async_save:
                    written = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
                    written = getattr(written, "upload_completion", written)  # AsyncSaveResponse in some versions
                else:
                    dcp.save(state, checkpoint_id=str(tmp))
                    written = Future()
                    written.set_result(None)
        except BaseException as err:
            # Disk full, killed mid-write...: `latest` still names the previous complete checkpoint.
            self._fail(err, tmp, step)
        self._pending = (written, tmp, step)
        if not self.async_save:
            self.wait()

    def poll(self) -> Path | None:
        """Complete the pending checkpoint if its writes are done; returns its path then."""
        return self._finish(block=False)

    def wait(self) -> Path | None:
        """Block until the pending checkpoint is complete (every rank: a collective). Returns its path."""
        final = self._finish(block=True)
        barrier()
        return final

    def _finish(self, block: bool) -> Path | None:
        if self._pending is None or not (block or self._pending[0].done()):
            return None
        written, tmp, step = self._pending
        self._pending = None
        try:
            written.result()  # the background writes' failure (async) arrives here
        except BaseException as err:
            self._fail(err, tmp, step)
        if world_rank() == 0:
            try:
                publish(tmp, self.root, step, self.marker)
            except BaseException as err:
                self._fail(err, tmp, step)
            prune_checkpoints(self.root, self.keep_last)
        return self.root / step_dir_name(step)

    def _fail(self, err: BaseException, tmp: Path, step: int) -> NoReturn:
        """A write of checkpoint `step` failed wherever it did (shards, async thread, marker, rename): drop
        the half-written directory, keep `latest`, and say so in one line when the disk is full."""
        shutil.rmtree(tmp, ignore_errors=True)
        if _out_of_space(err, self.root):
            raise CheckpointWriteError(
                f"no space left on device writing checkpoint step {step} to {tmp.parent}: free space or set "
                f"run.dir on a larger disk, then rerun to resume; the newest complete checkpoint "
                f"({find_latest(self.root) or 'none'}) stays latest") from None
        raise err


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    precision_state: dict | None = None, layout: StateLayout = NativeLayout()) -> dict:
    """Restore model, optimizer, RNG and (into `precision_state`'s tensors, in place) the
    precision state; returns this rank's saved state."""
    model_sd, optim_sd = layout.state(model, optimizer)
    # This rank's parameter groups, not the saved ones: under a sharded optimizer each rank's differ
    # (and the hyperparameters come from the config).
    param_groups = optim_sd.get("param_groups")
    state = {"model": model_sd, "optim": optim_sd}
    if precision_state:
        state["precision"] = precision_state
    with dcp_quietly():
        dcp.load(state, checkpoint_id=str(path))
    if param_groups is not None:
        state["optim"]["param_groups"] = param_groups
    layout.load_state(model, optimizer, state["model"], state["optim"])
    rank_file = path / f"rank_{world_rank()}.json"
    if not rank_file.exists():  # resumed with more ranks than saved: take rank 0's counters
        rank_file = path / "rank_0.json"
    saved = json.loads(rank_file.read_text())
    set_rng_state(saved.pop("rng"))
    return saved


def load_newest_readable(root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         precision_state: dict | None = None,
                         layout: StateLayout = NativeLayout()) -> tuple[Path, dict] | None:
    """Load the checkpoint `latest` names; if it cannot be read (a truncated shard, a damaged
    file), warn and fall back to the next newest complete one, never silently to step 0.
    Returns (path, this rank's saved state), or None when there is no checkpoint at all."""
    first = find_latest(root)
    if first is None:
        return None
    candidates = [first] + [p for p in reversed(complete_checkpoints(root)) if p != first]
    for i, path in enumerate(candidates):
        try:
            return path, load_checkpoint(path, model, optimizer, precision_state, layout)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # DCP's CheckpointException is a BaseException
            if i == len(candidates) - 1:
                raise RuntimeError(f"no checkpoint under {root} can be read; the last error was: {err}") from err
            reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]  # DCP nests whole tracebacks
            warnings.warn(f"checkpoint {path} cannot be read ({reason}); falling back to {candidates[i + 1].name}")
    return None


def read_rank_states(path: Path) -> list[dict]:
    """Every saved rank's state (without RNG), in rank order: for resuming with another world size."""
    files = sorted(path.glob("rank_*.json"), key=lambda f: int(f.stem.split("_")[1]))
    states = [json.loads(f.read_text()) for f in files]
    for state in states:
        state.pop("rng", None)
    return states


def read_data_states(path: Path) -> list[dict]:
    """The saved data position of each data-parallel rank, in data-rank order. Ranks of one replica
    saved the same position: one of them is taken. (Checkpoints from before the parallel layout
    name no `data_rank`: every rank was its own replica.)"""
    by_data_rank: dict[int, dict] = {}
    for rank, state in enumerate(read_rank_states(path)):
        by_data_rank.setdefault(state.get("data_rank", rank), state["data"])
    return [by_data_rank[r] for r in sorted(by_data_rank)]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one stays `latest`."""


# Below this much free space a failed write is taken for a full disk: torch's own file writer reports a
# short write as "unexpected pos N vs M", with no errno to say why.
LOW_SPACE_BYTES = 64 * 1024 * 1024


def _out_of_space(err: BaseException, where: Path) -> bool:
    """ENOSPC, raised directly, chained, or wrapped in DCP's per-rank CheckpointException; or any write
    error while the disk under `where` is (nearly) full."""
    causes, seen = [err], set()
    while causes:
        cause = causes.pop()
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return True
        causes += [c for c in (cause.__cause__, cause.__context__, *getattr(cause, "failures", {}).values())
                   if isinstance(c, BaseException)]
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return False
    try:
        return shutil.disk_usage(where).free < LOW_SPACE_BYTES
    except OSError:
        return False


class CheckpointShapeError(ValueError):
    """A checkpoint's tensor has another shape than the model's (another model size)."""


def load_model_weights(path: Path, model: torch.nn.Module, layout: StateLayout = NativeLayout()) -> list[str]:
    """Only the model weights (stage hand-off: fresh optimizer and schedule). Returns the parts that
    are still random: absent from the checkpoint, or recorded random by the stage that wrote it.

    A checkpoint may hold a subset of the model's top-level parts (an LM-only conversion of a
    released language model, say): the parts it lacks keep their initialisation, with a warning.
    A part that is only partly present is an error, never a silent half-load.
    """
    saved = _saved_model_entries(path)
    state, absent = _loadable(path, saved, _saved_shapes(saved), layout.model_state(model))
    with dcp_quietly():
        dcp.load({"model": state}, checkpoint_id=str(path))
    layout.load_model_state(model, state, strict=False)
    return sorted(set(absent) | set(read_marker(path).get("random_parts", [])))


def load_trainable_weights(path: Path, model: torch.nn.Module) -> None:
    """The trainable tensors of an adapter checkpoint (`peft`: adapters and the parts that trained
    whole; `TrainableOnlyLayout` wrote them) into `model`, which holds its base already."""
    options = StateDictOptions(ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    with dcp_quietly():
        dcp.load({"model": state}, checkpoint_id=str(path))
    set_model_state_dict(model, state, options=StateDictOptions(ignore_frozen_params=True, strict=False))


TensorReader = Callable[[str, tuple[slice, ...]], Tensor]


def load_model_tensors(source: Path, shapes: dict[str, tuple[int, ...]], read: TensorReader,
                       model: torch.nn.Module, layout: StateLayout = NativeLayout()) -> list[str]:
    """`load_model_weights` from tensors that are not a checkpoint (an HF directory converted on the
    fly): `shapes` {native name: whole shape}; `read(name, index)` returns the slice `index` (one
    slice per dim) of that tensor, so each rank reads only the chunks its layout holds (a megatron
    tensor-parallel shard), never a whole model beside the one it fills. Same checks, same return."""
    state, absent = _loadable(source, shapes, shapes, layout.model_state(model))
    with torch.no_grad():  # filled in place, as DCP fills a checkpoint's
        for key, value in state.items():
            for index, local in _local_pieces(key, value):
                local.copy_(read(key, index))  # casts to the model's dtype (bf16 files, fp32 model)
    layout.load_model_state(model, state, strict=False)
    return absent


def _loadable(source: Path, saved, shapes: dict[str, tuple[int, ...]], full: dict) -> tuple[dict, list[str]]:
    """(the entries of the model's state `full` to load, the top-level parts `saved` lacks). Refuses
    another model size (CheckpointShapeError naming the tensor), a part only partly present, and a
    source holding none of the model."""
    _check_shapes(source, shapes, full)
    parts = sorted({k.split(".", 1)[0] for k in full})
    absent = [p for p in parts if not any(k.startswith(p + ".") for k in saved)]
    partial = sorted(k for k in full if k not in saved and k.split(".", 1)[0] not in absent)
    if partial:
        raise KeyError(f"{source} lacks {len(partial)} weights of parts it otherwise holds, e.g. {partial[:3]}")
    if absent:
        if len(absent) == len(parts):
            raise KeyError(f"{source} holds none of this model's weights")
        warnings.warn(f"{source} holds no weights for {absent}; they keep their initialisation")
    return {k: v for k, v in full.items() if k.split(".", 1)[0] not in absent}, absent


def _local_pieces(key: str, value) -> list[tuple[tuple[slice, ...], Tensor]]:
    """(index into the whole tensor, the local tensor it fills) for each piece this rank holds of
    `value`: the whole tensor, or a megatron ShardedTensor's local shards."""
    if isinstance(value, ShardedTensor):
        return [(tuple(slice(o, o + n) for o, n in zip(s.metadata.shard_offsets, s.metadata.shard_sizes)), s.tensor)
                for s in value.local_shards()]
    if isinstance(value, DTensor) or not isinstance(value, Tensor):
        # Step 2 of the assembly runs before any FSDP2 sharding: not a case to support half-way.
        raise TypeError(f"{key}: cannot fill a {type(value).__name__} from loose tensors")
    return [(tuple(slice(None) for _ in value.shape), value)]


def load_adapter_tensors(path: Path, model: torch.nn.Module, layout: StateLayout,
                         is_adapter: Callable[[str], bool]) -> list[str]:
    """The adapters of checkpoint `path` (an adapter run's, written by either engine: PEFT's native
    names, whole tensors) into `model`'s adapters of the same names, each rank reading the chunks its
    layout holds (`peft.handoff=carry`); returns the names of `model`'s adapters the checkpoint does
    not hold (they keep their fresh initialisation). Parts that trained whole are not read: the base
    holds them."""
    state = {k: v for k, v in layout.model_state(model).items() if is_adapter(k)}
    saved = _saved_model_entries(path)
    held = {k: v for k, v in state.items() if k in saved}
    if held:
        with dcp_quietly():
            dcp.load({"model": held}, checkpoint_id=str(path))
        layout.load_model_state(model, held, strict=False)
    return sorted(set(state) - set(held))


def _saved_model_entries(path: Path) -> dict:
    """{native name: DCP storage metadata (`.size`, `.properties.dtype` for a tensor)} of a checkpoint's model."""
    with dcp_quietly():
        metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k.removeprefix("model."): meta for k, meta in metadata.items() if k.startswith("model.")}


def write_model_checkpoint(run_dir: Path, step: int, state: dict[str, Tensor], marker: dict | None = None) -> Path:
    """A model-only checkpoint (`state`: whole tensors under their native names; no optimizer, no
    rank state) as `run_dir/checkpoints/step_N`, written by this one process, published atomically
    and named `latest`. Returns its directory. What `train.convert` writes; `load_model_weights` (a
    stage's start) and `read_model_state` read it."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = temporary_step_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with dcp_quietly():
            dcp.save({"model": state}, checkpoint_id=str(tmp))
        return publish(tmp, root, step, marker)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written checkpoint left behind
        raise


class CheckpointReadError(OSError):
    """A checkpoint's files cannot be read (damaged or cut); the message names the checkpoint and its step."""


def read_model_state(checkpoint: Path, into: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """A checkpoint's model tensors under their native names (`language_model.*`, ...), whatever
    engine and layout wrote them. `into` given: those tensors only, read in place (cast to their
    dtypes; e.g. a model's own state dict, so nothing is allocated twice); returns `into`. None:
    every saved model tensor, in its stored dtype.

    A name `into` asks for that the checkpoint lacks is a KeyError, another shape a
    CheckpointShapeError; a damaged or cut file a CheckpointReadError naming the checkpoint."""
    checkpoint = Path(checkpoint)
    try:
        saved = _saved_model_entries(checkpoint)
    except BaseException as err:
        raise _unreadable(checkpoint, err) from None
    if into is None:
        into = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
                for key, meta in saved.items() if hasattr(meta, "properties")}
    else:
        _check_present(checkpoint, saved, into)
    try:
        with dcp_quietly():
            dcp.load({"model": into}, checkpoint_id=str(checkpoint))
    except BaseException as err:
        raise _unreadable(checkpoint, err) from None
    return into


def _unreadable(checkpoint: Path, err: BaseException) -> BaseException:
    """What a failed read raises: `err` itself when it is an interrupt, else a CheckpointReadError."""
    if not isinstance(err, Exception) and type(err).__name__ != "CheckpointException":
        return err  # KeyboardInterrupt, SystemExit (DCP wraps a damaged file's error in its BaseException)
    cause = next(iter(getattr(err, "failures", {}).values()), err)  # DCP's per-rank failure
    return CheckpointReadError(f"checkpoint {checkpoint} (step {_step_of(checkpoint)}) cannot be read "
                               f"({type(cause).__name__}: {cause}): its files are damaged or cut; use another "
                               "step (checkpoints/step_N)")


def _check_present(checkpoint: Path, saved: dict, wanted: dict[str, Tensor]) -> None:
    missing = sorted(k for k in wanted if k not in saved)
    if missing:
        raise KeyError(f"{checkpoint} lacks {len(missing)} of the weights asked for, e.g. {missing[:3]}")
    _check_shapes(checkpoint, _saved_shapes(saved), wanted)


def _saved_shapes(saved: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a checkpoint's tensors (`_saved_model_entries`; other entries have no size)."""
    return {k: tuple(meta.size) for k, meta in saved.items() if getattr(meta, "size", None) is not None}


def _check_shapes(source: Path, shapes: dict[str, tuple[int, ...]], wanted: dict) -> None:
    """A checkpoint of another model size: name the first difference."""
    for key, value in wanted.items():
        size = shapes.get(key)
        if size is not None and isinstance(value, torch.Tensor) and tuple(size) != tuple(value.shape):
            raise CheckpointShapeError(f"{key} is {tuple(size)} in {source} but {tuple(value.shape)} in this model")


def _step_of(checkpoint: Path) -> str:
    name = checkpoint.name
    return str(int(name.split("_")[1])) if name.startswith("step_") and name.split("_")[1].isdigit() else "?"
