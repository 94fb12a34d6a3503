"""Every `python -m ...` command the README names answers `--help` with its usage and exit 0."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One interpreter runs every module's `--help` in turn (torch and transformers import once).
_RUN_EACH = r"""
import contextlib, io, json, runpy, sys
results = {}
for module in sys.argv[1:]:
    out, code = io.StringIO(), 0
    sys.argv = [module, "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    results[module] = [code, out.getvalue()[:800]]
print(json.dumps(results))
"""


def readme_modules() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return sorted(set(re.findall(r"python -m ([a-z_][a-z0-9_.]*)", text)) - {"pip", "pytest", "venv"})


def test_every_readme_command_answers_help():
    modules = readme_modules()
    assert {"train", "train.pipeline", "tests.bench.run_all", "data_pipelines.synth"} <= set(modules)
    done = subprocess.run([sys.executable, "-c", _RUN_EACH, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {m: r for m, r in results.items() if r[0] != 0 or "usage" not in r[1].lower()}
    assert not failed, failed
