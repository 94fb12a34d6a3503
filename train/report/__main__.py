"""`python -m train.report RUN_DIR`: (re)build `report.html` and its plots for a stage or pipeline
run directory, finished or running, from its metrics.jsonl / summary.json."""

from __future__ import annotations

import argparse
import sys

from train.report.build import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__)
    parser.add_argument("run_dir", help="a stage run directory or a pipeline run directory")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path = write_report(args.run_dir)
    except FileNotFoundError as err:
        print(f"report error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
