"""Write a webdataset tar shard from in-memory members, for tests that need hand-made samples."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """`samples`: (key, {suffix: bytes}) in order -> KEY.suffix members."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
