"""Local data -> webdataset shards in the project schema (DESIGN.md, "Shards").

Inputs (`--format`):
- `jsonl`, `parquet`, `hf_disk` (a `datasets.save_to_disk` directory): rows with a `messages`
  column (list of `{role, content}`; content a string, or a list of `{"type": "text"|"image"|"video"}`
  parts as in HF chat templates) and optional `images` / `videos` columns (a path relative to
  `--image-root`, raw bytes, or a `datasets` Image/Video struct `{bytes, path}`), `source`, `id`.
- `llava`: a LLaVA / ShareGPT json list `{"id", "image": path or [paths], "video": ...,
  "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}`.

Rows are checked with the training parser (`parse_messages`), so a bad row is skipped for the
reason training would give (`bad_role`, `empty_conversation`, `placeholder_mismatch`, ...) or
`missing_media_file`; it is counted and listed, never fatal. Media are copied as they are (JPEG,
PNG and WebP); other image formats are re-encoded as PNG. When a row has media but no
placeholder of that kind, the placeholders go at the start of the first user turn (LLaVA's rule).
JPEG/PNG/WebP/video bytes are not decoded here: run `python -m data_pipelines.lint OUT` for that.

Output: `OUT/shard-NNNNNN.tar`, shard k holding the good rows among input rows
[k * N, (k + 1) * N) (rows count from 0; in jsonl, blank lines are not rows). A shard's bytes depend only on the input and the arguments, never on the
worker count or on what an earlier run wrote. Each shard is written under a temporary name and
renamed; `OUT/manifest.json` lists finished shards with their row ranges, and `OUT/DONE` marks a
complete conversion, so a rerun with the same arguments redoes only missing shards.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from data_pipelines.lint import VIDEO_SUFFIXES, Progress
from data_pipelines.training import special_tokens as st
from data_pipelines.training.conversation import SampleError, content_text, parse_messages, placeholder_order
from data_pipelines.training.decode import to_rgb
from data_pipelines.training.samples import IMAGE_SUFFIXES

FORMATS = ("jsonl", "parquet", "hf_disk", "llava")
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT / LLaVA speaker names
# PIL format name -> the member extension `build_sample` reads; others are re-encoded as PNG.
NATIVE_IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MANIFEST, DONE = "manifest.json", "DONE"
MANIFEST_VERSION = 1
BAD_EXAMPLES_PER_SHARD = 5


@dataclass(frozen=True)
class ConvertConfig:
    """Everything that decides the output bytes (the worker count does not)."""

    input: str
    format: str
    image_root: str
    source: str
    samples_per_shard: int
    split: str = "train"


@dataclass(frozen=True)
class ShardTask:
    shard: int
    row_start: int
    row_stop: int
    byte_offset: int = 0  # jsonl only: where row `row_start` begins

    @property
    def name(self) -> str:
        return f"shard-{self.shard:06d}.tar"


@dataclass
class ShardResult:
    name: str
    rows: tuple[int, int]
    samples: int
    bytes: int
    bad: dict[str, int]
    bad_examples: list[tuple[int, str, str]]  # (row, reason, detail)


@dataclass
class ConvertReport:
    out: str
    num_rows: int
    num_shards: int
    written: list[str] = field(default_factory=list)  # shards written by this run
    skipped: list[str] = field(default_factory=list)  # shards already complete before it
    samples: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    bad_examples: list[tuple[int, str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Reading input rows
# --------------------------------------------------------------------------------------


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


@functools.lru_cache(maxsize=2)
def _load_llava(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        lines = [line for line in text.splitlines()[:2] if line.strip()]
        if err.msg == "Extra data" and lines and all(_is_json_object(line) for line in lines):
            raise ValueError(f"{path} looks like JSON Lines (one object per line), not a LLaVA json list: "
                             "convert it with --format jsonl") from None
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): "
                         "--format llava reads one json list") from None
    if not isinstance(records, list):
        raise ValueError(f"{path} is not a LLaVA json list")
    return records


@functools.lru_cache(maxsize=2)
def _load_hf_disk(path: str, split: str):
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} has splits {sorted(loaded)}: set --split to one of them")
        loaded = loaded[split]
    # Arrow rows: media stay undecoded `{bytes, path}` structs, nothing goes through PIL.
    return loaded.with_format("arrow")


def _jsonl_plan(path: str, per_shard: int) -> tuple[int, list[int]]:
    """(non-blank lines, byte offset of every per_shard-th one): a worker seeks straight to its rows."""
    offsets, rows, position = [], 0, 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                if rows % per_shard == 0:
                    offsets.append(position)
                rows += 1
            position += len(line)
    return rows, offsets


def plan_shards(cfg: ConvertConfig) -> list[ShardTask]:
    """Shard k <- input rows [k * N, (k + 1) * N)."""
    n = cfg.samples_per_shard
    offsets: list[int] = []
    if cfg.format == "jsonl":
        num_rows, offsets = _jsonl_plan(cfg.input, n)
    elif cfg.format == "parquet":
        import pyarrow.parquet as pq

        num_rows = pq.read_metadata(cfg.input).num_rows
    elif cfg.format == "hf_disk":
        num_rows = len(_load_hf_disk(cfg.input, cfg.split))
    else:
        num_rows = len(_load_llava(cfg.input))
    return [ShardTask(k, start, min(start + n, num_rows), offsets[k] if offsets else 0)
            for k, start in enumerate(range(0, num_rows, n))]


def read_rows(cfg: ConvertConfig, task: ShardTask) -> list[Any]:
    """The raw input rows of one shard (a row that is not even parseable comes back as the error)."""
    count = task.row_stop - task.row_start
    if cfg.format == "jsonl":
        rows: list[Any] = []
        with open(cfg.input, "rb") as f:
            f.seek(task.byte_offset)
            for line in f:
                if len(rows) == count:
                    break
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as err:
                        rows.append(SampleError("malformed_json", f"line is not JSON: {err}"))
        return rows
    if cfg.format == "parquet":
        return _parquet_rows(cfg.input, task.row_start, task.row_stop)
    if cfg.format == "hf_disk":
        return _load_hf_disk(cfg.input, cfg.split)[task.row_start:task.row_stop].to_pylist()
    return [llava_to_row(r) for r in _load_llava(cfg.input)[task.row_start:task.row_stop]]


def _parquet_rows(path: str, start: int, stop: int) -> list[dict]:
    """Rows [start, stop), reading only the row groups that hold them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    groups, first_row, group_start = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        group_stop = group_start + pf.metadata.row_group(g).num_rows
        if group_start < stop and group_stop > start:
            groups.append(g)
            first_row = group_start if first_row is None else first_row
        group_start = group_stop
    if not groups:
        return []
    table: pa.Table = pf.read_row_groups(groups)
    return table.slice(start - first_row, stop - start).to_pylist()


def cauldron_to_row(record: dict) -> dict:
    """the_cauldron layout (`images` list + `texts`: [{user, assistant}, ...]) -> a messages row; the
    images open the first user turn (LLaVA's rule for media without placeholders)."""
    messages = []
    for turn in record["texts"]:
        if not isinstance(turn, dict):
            return SampleError("malformed_json", "a `texts` entry is not an object")
        messages += [{"role": "user", "content": turn.get("user")}, {"role": "assistant", "content": turn.get("assistant")}]
    return {"messages": messages, "images": record.get("images"), "id": record.get("id"),
            "source": record.get("source")}


def recognise_row(row: Any) -> Any:
    """Rows of the layouts users bring from the Hub, whatever the container (jsonl, parquet,
    save_to_disk): `messages` as is; `conversations` with from/value (LLaVA, ShareGPT); `texts` +
    `images` (the_cauldron)."""
    if not isinstance(row, dict) or "messages" in row:
        return row
    if isinstance(row.get("conversations"), list):
        return llava_to_row(row)
    if isinstance(row.get("texts"), list):
        return cauldron_to_row(row)
    return row


def llava_to_row(record: Any) -> Any:
    """A LLaVA / ShareGPT record -> a messages-format row."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return SampleError("malformed_json", "record without a `conversations` list")
    messages = [{"role": t.get("from"), "content": t.get("value")} if isinstance(t, dict) else t
                for t in record["conversations"]]
    return {"messages": messages, "images": record.get("image"), "videos": record.get("video"),
            "id": record.get("id"), "source": record.get("source")}


# --------------------------------------------------------------------------------------
# Row -> sample
# --------------------------------------------------------------------------------------


@dataclass
class ConvertedSample:
    doc: dict
    images: list[tuple[str, bytes]]  # (extension, bytes) in placeholder order
    videos: list[tuple[str, bytes]]


def _normalize_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        raise SampleError("empty_conversation", "no `messages` list")
    normalized = []
    for m in messages:
        if not isinstance(m, dict):
            raise SampleError("malformed_json", "message is not an object")
        role = m.get("role")
        normalized.append({"role": ROLE_ALIASES.get(role, role), "content": content_text(m.get("content"))})
    return normalized


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _media_bytes(ref: Any, image_root: Path) -> tuple[str, bytes]:
    """(path or "", bytes) of one media reference: a path, bytes, or a `{bytes, path}` struct."""
    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray)):
        return "", bytes(ref)
    if not isinstance(ref, str) or not ref:
        raise SampleError("malformed_json", f"media reference {type(ref).__name__} is neither a path nor bytes")
    path = image_root / ref
    try:
        return ref, path.read_bytes()
    except OSError:
        raise SampleError("missing_media_file", f"{path} cannot be read") from None


def _image_member(ref: Any, image_root: Path) -> tuple[str, bytes]:
    """(extension, bytes): native formats copied byte for byte, others re-encoded as PNG."""
    name, data = _media_bytes(ref, image_root)
    suffix = Path(name).suffix.lower().lstrip(".")
    if suffix in IMAGE_SUFFIXES:
        return suffix, data
    try:
        with Image.open(io.BytesIO(data)) as image:
            if getattr(image, "n_frames", 1) > 1:  # re-encoding would keep its first frame, unannounced
                raise SampleError("animated_image", f"{name or 'image bytes'}: {image.n_frames} frames; convert it "
                                                    "to a video (--format with `videos`) or to its first frame")
            if image.format in NATIVE_IMAGE_FORMATS:
                return NATIVE_IMAGE_FORMATS[image.format], data
            buffer = io.BytesIO()
            to_rgb(image).save(buffer, format="PNG")
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SampleError("corrupt_image", f"{name or 'image bytes'}: {err}") from None
    return "png", buffer.getvalue()


def _video_member(ref: Any, image_root: Path) -> tuple[str, bytes]:
    name, data = _media_bytes(ref, image_root)
    suffix = Path(name).suffix.lower().lstrip(".")
    return (suffix if suffix in VIDEO_SUFFIXES else "mp4"), data  # decoders sniff the container


def _with_leading_placeholders(messages: list[dict], kind: str, count: int) -> list[dict]:
    """LLaVA's rule for rows whose media have no placeholder: they open the first user turn."""
    placeholder = st.IMAGE_PLACEHOLDER if kind == "image" else st.VIDEO_PLACEHOLDER
    for m in messages:
        if m["role"] == "user":
            m["content"] = (placeholder + "\n") * count + m["content"]
            return messages
    raise SampleError("placeholder_mismatch", f"{count} {kind}s but no user turn to put them in")


def row_to_sample(row: Any, image_root: Path, default_source: str) -> ConvertedSample:
    """Validate one messages-format row as training would; raises SampleError when it is bad."""
    row = recognise_row(row)
    if isinstance(row, SampleError):
        raise row
    if not isinstance(row, dict):
        raise SampleError("malformed_json", "row is not an object")
    if "messages" not in row:
        raise SampleError("unrecognised_layout", f"row fields {sorted(row)[:8]}: no `messages`, `conversations` or "
                                                 "`texts`")
    messages = _normalize_messages(row.get("messages"))
    image_refs, video_refs = _as_list(row.get("images")), _as_list(row.get("videos"))
    parsed = parse_messages({"messages": messages})  # the training parser: same reasons
    order = placeholder_order(parsed)
    for kind, refs in (("image", image_refs), ("video", video_refs)):
        if refs and not order.count(kind):
            messages = _with_leading_placeholders(messages, kind, len(refs))
    order = placeholder_order(parse_messages({"messages": messages}))
    if (order.count("image"), order.count("video")) != (len(image_refs), len(video_refs)):
        raise SampleError("placeholder_mismatch", f"{order.count('image')} <image> / {order.count('video')} <video> "
                                                  f"placeholders for {len(image_refs)} images / {len(video_refs)} videos")
    images = [_image_member(ref, image_root) for ref in image_refs]
    videos = [_video_member(ref, image_root) for ref in video_refs]
    source = row.get("source") if isinstance(row.get("source"), str) and row.get("source") else default_source
    doc = {"messages": messages, "source": source}
    if row.get("id") is not None:
        doc["id"] = str(row["id"])
    return ConvertedSample(doc, images, videos)


# --------------------------------------------------------------------------------------
# Writing shards
# --------------------------------------------------------------------------------------


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Fixed metadata, so the same content gives byte-identical tar files."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def sample_key(source: str, row: int) -> str:
    """Unique per input row; no dots or slashes (webdataset splits keys at the first dot)."""
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '_', source)}-{row:09d}"


def convert_shard(cfg: ConvertConfig, task: ShardTask, out: str) -> ShardResult:
    """Write one shard from its input rows (temporary name, then an atomic rename)."""
    image_root = Path(cfg.image_root)
    final = Path(out) / task.name
    partial = final.with_name(final.name + ".partial")
    bad: Counter[str] = Counter()
    examples: list[tuple[int, str, str]] = []
    samples = 0
    with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row_index, row in enumerate(read_rows(cfg, task), task.row_start):
            try:
                sample = row_to_sample(row, image_root, cfg.source)
            except SampleError as err:
                bad[err.reason] += 1
                if len(examples) < BAD_EXAMPLES_PER_SHARD:
                    examples.append((row_index, err.reason, str(err)))
                continue
            key = sample_key(cfg.source, row_index)
            _add_member(tar, f"{key}.json", json.dumps(sample.doc, ensure_ascii=False).encode("utf-8"))
            for i, (ext, data) in enumerate(sample.images):
                _add_member(tar, f"{key}.img{i}.{ext}", data)
            for i, (ext, data) in enumerate(sample.videos):
                _add_member(tar, f"{key}.vid{i}.{ext}", data)
            samples += 1
    os.replace(partial, final)
    return ShardResult(task.name, (task.row_start, task.row_stop), samples, final.stat().st_size,
                       dict(sorted(bad.items())), examples)


def _convert_shard_star(args: tuple[ConvertConfig, ShardTask, str]) -> ShardResult:
    return convert_shard(*args)


# --------------------------------------------------------------------------------------
# Resume bookkeeping
# --------------------------------------------------------------------------------------


def _fingerprint(cfg: ConvertConfig) -> dict:
    """The arguments plus the input's size and mtime: a changed input invalidates old shards."""
    stat = os.stat(cfg.input)
    return {**asdict(cfg), "input_size": stat.st_size, "input_mtime_ns": stat.st_mtime_ns,
            "version": MANIFEST_VERSION}


def _write_json(path: Path, doc: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _load_manifest(out: Path, fingerprint: dict) -> dict:
    """The manifest of an earlier run with the same arguments, or a fresh one.

    Raises ValueError when OUT holds another conversion (other arguments or input) or stray shards.
    """
    path = out / MANIFEST
    if path.exists():
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("args") != fingerprint:
            changed = sorted(k for k in fingerprint if manifest.get("args", {}).get(k) != fingerprint[k])
            raise ValueError(f"{out} holds a conversion with other arguments or input (differs in {changed}): "
                             f"use another --out or delete it")
        return manifest
    if any(out.glob("shard-*.tar")):
        raise ValueError(f"{out} holds shards but no {MANIFEST}: use an empty --out")
    return {"args": fingerprint, "shards": {}}


def _is_complete(out: Path, manifest: dict, task: ShardTask) -> bool:
    entry = manifest["shards"].get(task.name)
    path = out / task.name
    return (entry is not None and entry["rows"] == [task.row_start, task.row_stop]
            and path.is_file() and path.stat().st_size == entry["bytes"])


def convert(cfg: ConvertConfig, out: str | Path, workers: int = 1, progress: bool = True) -> ConvertReport:
    """Convert `cfg.input` into `out`; shards finished by an earlier run with the same arguments are kept."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(cfg)
    manifest = _load_manifest(out, fingerprint)
    tasks = plan_shards(cfg)
    report = ConvertReport(str(out), tasks[-1].row_stop if tasks else 0, len(tasks))
    pending = [t for t in tasks if not _is_complete(out, manifest, t)]
    report.skipped = [t.name for t in tasks if t not in pending]
    if pending:
        (out / DONE).unlink(missing_ok=True)
        bar = Progress(sum(t.row_stop - t.row_start for t in pending), "convert", "rows") if progress else None
        # spawn: a forked child would inherit the parent's thread pools (torch/OpenMP, pyarrow).
        pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and len(pending) > 1 else None
        mapper = pool.imap_unordered if pool is not None else map
        try:
            for result in mapper(_convert_shard_star, [(cfg, t, str(out)) for t in pending]):
                entry = asdict(result)
                entry["rows"] = list(result.rows)
                manifest["shards"][result.name] = entry
                _write_json(out / MANIFEST, manifest)
                report.written.append(result.name)
                if bar is not None:
                    bar.update(result.rows[1] - result.rows[0])
        finally:
            if pool is not None:
                pool.close()
                pool.join()
            if bar is not None:
                bar.close()
    report.written.sort()
    bad: Counter[str] = Counter()
    for task in tasks:
        entry = manifest["shards"][task.name]
        report.samples += entry["samples"]
        bad.update(entry["bad"])
        report.bad_examples += [tuple(e) for e in entry["bad_examples"]]
    report.bad = dict(sorted(bad.items()))
    _write_json(out / MANIFEST, manifest)
    _write_json(out / DONE, {"rows": report.num_rows, "samples": report.samples, "shards": len(tasks),
                             "bad": report.bad})
    return report


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.convert",
        description="Convert local conversation data into webdataset shards (OUT/shard-NNNNNN.tar) that training "
                    "reads. Rerunning the same command resumes: finished shards are kept. Bad rows are counted and "
                    "listed, not fatal. Exit status: 0 done, 1 no row converted, 2 usage error.")
    parser.add_argument("--input", required=True, type=Path, metavar="PATH",
                        help="a .jsonl or .parquet file, a datasets.save_to_disk directory, or a LLaVA json list")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="jsonl/parquet/hf_disk: rows with `messages` ([{role, content}]) and optional "
                             "`images`/`videos`; llava: [{id, image, conversations: [{from, value}]}]")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory for the shards")
    parser.add_argument("--image-root", type=Path, metavar="DIR",
                        help="directory that relative image/video paths start from (default: the input's directory)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, metavar="N",
                        help="input rows per shard; bad rows leave a shard short (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, metavar="K", help="parallel processes (default: %(default)s)")
    parser.add_argument("--source", metavar="NAME", help="source name for rows without a `source` field (default: the input's name)")
    parser.add_argument("--split", default="train", metavar="NAME", help="hf_disk: split of a DatasetDict (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    args = parser.parse_args(argv)
    if not args.input.exists():
        parser.error(f"--input {str(args.input)!r} does not exist")
    if (args.format == "hf_disk") != args.input.is_dir():
        parser.error(f"--format {args.format} needs --input to be {'a directory' if args.format == 'hf_disk' else 'a file'}")
    if args.samples_per_shard < 1 or args.workers < 1:
        parser.error("--samples-per-shard and --workers must be >= 1")
    if args.image_root is not None and not args.image_root.is_dir():
        parser.error(f"--image-root {str(args.image_root)!r} is not a directory")
    return args


def config_from_args(args: argparse.Namespace) -> ConvertConfig:
    input_path = args.input.resolve()
    image_root = (args.image_root or (input_path if input_path.is_dir() else input_path.parent)).resolve()
    source = args.source or input_path.name.split(".")[0]
    return ConvertConfig(str(input_path), args.format, str(image_root), source, args.samples_per_shard, args.split)


def format_report(report: ConvertReport) -> str:
    lines = [f"[convert] {report.num_rows} rows -> {report.samples} samples in {report.num_shards} shards at "
             f"{report.out} ({len(report.written)} written, {len(report.skipped)} already complete)"]
    if report.bad:
        lines.append(f"bad rows (skipped): {sum(report.bad.values())}")
        lines += [f"  {reason:<22} {n}" for reason, n in report.bad.items()]
        lines.append("examples (row, reason); the manifest lists up to "
                     f"{BAD_EXAMPLES_PER_SHARD} per shard:")
        lines += [f"  row {row}: {detail}" for row, _, detail in report.bad_examples[:20]]
    lines.append(f"next: python -m data_pipelines.lint {report.out}  (decodes every image and video)")
    return "\n".join(lines)


def nothing_converted(report: ConvertReport) -> str | None:
    """Why a run that wrote no sample from a non-empty input failed, and what to try (None if it wrote some)."""
    if report.samples or not report.num_rows:
        return None
    reasons = ", ".join(f"{r} {n}" for r, n in report.bad.items())
    hint = ""
    if set(report.bad) <= {"unrecognised_layout", "empty_conversation", "malformed_json"}:
        hint = ("; the rows' layout was not recognised: rows need `messages` ([{role, content}]), `conversations` "
                "([{from, value}], LLaVA / ShareGPT) or `texts` + `images` (the_cauldron); a LLaVA json list "
                "takes --format llava, a save_to_disk directory --format hf_disk")
    first = report.bad_examples[0][2] if report.bad_examples else ""
    return f"no row of {report.num_rows} converted ({reasons}){hint}. First problem: {first}"


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    cfg = config_from_args(args)
    try:
        report = convert(cfg, args.out, args.workers, progress=not args.no_progress)
    except ValueError as err:
        print(f"convert: {err}", file=sys.stderr)
        return 2
    print(format_report(report), flush=True)
    failure = nothing_converted(report)
    if failure:
        print(f"convert: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
