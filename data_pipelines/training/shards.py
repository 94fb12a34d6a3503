"""Webdataset tar shards: find them, and read raw samples by (shard, index) position.

Only raw bytes leave this module: nothing is unpickled and no member is decoded here, so a
hostile shard can at worst be skipped. Member names with `..` or absolute paths are rejected.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand


@dataclass
class RawSample:
    """One sample's members as bytes, keyed by suffix (`json`, `img0.jpg`, `vid0.mp4`)."""

    key: str
    shard: str
    index: int  # position of the sample inside its shard
    members: dict[str, bytes] = field(default_factory=dict)
    # Members never read: (name, reason), reason `unsafe_member_name`, `linked_member` or `duplicate_member`.
    dropped: tuple[tuple[str, str], ...] = ()


class DataError(RuntimeError):
    """The data cannot be trained on as configured (e.g. nothing usable in a source): the message
    names the source or file, the counts, and what to change."""


class ShardError(DataError, ValueError):
    """Shards that cannot be read as configured (remote, compressed); the message names the file
    or pattern and the fix."""


REMOTE_SCHEMES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://", "hf://", "ais://")
# Compressed tars cannot be read by seeking to a member: refused by name, never silently ignored.
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst")


def _compressed_hint(paths: list[str]) -> str:
    return (f"{len(paths)} compressed shard(s), e.g. {paths[0]!r}: training seeks inside uncompressed tar files "
            "(random access for exact resume); decompress them (`gunzip -k FILE.tar.gz` / `zstd -d`) next to "
            "the others")


def expand_shard_paths(pattern: str) -> list[str]:
    """A shard directory or a brace pattern (`/d/shard-{000..009}.tar`) -> sorted existing .tar paths.

    Remote URLs and compressed tars are refused with a message (ShardError) rather than read as
    missing files or skipped: their samples would otherwise vanish without a count."""
    if pattern.startswith(REMOTE_SCHEMES):
        raise ShardError(f"remote shards are not supported ({pattern!r}): training seeks inside local tar files; "
                         "copy the shards to local or mounted storage and point the source's path there")
    if os.path.isdir(pattern):
        compressed = sorted(p for suffix in COMPRESSED_SUFFIXES for p in glob.glob(os.path.join(pattern, "*" + suffix)))
        if compressed:
            raise ShardError(f"shard directory {pattern!r} holds {_compressed_hint(compressed)}")
        paths = sorted(glob.glob(os.path.join(pattern, "*.tar")))
        if not paths:
            raise FileNotFoundError(f"shard directory {pattern!r} holds no .tar files")
        return paths
    paths = sorted({p for expanded in braceexpand(pattern) for p in (glob.glob(expanded) or [expanded])})
    compressed = [p for p in paths if p.endswith(COMPRESSED_SUFFIXES)]
    if compressed:
        raise ShardError(f"{pattern!r} names {_compressed_hint(compressed)}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"shard path {missing[0]!r} does not exist (from {pattern!r})")
    return paths


def try_index_shard(shard: str) -> list["IndexedSample"] | str:
    """`index_shard`, or a one-line reason when the file is not a readable tar (gzip data, truncated
    headers, not a tar at all)."""
    try:
        return index_shard(shard)
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        compression = _compression_of(shard)
        if compression:
            return (f"{compression}-compressed data named .tar: decompress it (training seeks inside plain tar "
                    f"files) or, to see it refused by name, give it its compressed suffix")
        return f"{type(err).__name__}: {err}"


# Leading bytes of the compressed formats a shard may arrive in under a plain .tar name.
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _compression_of(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


def _split_member_name(name: str) -> tuple[str, str]:
    """`dir/KEY.img0.jpg` -> (`dir/KEY`, `img0.jpg`), webdataset's convention (key ends at the first dot
    of the base name)."""
    if name.startswith("/") or ".." in Path(name).parts:
        raise ValueError(f"unsafe tar member name {name!r}")
    head, base = os.path.split(name)
    stem, _, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), suffix.lower()


@dataclass(frozen=True)
class IndexedSample:
    """Where one sample's members lie inside its shard: (suffix, byte offset, size) each."""

    key: str
    members: tuple[tuple[str, int, int], ...]
    dropped: tuple[tuple[str, str], ...] = ()  # (member name, reason): never read, see index_shard


def _member_key(name: str) -> str:
    head, base = os.path.split(name)
    stem = base.partition(".")[0]
    return f"{head}/{stem}" if head else stem


def index_shard(shard: str) -> list[IndexedSample]:
    """One header scan of a shard -> its samples in order, with member offsets for direct seeks.

    Payloads are not read. Members with unsafe names (`..`, absolute) and links or devices are
    never read either: they are listed in their sample's `dropped`, so the sample is skipped and
    counted under that reason (`unsafe_member_name`, `linked_member`) instead of vanishing; so is a
    sample with two members of one name (`duplicate_member`: neither can be trusted to be the sample).
    """
    samples: list[IndexedSample] = []
    key, members, dropped = None, [], []
    with tarfile.open(shard, mode="r:") as tar:
        for info in tar:
            if info.isdir():
                continue
            try:
                member_key, suffix = _split_member_name(info.name)
                problem = None if info.isfile() else "linked_member"
            except ValueError:
                member_key, suffix, problem = _member_key(info.name), "", "unsafe_member_name"
            if member_key != key:
                if key is not None:
                    samples.append(IndexedSample(key, tuple(members), tuple(dropped)))
                key, members, dropped = member_key, [], []
            if problem is None and any(suffix == seen for seen, _, _ in members):
                problem = "duplicate_member"  # two `KEY.json`: which one is the sample? neither, counted
            if problem is None:
                members.append((suffix, info.offset_data, info.size))
            else:
                dropped.append((info.name, problem))
    if key is not None:
        samples.append(IndexedSample(key, tuple(members), tuple(dropped)))
    return samples


def read_indexed_sample(shard: str, index: int, entry: IndexedSample) -> RawSample:
    """Read one sample's payloads by seeking straight to them (resume is a seek, not a replay)."""
    sample = RawSample(key=entry.key, shard=shard, index=index, dropped=entry.dropped)
    with open(shard, "rb") as f:
        for suffix, offset, size in entry.members:
            f.seek(offset)
            sample.members[suffix] = f.read(size)
    return sample


def iter_shard(shard: str, start: int = 0) -> Iterator[RawSample]:
    """Yield the samples of one shard from sample index `start` on."""
    for index, entry in enumerate(index_shard(shard)):
        if index >= start:
            yield read_indexed_sample(shard, index, entry)


def count_samples(shard: str) -> int:
    """Number of samples in a shard (header scan only)."""
    return len(index_shard(shard))


def parse_json_member(raw: RawSample) -> dict:
    """The sample's JSON document; ValueError when missing or malformed."""
    if "json" not in raw.members:
        raise ValueError("missing_json")
    try:
        doc = json.loads(raw.members["json"].decode("utf-8-sig"))  # a byte-order mark is UTF-8 too
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep
        raise ValueError("malformed_json") from None
    if not isinstance(doc, dict):
        raise ValueError("malformed_json")
    return doc
