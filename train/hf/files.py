"""The files of an HF directory: safetensors weights (one file, or shards + index, readable like
every other file of an export) and the small files (config, tokenizer, ...) a native run keeps from
its HF source in `hf_source/`, with the carried tensors (`train.hf.mapping`) as `extra.safetensors`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from train.hf.errors import ConversionError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SOURCE_DIR = "hf_source"
EXTRA_NAME = "extra.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def weight_files(hf_dir: Path) -> list[Path]:
    """`model.safetensors`, or the shards named by `model.safetensors.index.json`."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_NAME
    if index.exists():
        return [hf_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (hf_dir / WEIGHTS_NAME).exists():
        return [hf_dir / WEIGHTS_NAME]
    raise ConversionError(f"{hf_dir} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def read_hf_weights(hf_dir: Path) -> dict[str, Tensor]:
    """All tensors of `model.safetensors` or of the shards named by `model.safetensors.index.json`."""
    state = {}
    for path in weight_files(hf_dir):
        state.update(read_hf_weights_file(path))
    return state


@contextlib.contextmanager
def open_hf_weights(hf_dir: Path) -> Iterator[dict]:
    """{HF name: safetensors slice} over every weight file, open for the block and read nothing yet:
    `slice.get_shape()`, and `slice[index]` reads just that part (a released 12B model's tensors are
    read one by one, or one rank's chunk of each, never held whole)."""
    with contextlib.ExitStack() as files:
        slices = {}
        for path in weight_files(hf_dir):
            f = files.enter_context(safe_open(str(path), framework="pt"))
            slices.update({key: f.get_slice(key) for key in f.keys()})
        yield slices


def read_hf_weights_file(path: Path) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def read_weights_metadata(path: Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _save_readable(tensors: dict[str, Tensor], path: Path) -> None:
    """safetensors writes its files private (0600); give them the mode every other file of the export
    gets (0666 less the umask), so a serving user or a shared model directory can read them."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_hf_weights(state: dict[str, Tensor], dst: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write `state` in order as `model.safetensors`, or as `model-0000i-of-0000N.safetensors` shards
    of at most `max_shard_bytes` (a bigger tensor gets a shard of its own) plus the index."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        _save_readable(shards[0], dst / WEIGHTS_NAME)
        return [WEIGHTS_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _save_readable(shard, dst / name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
    (dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def is_weight_file(name: str) -> bool:
    return name == INDEX_NAME or name.endswith(".safetensors") or name.endswith(".bin") or name.endswith(".pt")


def copy_small_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Every file of `src` but the weights (and `skip`) into `dst`: config, tokenizer, generation config, ..."""
    for item in sorted(Path(src).iterdir()):
        if item.is_file() and item.name not in skip and not is_weight_file(item.name):
            shutil.copy2(item, dst / item.name)


def keep_source(run_dir: Path, source: Path, carried: dict[str, Tensor] | None,
                metadata: dict[str, str] | None = None) -> None:
    """`run_dir/hf_source/`: the HF source's small files, and the tensors carried for its export
    (with `metadata` about them in the file's header)."""
    keep = Path(run_dir) / SOURCE_DIR
    keep.mkdir()
    copy_small_files(source, keep)
    if carried:
        save_file({k: v.contiguous() for k, v in carried.items()}, str(keep / EXTRA_NAME),
                  metadata={"format": "pt", **(metadata or {})})


def fresh_dir(path: Path) -> Path:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise ConversionError(f"{path} exists and is not empty: choose a new destination")
    path.mkdir(parents=True, exist_ok=True)
    return path
