"""Every example line in the README runs as written, or says next to it why it cannot run here.

The README's shell examples (```bash blocks, one command per line, backslash continuations joined)
each do one of three things:
- run on this CPU machine exactly as printed: this test runs them, in README order, in one scratch
  checkout (symlinks to this tree; `.venv` links to the venv running the test), so a line that reads
  what an earlier one wrote (an export of a trained run, chat on it, a report) finds it there and
  every `runs/...` lands there;
- carry a trailing `# needs: X[, Y]` comment naming what this machine lacks (NEEDS below);
- or start a long job the suite must not (EXCLUDED below, each with its reason).
A line that is none of these fails here. The ```python blocks are examples too (run whole, through
the venv's python), and a ```text transcript (`$ command` then its output) must print what it shows
and exit as the README's exit codes say.

The lines run in order and share their outputs, so the runs are one session's work: `make test`
keeps a file on one worker (`--dist loadfile`); run the file whole, not one line with -k. Lines whose
commands other tests run already are excluded, saying which (about 2 minutes of CPU remain), hence
`slow`.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# What a marked line needs that this machine (one CPU, no network beyond package registries) lacks.
NEEDS = {
    "gpu": "a CUDA GPU (and the real recipes' model sizes)",
    "cluster": "a Slurm cluster or several nodes",
    "hub": "the Hugging Face Hub",
    "weights": "released checkpoints (/models/..., /ckpt/...)",
    "data": "the reader's own data set (/data/...)",
    "network": "the internet beyond this machine's package registries",
}

_SMOKE = ("the smoke pipeline: five stages of 24 steps, minutes on 2 cores; "
          "tests/integration/test_smoke_pipeline.py runs `make smoke`'s command as written")
# Lines that would run here but start long jobs (or the suite itself), left out on purpose.
EXCLUDED = {
    "make smoke": _SMOKE,
    ".venv/bin/python -m train.pipeline smoke=cpu run.dir=runs/smoke": _SMOKE,
    "make test": "the test suite, which this test is part of: it would run itself",
    "make setup TORCH_FIND_LINKS=wheels": "reinstalls .venv, the interpreter running this test (from the "
                                          "wheels the line before it downloads)",
    "make device-kit": "builds the GPU machine's kit (wheels, sources, data): minutes; "
                       "tests/unit/test_device_kit.py builds one",
    "bash .devcheck/device_check.sh --dry-run": "reads the .devcheck/ that `make device-kit` builds; "
                                                "tests/unit/test_device_kit.py runs it on the kit it builds",
    # The suite runs these commands already, with the same arguments (its own run.dir): running them
    # twice would cost ~3 CPU minutes of the suite's 15.
    ".venv/bin/python -m train --config-name stage1_image_sft smoke=cpu run.dir=runs/s1_tb "
    "logger=wandb_offline logger.tensorboard=true trainer.max_steps=2":
        "tests/integration/test_processes.py (wandb offline + TensorBoard, read back)",
    ".venv/bin/python -m train.evaluate --ckpt runs/s1 --tasks tests/eval_tasks/hvl_tiny_choice.yaml gsm8k --limit 100":
        "tests/integration/test_evaluate.py runs this line's tasks on a stage's checkpoint",
    ".venv/bin/python -m train.evaluate --ckpt runs/s1 --generation --samples 64":
        "tests/integration/test_evaluate.py (generation scored per held-out source)",
    ".venv/bin/torchrun --nproc-per-node 2 -m train --config-name stage1_image_sft smoke=cpu run.dir=runs/ddp "
    "trainer.max_steps=2": "tests/integration/test_processes.py (a two-rank torchrun stage)",
    ".venv/bin/torchrun --nproc-per-node 2 -m train --config-name stage3_text_recovery smoke=cpu "
    "model.impl=mcore parallel.tensor_parallel=2 parallel.sequence_parallel=true run.dir=runs/tp2 trainer.max_steps=2":
        "tests/integration/test_mcore_training.py (TP=2 + SP under torchrun, quiet)",
    ".venv/bin/torchrun --nproc-per-node 2 -m train --config-name stage1_image_sft smoke=cpu "
    "model.impl=mcore parallel.pipeline_parallel=2 trainer.grad_accum_steps=4 run.dir=runs/pp2 trainer.max_steps=2":
        "tests/integration/test_mcore_pipeline.py (a pipelined stage trains, validates, resumes)",
}

def _cat_jpg(path: Path) -> None:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 // 640, y * 255 // 480, (x + y) * 255 // 1120], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


# Files a runnable line names as the reader's own input ("your image"): the checkout gets a stand-in.
READER_FILES = {"cat.jpg": _cat_jpg}

# The README's exit codes ("Exit codes: ... 2 config or data error"): a transcript that shows one of
# these errors must exit with its code; any other transcript and every runnable line exit 0.
TRANSCRIPT_EXITS = {"config error:": 2, "data error:": 2}

# An unmarked line may name no absolute path (run.dir=/ckpt/..., path:/data/...): runnable lines
# work inside the checkout they run in. A `--dry-run` renders a cluster's job and checks no path.
_ABSOLUTE_PATH = re.compile(r"(?:^|[\s=:'\"\[{(])/[A-Za-z][\w.-]*/")
_NEEDS = re.compile(r"needs: ([a-z]+(?:, [a-z]+)*)")


@dataclass(frozen=True)
class Example:
    lineno: int  # README line it starts on
    kind: str  # "bash" (one command), "python" (a whole block) or "transcript" (`$ command` + output)
    text: str  # what runs, as written (bash: continuations and trailing comment included)
    command: str  # the command without comments, continuations joined (what EXCLUDED names)
    needs: tuple[str, ...]
    shown_output: tuple[str, ...] = ()  # transcript: the lines the README shows after the command

    @property
    def label(self) -> str:
        return f"README:{self.lineno}"


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one shell line: `#` starts a comment at a word start, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def _needs(comment: str) -> tuple[str, ...]:
    found = _NEEDS.search(comment)
    return tuple(found.group(1).split(", ")) if found else ()


def _bash_examples(lines: list[str], first: int) -> list[Example]:
    examples, held, start = [], [], 0
    for offset, line in enumerate(lines):
        if not held:
            code, _ = _split_comment(line.strip())
            if not code:  # blank or comment-only
                continue
            start = first + offset
        held.append(line)
        if line.rstrip().endswith("\\"):
            continue
        text = "\n".join(held)
        parts = [_split_comment(piece.strip()) for piece in held]
        command = " ".join(code.removesuffix("\\").strip() for code, _ in parts).strip()
        comment = " ".join(c for _, c in parts if c)
        examples.append(Example(start, "bash", text, command, _needs(comment)))
        held = []
    assert not held, f"README:{start}: a continuation that never ends"
    return examples


def _transcripts(lines: list[str], first: int) -> list[Example]:
    examples = []
    for offset, line in enumerate(lines):
        if line.startswith("$ "):
            shown = []
            for after in lines[offset + 1:]:
                if after.startswith("$ "):
                    break
                shown.append(after.strip())
            command, comment = _split_comment(line[2:])
            examples.append(Example(first + offset, "transcript", command, command, _needs(comment),
                                    tuple(s for s in shown if s)))
    return examples


def readme_examples() -> list[Example]:
    """Every example of README.md in order: bash lines, python blocks, text transcripts."""
    lines = README.read_text().splitlines()
    examples, i = [], 0
    while i < len(lines):
        fence = re.fullmatch(r"```(\w+)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == "```")
        body, first = lines[i + 1:end], i + 2
        if fence.group(1) == "bash":
            examples += _bash_examples(body, first)
        elif fence.group(1) == "python":
            text = "\n".join(body) + "\n"
            needs = sorted({n for line in body for n in _needs(_split_comment(line)[1])})
            examples.append(Example(first, "python", text, text, tuple(needs)))
        elif fence.group(1) == "text":
            examples += _transcripts(body, first)
        i = end + 1
    return examples


EXAMPLES = readme_examples()
RUNNABLE = [e for e in EXAMPLES if not e.needs and e.command not in EXCLUDED]


def test_every_example_runs_here_or_says_why_not():
    assert len(EXAMPLES) > 40 and len(RUNNABLE) > 15, (len(EXAMPLES), len(RUNNABLE))
    unknown = {e.label: e.needs for e in EXAMPLES if set(e.needs) - set(NEEDS)}
    assert not unknown, f"`needs:` names one of {sorted(NEEDS)}: {unknown}"
    # Every exclusion is a line the README still has (none kept for a line since changed).
    commands = {e.command for e in EXAMPLES}
    assert not set(EXCLUDED) - commands, sorted(set(EXCLUDED) - commands)
    # An unmarked line runs in the checkout: a path of the cluster's or the reader's is a missing mark.
    unmarked = [f"{e.label}: {e.command}" for e in RUNNABLE
                if "--dry-run" not in e.command and _ABSOLUTE_PATH.search(e.command)]
    assert not unmarked, "these name paths outside the checkout but carry no `# needs: ...`:\n" + "\n".join(unmarked)
    # Optional arguments are said in words, not as `[--flag]`: a line runs as printed.
    bracketed = [f"{e.label}: {e.command}" for e in RUNNABLE if re.search(r"\s\[--?\w", e.command)]
    assert not bracketed, bracketed


def test_the_parser_joins_continuations_and_reads_marks():
    # A piece written as the README writes: continuations, comments, `#` inside quotes, marks.
    piece = ["a --x 1 \\", "    'b=[{c:#d}]'   # why; needs: gpu, data", "# only a comment", "", "e '#f'  # g"]
    first, second = _bash_examples(piece, 10)
    assert (first.lineno, first.command, first.needs) == (10, "a --x 1 'b=[{c:#d}]'", ("gpu", "data"))
    assert first.text == "a --x 1 \\\n    'b=[{c:#d}]'   # why; needs: gpu, data"
    assert (second.lineno, second.command, second.needs) == (14, "e '#f'", ())


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A scratch copy of the checkout's layout: this tree's files linked, `.venv` the running venv."""
    here = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if not entry.name.startswith(".") and entry.name not in {"runs", "outputs", "multirun", "wandb",
                                                                 "bench_results", "build"}:
            (here / entry.name).symlink_to(entry)
    (here / ".venv").symlink_to(Path(sys.prefix))
    for name, write in READER_FILES.items():
        write(here / name)
    return here


def _run(example: Example, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"  # the Hub's tasks are skipped, said in one line, whatever the network
    if example.kind == "python":
        argv, stdin = [".venv/bin/python", "-"], example.text
    else:
        argv, stdin = ["bash", "-c", example.text], None
    return subprocess.run(argv, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=600)


_RAN: list[str] = []  # labels of the lines run in this session, in order


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.slow
@pytest.mark.parametrize("example", RUNNABLE, ids=[e.label for e in RUNNABLE])
def test_runnable_line_runs_as_written(example, checkout):
    started, cpu = time.monotonic(), _children_cpu()
    done = _run(example, checkout)
    seconds, cpu = time.monotonic() - started, _children_cpu() - cpu
    _RAN.append(example.label)
    print(f"{example.label} ({seconds:.1f} s, {cpu:.1f} s CPU): {example.command[:100]}")
    output = done.stdout + done.stderr
    expected = 0
    if example.kind == "transcript":
        expected = next((code for start, code in TRANSCRIPT_EXITS.items()
                         if any(s.startswith(start) for s in example.shown_output)), 0)
        missing = [s for s in example.shown_output if s not in output]
        assert not missing, f"{example.label}: `{example.command}` did not print {missing}:\n{output[-3000:]}"
    assert done.returncode == expected, (f"{example.label}: `{example.command}` exited {done.returncode} "
                                         f"(expected {expected}):\n{output[-4000:]}")
    # Exit 0 with a traceback printed is not a line that works.
    assert "Traceback (most recent call last)" not in output, f"{example.label}: a traceback:\n{output[-4000:]}"


# What the README says those lines leave, under runs/ of the checkout they ran in.
LEFT_BY_THE_LINES = [
    "s1/config.yaml", "s1/metrics.jsonl", "s1/summary.json", "s1/report.html", "s1/checkpoints/latest",
    "look/index.html",  # data_pipelines.inspect
    "hf/config.json", "hf/tokenizer_config.json", "hf/generation_config.json",  # native-to-hf
    "hf_vl/config.json", "hf_vl/preprocessor_config.json", "hf_vl/processor_config.json",  # --layout vl
    "stage1_image_sft/plan.json",  # train.plan: the recipe's run.dir
]


@pytest.mark.slow
def test_the_lines_leave_what_the_readme_says(checkout):
    if _RAN != [e.label for e in RUNNABLE]:
        pytest.skip("runs after every runnable line, in one session (not alone or with -k)")
    runs = checkout / "runs"
    missing = [path for path in LEFT_BY_THE_LINES if not (runs / path).exists()]
    assert not missing, missing
    assert json.loads((runs / "s1" / "summary.json").read_text())["steps"] == 2  # trainer.max_steps=2, as it says
    assert len(list((runs / "synth").glob("*.tar"))) >= 1
