"""Run every benchmark in tests/bench: print its table, write bench_results/<name>.json.

A benchmark is a module `tests/bench/bench_*.py` exposing `run() -> dict` (JSON-able results)
and `render(dict) -> str` (the table). Benchmarks compare packers/kernels side by side within
one run (ratios), so numbers from one machine are never compared with another's; nothing here
asserts on time. `make bench` runs this; `python -m tests.bench.run_all packing` runs only the
benchmarks whose name contains "packing".
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR.parents[1] / "bench_results"  # repo root; gitignored


def discover(filters: list[str]) -> list[str]:
    """Module names of the benchmarks, sorted so the run order is stable."""
    names = sorted(m.name for m in pkgutil.iter_modules([str(BENCH_DIR)]) if m.name.startswith("bench_"))
    return [n for n in names if not filters or any(f in n for f in filters)]


def run_one(name: str) -> tuple[dict, float]:
    """Import and run one benchmark; returns its results (with timing added) and wall seconds."""
    module: ModuleType = importlib.import_module(f"{__package__ or 'tests.bench'}.{name}")
    start = time.perf_counter()
    data = module.run()
    seconds = time.perf_counter() - start
    data["wall_seconds"] = seconds
    print(module.render(data))
    return data, seconds


def write_json(name: str, data: dict) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.run_all",
        description="Run the benchmarks in tests/bench side by side; each prints its table and writes "
                    f"bench_results/<name>.json. Available: {', '.join(discover([]))}.")
    parser.add_argument("filters", nargs="*", metavar="NAME",
                        help="run only benchmarks whose module name contains one of these (default: all)")
    parser.add_argument("--list", action="store_true", help="list the matching benchmarks and exit")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Run all (or the named) benchmarks; a benchmark that raises fails the run, after the rest."""
    args = parse_args(argv)
    names = discover(args.filters)
    if not names:
        print(f"no benchmark in {BENCH_DIR} matches {args.filters}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(names))
        return 0
    failed = []
    for name in names:
        print(f"== {name} ==", flush=True)
        try:
            data, seconds = run_one(name)
        except Exception:  # report and carry on: one broken benchmark should not hide the others
            traceback.print_exc()
            failed.append(name)
            continue
        print(f"-> {write_json(name, data)} ({seconds:.1f} s)\n", flush=True)
    if failed:
        print(f"benchmarks that raised: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
