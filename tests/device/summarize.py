"""device_check.sh's summary.json, rewritten after every step (standard library only: it runs in a
fraction of a second with the image's python, between steps).

    {"status": "pass" | "fail", "seconds": since the start, "device_check": {"kit": ..., "files": [...]},
     "steps": {"a": {"title", "status", "exit", "timed_out", "seconds", "budget_s", "figures", "tail"}, ...}}

`figures` holds what a step reports on its last `DEVCHECK {json}` line (the step scripts print one)
and, for pytest steps, the counts of its final line; `tail` the last lines of its log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

TAIL_LINES = 25
FIGURES_PREFIX = "DEVCHECK "
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)\b")
TIMEOUT_EXITS = (124, 137)  # timeout(1): the budget ran out (137: killed after the grace period)


def step_figures(lines: list[str]) -> dict:
    figures: dict = {}
    for line in lines:
        if line.startswith(FIGURES_PREFIX):
            try:
                figures.update(json.loads(line[len(FIGURES_PREFIX):]))
            except json.JSONDecodeError:
                figures["unreadable_figures"] = line[len(FIGURES_PREFIX):][:200]
    for line in reversed(lines):  # pytest's last line: "3 passed, 2 deselected in 4.1s"
        counts = PYTEST_COUNT.findall(line)
        if counts and " in " in line:
            figures["pytest"] = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in counts}
            break
    return figures


def read_step(fields: list[str], logs: Path) -> tuple[str, dict]:
    name, status, rc, seconds, budget, title = (fields + [""] * 6)[:6]
    log = logs / f"{name}.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return name, {
        "title": title, "status": status, "exit": int(rc), "timed_out": int(rc) in TIMEOUT_EXITS,
        "seconds": float(seconds), "budget_s": int(budget), "figures": step_figures(lines),
        "tail": lines[-TAIL_LINES:],
    }


def summary(records: Path, logs: Path, kit: Path, out: Path, started: float) -> dict:
    steps = dict(read_step(line.split("\t"), logs) for line in records.read_text().splitlines() if line.strip()) \
        if records.exists() else {}
    manifest = kit / "manifest.json"
    return {
        "status": "pass" if steps and all(s["status"] == "pass" for s in steps.values()) else "fail",
        "seconds": round(time.time() - started, 1),
        "device_check": {
            "kit": json.loads(manifest.read_text()) if manifest.exists() else None,
            # what the output folder holds, this summary included
            "output": sorted({*(os.listdir(out) if out.exists() else []), "summary.json"} - {"summary.json.tmp"}),
        },
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=Path, required=True, help="steps.tsv: name, status, exit, seconds, budget, title")
    parser.add_argument("--logs", type=Path, required=True, help="folder of <step>.log")
    parser.add_argument("--kit", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the output folder (summary.json goes there)")
    parser.add_argument("--started", type=float, required=True, help="the check's start, seconds since the epoch")
    args = parser.parse_args(argv)
    result = summary(args.records, args.logs, args.kit, args.out, args.started)
    path = args.out / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)  # whole or not at all: the device tool may collect the folder at any moment
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
