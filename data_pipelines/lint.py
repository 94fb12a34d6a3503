"""Shard linter: run every sample through the training path and report what training would skip.

Each sample goes through `build_sample`, the function the training loader calls, so lint and
training agree on every reason (`malformed_json`, `bad_role`, `empty_conversation`,
`placeholder_mismatch`, `missing_member`, `missing_json`, `corrupt_image`, `image_too_large`,
`corrupt_video`, `empty_video`, `unsupported_media` (an `imgN` / `vidN` member of a format not
read, e.g. `.gif`), `bad_text` (a lone surrogate), `unsafe_member_name` and `linked_member` (a
member the reader never reads: `..` or absolute name, link or device), `duplicate_member` (two
members of one name in a sample), `corrupt_shard` (a file that is not a readable tar), and with a
tokenizer `too_long` and `bad_sample` (any other error while building the sample)). Members no
sample reads are warnings (`unknown_member`). An exception other than a skip reason is
`unhandled_error`: training would stop there, not skip.

With `--val DIR_OR_PATTERN` (held-out shards, repeatable) a training sample whose key is also a
held-out one is bad too (`train_val_overlap`).

CLI: `python -m data_pipelines.lint DIR_OR_PATTERN [--val DIR_OR_PATTERN ...] [--tokenizer DIR]
[--seq-length N ...] [--json OUT] [--workers K]`; exit 1 when a bad sample is found, 0 when none, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import sys
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from data_pipelines.training import special_tokens as st
from data_pipelines.training.conversation import SampleError
from data_pipelines.training.decode import MediaDecodeError
from data_pipelines.training.evs import EVS_MODES, EvsConfig
from data_pipelines.training.samples import IMAGE_SUFFIXES, SampleSpec, Tokenizer, build_sample
from data_pipelines.training.shards import (
    ShardError,
    IndexedSample,
    RawSample,
    expand_shard_paths,
    index_shard,
    read_indexed_sample,
)
from data_pipelines.training.tiling import TilingConfig

# The video suffixes `build_sample` reads (it keeps them inline).
VIDEO_SUFFIXES = ("mp4", "webm", "mkv", "avi", "mov")
_KNOWN_MEMBER = re.compile(
    rf"^(?:json|img\d+\.(?:{'|'.join(IMAGE_SUFFIXES)})|vid\d+\.(?:{'|'.join(VIDEO_SUFFIXES)}))$")
# Samples per work item: small enough for a live progress bar and to spread one large shard over
# workers, large enough that task overhead stays negligible next to decoding.
CHUNK_SAMPLES = 64
UNKNOWN_SOURCE = "(unknown)"


# --------------------------------------------------------------------------------------
# Shared CLI pieces (inspect uses them too)
# --------------------------------------------------------------------------------------


def add_sample_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """The knobs of `SampleSpec`, named after the recipe fields they mirror."""
    group = parser.add_argument_group(
        "sample settings", "set these as the training recipe does (data.* and the model's tokens per tile)")
    group.add_argument("--seq-length", type=int, default=16384, metavar="N",
                       help="data.seq_length: a sample longer than this at 1 tile and 1 frame is too_long "
                            "(default: %(default)s)")
    group.add_argument("--tile-size", type=int, default=512, metavar="PX", help="data.tile_size (default: %(default)s)")
    group.add_argument("--min-tiles", type=int, default=1, metavar="N", help="data.min_tiles (default: %(default)s)")
    group.add_argument("--max-tiles", type=int, default=12, metavar="N", help="data.max_tiles (default: %(default)s)")
    group.add_argument("--no-thumbnail", action="store_true", help="data.use_thumbnail=false")
    group.add_argument("--tokens-per-tile", type=int, default=256, metavar="N",
                       help="context tokens per tile or frame, from the model (default: %(default)s)")
    group.add_argument("--video-fps", type=float, default=2.0, metavar="FPS", help="data.video_fps (default: %(default)s)")
    group.add_argument("--max-frames", type=int, default=128, metavar="N", help="data.max_frames (default: %(default)s)")
    group.add_argument("--reasoning-on-ratio", type=float, default=0.0, metavar="P",
                       help="data.reasoning_on_ratio (default: %(default)s)")
    group.add_argument("--chat-template", choices=("auto", "tokenizer", "builtin"), default="auto",
                       help="data.chat_template (default: %(default)s)")
    group.add_argument("--no-loss-on-think", action="store_true", help="data.loss_on_think=false")
    group.add_argument("--evs-mode", choices=EVS_MODES, default="off", help="data.evs.mode (default: %(default)s)")
    group.add_argument("--evs-q", type=float, default=0.0, metavar="Q", help="data.evs.q (default: %(default)s)")
    group.add_argument("--evs-q-min", type=float, default=0.0, metavar="Q", help="data.evs.q_min (default: %(default)s)")
    group.add_argument("--evs-q-max", type=float, default=0.0, metavar="Q", help="data.evs.q_max (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, metavar="N", help="the run's seed (default: %(default)s)")


def sample_spec_from_args(args: argparse.Namespace) -> SampleSpec:
    """Raises ValueError naming the bad flag."""
    for name in ("seq_length", "tile_size", "tokens_per_tile", "max_frames"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.video_fps <= 0:
        raise ValueError(f"--video-fps must be > 0, got {args.video_fps}")
    tiling = TilingConfig(tile_size=args.tile_size, min_tiles=args.min_tiles, max_tiles=args.max_tiles,
                          use_thumbnail=not args.no_thumbnail)
    evs = EvsConfig(mode=args.evs_mode, q=args.evs_q, q_min=args.evs_q_min, q_max=args.evs_q_max)
    evs.validate("data.evs")  # the --evs-* flags mirror these fields
    return SampleSpec(seq_length=args.seq_length, tokens_per_tile=args.tokens_per_tile, tiling=tiling,
                      video_fps=args.video_fps, max_frames=args.max_frames,
                      reasoning_on_ratio=args.reasoning_on_ratio, chat_template=args.chat_template,
                      loss_on_think=not args.no_loss_on_think, seed=args.seed, evs=evs)


class Progress:
    """A tqdm bar on a terminal; a plain line every `interval` seconds otherwise (logs, CI)."""

    def __init__(self, total: int, desc: str, unit: str, interval: float = 30.0):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f"[{self.desc}] {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One problem: a bad sample (index >= 0), or a tar member the reader drops (index -1)."""

    reason: str
    shard: str
    key: str  # sample key, or the member name for member-level findings
    index: int  # sample position in its shard; -1 for member-level findings
    source: str
    detail: str = ""


@dataclass
class LintReport:
    num_shards: int = 0
    num_samples: int = 0
    bad: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def num_bad_samples(self) -> int:
        return sum(1 for f in self.bad if f.index >= 0)

    def by_reason(self, findings: list[Finding] | None = None) -> dict[str, int]:
        return dict(sorted(Counter(f.reason for f in (self.bad if findings is None else findings)).items()))

    def by_source(self) -> dict[str, dict[str, int]]:
        table: dict[str, Counter] = defaultdict(Counter)
        for f in self.bad:
            table[f.source][f.reason] += 1
        return {source: dict(sorted(c.items())) for source, c in sorted(table.items())}

    def sort(self) -> None:
        order = lambda f: (f.shard, f.index, f.key, f.reason)  # noqa: E731
        self.bad.sort(key=order)
        self.warnings.sort(key=order)

    def to_json(self) -> dict:
        return {
            "num_shards": self.num_shards,
            "num_samples": self.num_samples,
            "num_bad_samples": self.num_bad_samples,
            "num_bad": len(self.bad),
            "num_warnings": len(self.warnings),
            "by_reason": self.by_reason(),
            "by_source": self.by_source(),
            "warnings_by_reason": self.by_reason(self.warnings),
            "bad": [asdict(f) for f in self.bad],
            "warnings": [asdict(f) for f in self.warnings],
        }


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------


def structure_only_tokenizer() -> Tokenizer:
    """A real `Tokenizer` for runs without one: byte-level with no merges (one id per UTF-8 byte)
    plus the special tokens, so `build_sample` runs its whole path; with an unbounded sequence
    length it checks structure and decodes every media item but cannot judge `too_long`."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    rust = RustTokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.add_special_tokens(list(st.ALL_SPECIAL_TOKENS))
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust, unk_token=st.UNK, pad_token=st.PAD))


def declared_source(raw: RawSample) -> str:
    """The `source` the sample's JSON names, for the per-source table."""
    try:
        source = json.loads(raw.members["json"]).get("source")
    except (KeyError, ValueError, AttributeError):
        return UNKNOWN_SOURCE
    return source if isinstance(source, str) and source else UNKNOWN_SOURCE


def lint_sample(raw: RawSample, spec: SampleSpec, tokenizer) -> tuple[Finding | None, list[Finding]]:
    """(the reason training would skip it, or None; warnings)."""
    source = declared_source(raw)
    warnings = []
    if "json" in raw.members:
        warnings = [Finding("unknown_member", raw.shard, raw.key, raw.index, source,
                            f"{raw.key}.{suffix} is read by no sample field")
                    for suffix in sorted(raw.members) if not _KNOWN_MEMBER.match(suffix)]
    try:
        build_sample(raw, source, spec, tokenizer)
    except (SampleError, MediaDecodeError) as err:
        detail = str(err).removeprefix(err.reason).removeprefix(": ")
        return Finding(err.reason, raw.shard, raw.key, raw.index, source, detail), warnings
    except Exception as err:  # noqa: BLE001 - training would crash here: report it, keep linting
        return Finding("unhandled_error", raw.shard, raw.key, raw.index, source,
                       f"{type(err).__name__}: {err}"), warnings
    return None, warnings


@dataclass
class ShardScan:
    shard: str
    index: list[IndexedSample] = field(default_factory=list)
    bad: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)


def scan_shard(shard: str) -> ShardScan:
    """Header pass: the shard's sample index as the loader builds it, plus the members it drops."""
    scan = ShardScan(shard)
    try:
        # Unsafe names and links are in their samples' `dropped`: linted (and counted) per sample.
        scan.index = index_shard(shard)
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:  # training skips this shard (counted)
        return ShardScan(shard, bad=[Finding("corrupt_shard", shard, Path(shard).name, -1, UNKNOWN_SOURCE,
                                             f"{type(err).__name__}: {err}")])
    return scan


# Per-worker state, set once by `_init_worker` (a tokenizer is too heavy to send with each task).
_WORKER: dict = {}


def _init_worker(spec: SampleSpec, tokenizer_dir: str | None) -> None:
    import torch

    torch.set_num_threads(1)  # workers already run in parallel
    _WORKER["spec"] = spec
    _WORKER["tokenizer"] = Tokenizer.load(tokenizer_dir) if tokenizer_dir else structure_only_tokenizer()


def _lint_chunk(task: tuple[str, int, list[IndexedSample]]) -> tuple[int, list[Finding], list[Finding]]:
    """Consecutive samples of one shard, read as the loader reads them -> (samples, bad, warnings)."""
    shard, start, entries = task
    bad, warnings = [], []
    for index, entry in enumerate(entries, start):
        try:
            raw = read_indexed_sample(shard, index, entry)
        except OSError as err:
            bad.append(Finding("corrupt_shard", shard, entry.key, index, UNKNOWN_SOURCE, f"{type(err).__name__}: {err}"))
            continue
        finding, sample_warnings = lint_sample(raw, _WORKER["spec"], _WORKER["tokenizer"])
        warnings += sample_warnings
        if finding is not None:
            bad.append(finding)
    return len(entries), bad, warnings


def lint_shards(shards: list[str], spec: SampleSpec, tokenizer_dir: str | None = None, workers: int = 1,
                progress: bool = True) -> LintReport:
    """Lint every sample of `shards`. Without `tokenizer_dir`, structure and media only."""
    if tokenizer_dir is None:
        spec = replace(spec, seq_length=sys.maxsize)
    report = LintReport(num_shards=len(shards))
    # spawn, as the training loader: a forked child would inherit the parent's torch/OpenMP thread pools.
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (spec, tokenizer_dir)) if workers > 1 else None
    if pool is None:
        _init_worker(spec, tokenizer_dir)
    mapper = pool.imap_unordered if pool is not None else map
    try:
        tasks = []
        for scan in mapper(scan_shard, shards):
            report.bad += scan.bad
            report.warnings += scan.warnings
            report.num_samples += len(scan.index)
            tasks += [(scan.shard, s, scan.index[s:s + CHUNK_SAMPLES]) for s in range(0, len(scan.index), CHUNK_SAMPLES)]
        bar = Progress(report.num_samples, "lint", "samples") if progress else None
        for num_read, bad, warnings in mapper(_lint_chunk, tasks):
            report.bad += bad
            report.warnings += warnings
            if bar is not None:
                bar.update(num_read)
        if bar is not None:
            bar.close()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    report.sort()
    return report


def train_val_overlap(train_shards: list[str], val_shards: list[str]) -> list[Finding]:
    """Samples of the linted (training) shards whose key is also a held-out sample's: a leak that
    makes validation loss look better than it is. One `train_val_overlap` finding per such sample."""
    held_out = {entry.key: shard for shard in val_shards for entry in index_shard(shard)}
    return [Finding("train_val_overlap", shard, entry.key, index, UNKNOWN_SOURCE, f"also in {held_out[entry.key]}")
            for shard in train_shards for index, entry in enumerate(index_shard(shard)) if entry.key in held_out]


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def format_report(report: LintReport, max_listed: int) -> str:
    good = report.num_samples - report.num_bad_samples
    lines = [f"{report.num_shards} shards, {report.num_samples} samples: {good} good, "
             f"{report.num_bad_samples} bad, {len(report.bad) - report.num_bad_samples} unsafe members or corrupt shards, "
             f"{len(report.warnings)} warnings"]
    for title, findings in (("bad", report.bad), ("warnings", report.warnings)):
        if not findings:
            continue
        lines.append(f"\n{title} by reason:")
        lines += [f"  {reason:<22} {n}" for reason, n in report.by_reason(findings).items()]
        if title == "bad":
            lines.append("\nbad by source:")
            lines += [f"  {source:<22} " + ", ".join(f"{r} {n}" for r, n in reasons.items())
                      for source, reasons in report.by_source().items()]
        by_reason: dict[str, list[Finding]] = defaultdict(list)
        for f in findings:
            by_reason[f.reason].append(f)
        for reason, group in sorted(by_reason.items()):
            lines.append(f"\n{reason}:")
            lines += [f"  {f.shard}  {f.key}" + (f"  ({f.detail})" if f.detail else "") for f in group[:max_listed]]
            if len(group) > max_listed:
                lines.append(f"  ... and {len(group) - max_listed} more (all are in --json)")
    if any(f.reason == "unhandled_error" for f in report.bad):
        lines.append("\nunhandled_error: training would stop at these samples instead of skipping them")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.lint",
        description="Check every sample of a shard set with the training code path (build_sample) and list "
                    "the ones training would skip, per reason and per source. Exit status: 0 clean, "
                    "1 bad samples found, 2 usage error.")
    parser.add_argument("shards", metavar="DIR_OR_PATTERN",
                        help="a shard directory, or a brace/glob pattern of .tar files "
                             "(e.g. '/data/shard-{000000..000099}.tar'), as in data.sources[].path")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer directory (data.tokenizer); enables the too_long check. Without it only "
                             "structure and media decoding are checked")
    parser.add_argument("--val", metavar="DIR_OR_PATTERN", action="append", default=[],
                        help="held-out shards (data.val_sources / monitor_sources paths; repeatable): a sample key "
                             "found in both is reported as train_val_overlap")
    parser.add_argument("--json", metavar="OUT", type=Path, help="also write the full report here as JSON")
    parser.add_argument("--workers", type=int, default=1, metavar="K", help="parallel processes (default: %(default)s)")
    parser.add_argument("--max-listed", type=int, default=20, metavar="N",
                        help="sample keys printed per reason; --json lists all (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar / progress lines")
    add_sample_spec_arguments(parser)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        args.spec = sample_spec_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        parser.error(f"--tokenizer {args.tokenizer!r} is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        shards = expand_shard_paths(args.shards)
        val_shards = [shard for pattern in args.val for shard in expand_shard_paths(pattern)]
    except (FileNotFoundError, ShardError) as err:
        print(f"lint: {err}", file=sys.stderr)
        return 2
    spec = args.spec
    if args.tokenizer:
        print(f"[lint] tokenizer {args.tokenizer}, seq_length {spec.seq_length}, {spec.tiling.tile_size}px tiles "
              f"x{spec.tiling.min_tiles}..{spec.tiling.max_tiles}, {spec.tokens_per_tile} tokens/tile, "
              f"video {spec.video_fps:g} fps <= {spec.max_frames} frames", flush=True)
    else:
        print("[lint] no --tokenizer: checking structure and media decoding (too_long is not checked)", flush=True)
    report = lint_shards(shards, spec, args.tokenizer, args.workers, progress=not args.no_progress)
    if val_shards:
        report.bad += train_val_overlap(shards, val_shards)
        report.sort()
    print(format_report(report, args.max_listed), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
