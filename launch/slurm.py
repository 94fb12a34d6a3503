"""`python -m launch.slurm --config-name <recipe> nodes=N gpus_per_node=G [slurm keys] [overrides] [--dry-run]`

Renders an sbatch script that runs one stage (or `--pipeline`: all stages) under
`srun` + torchrun on N nodes x G GPUs, requeues itself when stopped for preemption or an
upcoming time limit, and submits it with `sbatch` when that is on PATH.

Slurm keys (everything else of the form `a.b=c` is a Hydra override, passed through verbatim):
  nodes=N (1)  gpus_per_node=G (8; 0 = a CPU job, no GPU request)
  procs_per_node=P (training processes per node; default G, or 1 when G=0)
  partition=P  account=A  qos=Q  time=T (e.g. 4:00:00, 2-00:00:00)
  job_name=NAME (hvl-<recipe>)  cpus_per_task=C (default: procs_per_node x (1 + data.num_workers))
  mem=M (e.g. 500G, 0 = all)  exclusive=true
  container_image=IMG (pyxis: run the step in that image, with `python` from its PATH)
  extra_sbatch=OPTION (one more `#SBATCH OPTION` line; repeat it, or extra_sbatch=[--a=1,--b=2])

The config is composed and validated first (a bad recipe or override fails here, before any
script exists); `--dry-run` validates all but whether data and checkpoint paths exist (they may
exist only on the cluster); `--no-validate` only composes it.
Logs go to <run.dir>/logs/<job name>-<job id>.out/.err (appended to across requeues). A run that
stops for preemption with its state saved writes <run.dir>/logs/.preempted-<job id> ($HVL_PREEMPTED_FILE,
removed at each start), whichever way Slurm signalled it, and its step exits 0; the script then
requeues the job, unless Slurm is requeueing or cancelling it itself. The step runs under
`srun --kill-on-bad-exit=1 python -m launch.step` (torchrun): a node that fails ends the others at
once, and the job fails without a requeue.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch.torchrun import train_module_args

TEMPLATE = Path(__file__).resolve().parent / "templates" / "sbatch.sh"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The trainer's exit code after saving on SIGUSR1/SIGTERM: train.loop.preemption.EXIT_PREEMPTED (a test
# holds them equal); a literal keeps torch out of the launcher's imports.
EXIT_PREEMPTED = 75
# Warning ahead of the time limit; also how long torchrun lets its workers save before SIGKILL.
SIGNAL_LEAD_S = 300

_WORD = re.compile(r"^[\w.,:+@-]+$")  # partition, account, qos, job name: no spaces, quotes or slashes
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
_MEM = re.compile(r"^\d+[KMGTkmgt]?$")
# #SBATCH lines are not shell-parsed the way the body is; keep paths free of what would need quoting
# there, and of `%`, which Slurm expands in log file names.
_UNSAFE_PATH = re.compile(r"[\s'\"\\%]")


class LaunchError(ValueError):
    """A launcher argument is wrong; the message says which and what to set."""


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    procs_per_node: int | None = None  # torchrun --nproc-per-node; None: gpus_per_node (1 when that is 0)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    job_name: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    exclusive: bool = False
    container_image: str | None = None
    extra_sbatch: list[str] = field(default_factory=list)


LAUNCHER_KEYS = frozenset(f.name for f in dataclasses.fields(SlurmOptions))


@dataclass
class LaunchSpec:
    """What the job runs: `-m train --config-name <recipe>` or `-m train.pipeline`, with overrides."""

    config_name: str | None
    overrides: list[str]
    pipeline: bool = False

    @property
    def title(self) -> str:
        return "pipeline" if self.pipeline else str(self.config_name)


def split_launcher_args(args: list[str]) -> tuple[SlurmOptions, list[str]]:
    """(slurm options, Hydra overrides in their original order) from `key=value` arguments."""
    opts = SlurmOptions()
    overrides = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if arg.startswith("-"):
            raise LaunchError(f"unknown option {arg}")
        if not sep or key not in LAUNCHER_KEYS:
            overrides.append(arg)
            continue
        if key == "extra_sbatch":
            opts.extra_sbatch += _parse_extra_sbatch(value)
        else:
            setattr(opts, key, _parse_value(key, value))
    return opts, overrides


def _parse_value(key: str, value: str) -> object:
    if key == "gpus_per_node":
        if not value.isdigit():
            raise LaunchError(f"{key}={value!r}: set a whole number (0 for a CPU job)")
        return int(value)
    if key in ("nodes", "procs_per_node", "cpus_per_task"):
        if not value.isdigit() or int(value) < 1:
            raise LaunchError(f"{key}={value!r}: set a whole number >= 1")
        return int(value)
    if key == "exclusive":
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise LaunchError(f"exclusive={value!r}: set true or false")
        return value.lower() in ("true", "1", "yes")
    if key == "time":
        if _time_seconds(value) <= SIGNAL_LEAD_S:
            raise LaunchError(f"time={value!r} must be longer than the {SIGNAL_LEAD_S} s preemption warning")
        return value
    if key == "mem" and not _MEM.match(value):
        raise LaunchError(f"mem={value!r}: set a size such as 500G (or 0 for all of a node's memory)")
    if key == "container_image" and (not value or re.search(r"\s", value)):
        raise LaunchError(f"container_image={value!r}: set an image name without spaces")
    if key in ("partition", "account", "qos", "job_name") and not _WORD.match(value):
        raise LaunchError(f"{key}={value!r}: use letters, digits and . , : + @ - only")
    return value


def _time_seconds(value: str) -> int:
    """Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    match = _TIME.match(value)
    if not match:
        raise LaunchError(f"time={value!r}: use minutes, H:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    return a * 60 + (b or 0)  # M or M:S


def _parse_extra_sbatch(value: str) -> list[str]:
    # A bracketed value is a list split on commas; a bare one is a single option, commas and all.
    items = value[1:-1].split(",") if value.startswith("[") and value.endswith("]") else [value]
    items = [item.strip() for item in items if item.strip()]
    for item in items:
        if not item.startswith("-") or "\n" in item:
            raise LaunchError(f"extra_sbatch item {item!r}: give an sbatch option such as --constraint=h100")
    return items


def resolve_run_dir(spec: LaunchSpec, validate: bool, check_paths: bool = True) -> tuple[Path, int]:
    """Compose (and unless told otherwise validate) the config; returns the absolute run dir and
    the most decode workers (`data.num_workers`) any of its stages asks for per process.
    `check_paths=False` (a dry run) validates all but the existence of data and checkpoint paths,
    which may exist only on the cluster. Raises train.config.ConfigError naming the bad recipe or
    override."""
    from train.config.compose import compose_raw, load_config
    from train.loop.pipeline import parse_pipeline_args

    def compose(name: str, overrides: list[str]) -> tuple[str, int]:
        if validate:
            cfg = load_config(name, overrides, check_paths)
            return cfg.run.dir, cfg.data.num_workers
        raw = compose_raw(name, overrides)
        return raw["run"]["dir"], int(raw["data"].get("num_workers") or 0)

    if spec.pipeline:
        stages, root, overrides = parse_pipeline_args(spec.overrides)
        workers = max(compose(name, overrides + [f"run.dir={root / name}"])[1] for name in stages)
        return Path(os.path.abspath(root)), workers
    run_dir, workers = compose(spec.config_name, spec.overrides)
    return Path(os.path.abspath(run_dir)), workers


def default_cpus_per_task(procs_per_node: int, num_workers: int) -> int:
    """One core per training process and one per decode worker it starts: where Slurm has no default
    CPUs per GPU, a task without --cpus-per-task gets one core for all of them."""
    return procs_per_node * (1 + num_workers)


def with_run_dir(overrides: list[str], run_dir: Path) -> list[str]:
    """The overrides with run.dir made absolute (in place, or appended); the rest stay verbatim."""
    is_run_dir = [o.partition("=")[0].lstrip("+") == "run.dir" for o in overrides]
    pinned = f"run.dir={run_dir}"
    if not any(is_run_dir):
        return [*overrides, pinned]
    return [pinned if hit else o for o, hit in zip(overrides, is_run_dir)]


def _outermost(paths: list[Path]) -> list[Path]:
    """The distinct paths not inside another one of them (one container mount covers those)."""
    unique = sorted(set(paths))
    return [p for p in unique if not any(p != q and p.is_relative_to(q) for q in unique)]


class _Template(string.Template):
    delimiter = "@@"  # bash owns `$`


def render_sbatch(opts: SlurmOptions, spec: LaunchSpec, run_dir: Path, workdir: Path | None = None,
                  python: str = sys.executable) -> str:
    """The sbatch script; `run_dir` absolute, `workdir` (default: the current directory) is where
    the job runs, so relative paths in the overrides mean what they meant at submission."""
    workdir = Path(os.path.abspath(workdir or os.getcwd()))
    for name, path in (("run.dir", run_dir), ("working directory", workdir)):
        if not path.is_absolute() or _UNSAFE_PATH.search(str(path)):
            raise LaunchError(f"{name} {str(path)!r} must be an absolute path without spaces, quotes, \\ or %")
    job_name = opts.job_name or f"hvl-{spec.title}"
    procs = opts.procs_per_node or opts.gpus_per_node or 1
    sbatch = [f"--job-name={job_name}", f"--nodes={opts.nodes}", "--ntasks-per-node=1"]
    # No GPU request at all for a CPU job: a cluster without GPU GRES refuses even --gpus-per-node=0.
    sbatch += [f"--gpus-per-node={opts.gpus_per_node}"] if opts.gpus_per_node else []
    sbatch += [f"--{key.replace('_', '-')}={getattr(opts, key)}"
               for key in ("cpus_per_task", "mem", "time", "partition", "account", "qos") if getattr(opts, key)]
    sbatch += ["--exclusive"] if opts.exclusive else []
    sbatch += [f"--chdir={workdir}", f"--output={run_dir}/logs/%x-%j.out", f"--error={run_dir}/logs/%x-%j.err",
               "--open-mode=append", "--requeue", f"--signal=B:USR1@{SIGNAL_LEAD_S}", *opts.extra_sbatch]

    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from the allocation.
    srun = [f"--cpus-per-task={opts.cpus_per_task}"] if opts.cpus_per_task else []
    if opts.container_image:
        mounts = ",".join(f"{p}:{p}" for p in _outermost([PROJECT_ROOT, workdir, run_dir]))
        srun += [f"--container-image={opts.container_image}", f"--container-mounts={mounts}",
                 f"--container-workdir={workdir}"]
        python = "python"
    module_args = train_module_args(spec.config_name, [], spec.pipeline)
    overrides = with_run_dir(spec.overrides, run_dir)
    return _Template(TEMPLATE.read_text()).substitute(
        title=f"hybrid-vl-sft: {spec.title} on {opts.nodes} node(s) x {procs} process(es), "
              + (f"{opts.gpus_per_node} GPU(s) per node" if opts.gpus_per_node else "CPU only"),
        sbatch_lines="\n".join(f"#SBATCH {line}" for line in sbatch),
        signal_lead_s=SIGNAL_LEAD_S,
        exit_preempted=EXIT_PREEMPTED,
        run_dir=shlex.quote(str(run_dir)),
        project_root=shlex.quote(str(PROJECT_ROOT)),
        srun_options="".join(f"  {shlex.quote(s)} \\\n" for s in srun),
        python=shlex.quote(python),
        procs_per_node=procs,
        train_command=" ".join(shlex.quote(a) for a in module_args),
        overrides="".join(f" \\\n    {shlex.quote(o)}" for o in overrides),
    )


def submit(script: str, script_path: Path | None, run_dir: Path) -> int:
    """sbatch the script (the file when written, else on stdin); returns sbatch's exit code."""
    # Slurm does not create the directory of --output; a job whose log dir is missing fails silently.
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable"] + ([str(script_path)] if script_path else [])
    result = subprocess.run(cmd, input=None if script_path else script, text=True, capture_output=True)
    sys.stderr.write(result.stderr)
    if result.returncode == 0:
        job_id = result.stdout.strip().split(";")[0]
        print(f"submitted job {job_id}; logs: {run_dir}/logs/*-{job_id}.out")
    else:
        print(f"sbatch failed with exit code {result.returncode}", file=sys.stderr)
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", "-cn", help="recipe to run (one of recipes/stage*.yaml)")
    parser.add_argument("--pipeline", action="store_true", help="run all stages (train.pipeline) instead of one")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the script; do not submit it (data paths are not checked: they may exist "
                             "only on the cluster)")
    parser.add_argument("--out", type=Path, help="also write the script to this file (and submit that file)")
    parser.add_argument("--no-validate", action="store_true",
                        help="compose the config but skip validation (e.g. data paths not mounted here)")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.pipeline == bool(args.config_name):
            raise LaunchError("give --config-name <recipe> for one stage, or --pipeline for all stages "
                              "(choose stages with stages=[...])")
        opts, overrides = split_launcher_args(rest)
    except LaunchError as err:
        parser.error(str(err))
    spec = LaunchSpec(args.config_name, overrides, args.pipeline)

    from train.config.schema import ConfigError

    try:
        run_dir, num_workers = resolve_run_dir(spec, validate=not args.no_validate, check_paths=not args.dry_run)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        if opts.cpus_per_task is None:
            procs = opts.procs_per_node or opts.gpus_per_node or 1
            opts = dataclasses.replace(opts, cpus_per_task=default_cpus_per_task(procs, num_workers))
        script = render_sbatch(opts, spec, run_dir)
    except LaunchError as err:
        parser.error(str(err))

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(script)
        args.out.chmod(0o755)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        print(script, end="")
        return 0
    if shutil.which("sbatch") is None:
        print(script, end="")
        where = f"written to {args.out}" if args.out else "printed above"
        print(f"sbatch is not on PATH, so nothing was submitted (the script is {where}); "
              "run this on a Slurm login node, or save it with --out FILE and submit it there with `sbatch FILE`",
              file=sys.stderr)
        return 1
    return submit(script, args.out, run_dir)


if __name__ == "__main__":
    sys.exit(main())
