"""`python -m launch.slurm` against a real two-node CPU Slurm cluster on this machine
(tests/integration/slurm_cluster.py): a smoke stage completes; a node whose training process dies
ends the two-node job at once, failed and not requeued; a run stopped by each preemption path
(`scancel -s TERM`, `scancel --signal=USR1 --batch`, `scontrol requeue`) is requeued and resumes
with its steps continuing; `--pipeline` runs every stage as one job and resumes the stage it was
preempted in.

Skipped only where Slurm cannot be installed (not root, no apt-get) or its daemons do not start.
A requeued job waits in PENDING (BeginTime) for about two minutes; the tests release it at once.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.helpers import env, read_metrics
from tests.integration.slurm_cluster import ClusterUnavailable, SlurmCluster

pytestmark = pytest.mark.slurm

SMOKE = ["gpus_per_node=0", "smoke=cpu", "logger.progress_bar=false"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster():
    # Not under pytest's tmp dirs: those are 0700 root, and munged (user `munge`) must reach its own.
    root = Path(tempfile.mkdtemp(prefix="hvl-slurm-"))
    root.chmod(0o755)
    try:
        try:
            cluster = SlurmCluster.start(root / "cluster", env())  # jobs inherit it: PYTHONPATH, 1 thread
        except ClusterUnavailable as err:
            pytest.skip(f"no Slurm cluster here: {err}")
        cluster.workdir = root / "work"  # shared by the jobs, so the embedded data is generated once
        cluster.workdir.mkdir()
        try:
            yield cluster
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Job:
    def __init__(self, cluster: SlurmCluster, run_dir: Path, *args: str) -> None:
        self.cluster, self.run_dir = cluster, run_dir
        result = subprocess.run([sys.executable, "-m", "launch.slurm", *args, f"run.dir={run_dir}"],
                                cwd=cluster.workdir, env=cluster.env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        self.id = re.search(r"submitted job (\d+)", result.stdout).group(1)

    def info(self) -> dict:
        return self.cluster.job(self.id)

    def logs(self) -> tuple[str, str]:
        """(.out, .err) of this job: appended to by every start."""
        logs = self.run_dir / "logs"
        return tuple("".join(p.read_text() for p in logs.glob(f"*-{self.id}.{ext}")) for ext in ("out", "err"))

    def wait_for(self, condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                out, err = self.logs()
                raise AssertionError(f"job {self.id}: timed out after {timeout:.0f} s waiting for {what}; "
                                     f"state {self.info()}\n--- out:\n{out[-3000:]}\n--- err:\n{err[-3000:]}")
            time.sleep(0.1)

    def wait_done(self) -> None:
        self.wait_for(lambda: self.info().get("JobState") in ENDED, "the job to end", timeout=240)
        out, err = self.logs()
        assert self.info()["JobState"] == "COMPLETED", f"{self.info()}\n{out[-3000:]}\n{err[-3000:]}"

    def wait_requeued(self, restarts: int) -> None:
        """Until Slurm holds the job as PENDING after its `restarts`-th requeue; then release it."""
        def requeued() -> bool:
            info = self.info()
            if info.get("JobState") in ENDED:
                out, err = self.logs()
                raise AssertionError(f"job {self.id} ended {info['JobState']} instead of being requeued\n"
                                     f"--- out:\n{out[-3000:]}\n--- err:\n{err[-3000:]}")
            return info.get("JobState") == "PENDING" and info.get("Restarts") == str(restarts)

        self.wait_for(requeued, f"requeue {restarts}", timeout=90)
        # slurmd refuses a start within the second its last run was killed ("Job credential revoked");
        # Slurm's own BeginTime delay (about 2 minutes) keeps real jobs clear of that.
        self.wait_for(self.cluster.nodes_idle, "the nodes to be idle again", timeout=60)
        time.sleep(1.5)
        result = self.cluster.call("scontrol", "update", f"JobId={self.id}", "StartTime=now")
        assert result.returncode == 0, result.stderr

    def signal(self, *cmd: str) -> None:
        result = self.cluster.call(*cmd, self.id)
        assert result.returncode == 0, f"{cmd}: {result.stderr}"


def steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run_dir)] if (run_dir / "metrics.jsonl").exists() else []


def assert_quiet(err: str) -> None:
    """Stops leave one-line messages in the .err file, no traceback, no false 'not requeueing'."""
    assert "Traceback" not in err and "SignalException" not in err and "not requeueing" not in err, err[-4000:]


@pytest.mark.timeout(180)
def test_a_cpu_smoke_stage_completes(cluster):
    run_dir = cluster.workdir / "smoke"
    job = Job(cluster, run_dir, "--config-name", "stage1_image_sft", *SMOKE, "procs_per_node=2",
              "trainer.max_steps=3")
    job.wait_done()
    out, err = job.logs()
    assert steps(run_dir) == [1, 2, 3]
    assert "the step finished" in out and (run_dir / "summary.json").exists()
    assert_quiet(err)


def worker(run_dir: Path, rank: int) -> psutil.Process | None:
    """The training process of global rank `rank` (a child of some node's launch.step), once it runs."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (f"run.dir={run_dir}" in (proc.info["cmdline"] or []) and "launch.step" in proc.parent().cmdline()
                    and proc.environ().get("RANK") == str(rank)):
                return proc
        except (psutil.Error, AttributeError):  # gone meanwhile, or no parent
            continue
    return None


@pytest.mark.timeout(180)
def test_a_node_whose_training_process_dies_ends_the_job_at_once(cluster):
    """srun --kill-on-bad-exit=1: rank 1 dies by SIGKILL (as the OOM killer kills) as it starts, so rank
    0 on the other node waits for it to join the process group, as it would for 30 minutes (the
    collective timeout) if srun let it. srun ends that node (SIGTERM, SIGKILL after KillWait) and
    the job fails with the exit code, not requeued."""
    if len(cluster.nodes) < 2:
        pytest.skip("this host is called localhost: no second node name")
    run_dir = cluster.workdir / "crash"
    job = Job(cluster, run_dir, "--config-name", "stage3_text_recovery", *SMOKE, "nodes=2", "trainer.max_steps=3")
    victim = None

    def rank_1_runs() -> bool:
        nonlocal victim
        victim = worker(run_dir, 1)
        return victim is not None

    job.wait_for(rank_1_runs, "rank 1's training process")
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    job.wait_for(lambda: job.info().get("JobState") in ENDED, "the job to end after rank 1 died", timeout=90)
    print(f"the job ended {time.monotonic() - killed:.1f} s after rank 1 died")

    info = job.info()
    out, err = job.logs()
    assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), f"{info}\n{err[-3000:]}"
    assert re.search(r"launch\.step: worker rank 1 exited with code -9; exit 137", err), err[-3000:]
    assert re.search(r"the step failed with exit code \d+.*; not requeueing", err), err[-3000:]
    assert "requeueing job" not in err and "Traceback" not in err and steps(run_dir) == []


PREEMPTIONS = [  # (how, the scancel/scontrol command; job id appended, who requeues)
    ("scancel -s TERM (the step alone, as preemption with a GraceTime)", ["scancel", "-s", "TERM"], "script"),
    ("scancel --signal=USR1 --batch (the time-limit warning)", ["scancel", "--signal=USR1", "--batch"], "script"),
    ("scontrol requeue (step and batch shell get SIGTERM)", ["scontrol", "requeue"], "slurm"),
]


@pytest.mark.timeout(300)
def test_every_preemption_path_requeues_and_resumes(cluster):
    max_steps = 20
    run_dir = cluster.workdir / "long"
    # One node: on two (it passes too) this test takes twice as long on a 2-core machine.
    job = Job(cluster, run_dir, "--config-name", "stage3_text_recovery", *SMOKE, f"trainer.max_steps={max_steps}",
              "trainer.save_every=100")
    saved: list[int] = []
    for restarts, (how, cmd, _) in enumerate(PREEMPTIONS, start=1):
        resumed_at = saved[-1] if saved else 0
        # A step of this start is logged (so the run is past start-up): stop it.
        job.wait_for(lambda after=resumed_at: steps(run_dir)[-1:] > [after], f"a step after {resumed_at}")
        job.signal(*cmd)
        job.wait_requeued(restarts)
        stopped = steps(run_dir)[-1]
        assert stopped < max_steps, f"{how}: the run ended instead of stopping"
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}", how
        saved.append(stopped)
    job.wait_done()

    assert steps(run_dir) == list(range(1, max_steps + 1))  # continued: none repeated, none missing
    out, err = job.logs()
    for step in saved:
        assert f"preempted: saved step {step};" in out and f"at step {step}" in out
    requeues = [f"the step stopped for preemption (saved step {step}); requeueing job {job.id}"
                for step, (_, _, who) in zip(saved, PREEMPTIONS, strict=True) if who == "script"]
    assert all(line in err for line in requeues), err[-4000:]
    assert f"saved step {saved[2]}); Slurm is requeueing job {job.id} itself" in err
    assert_quiet(err)


@pytest.mark.timeout(300)
def test_pipeline_job_resumes_the_stage_it_was_preempted_in(cluster):
    root = cluster.workdir / "pipeline"
    stage = root / "stage2_video_sft"
    # Stage 0 on the random LM: the smoke LM's pre-training (test_smoke_pipeline covers it) is ~20 s
    # this test is not about.
    job = Job(cluster, root, "--pipeline", *SMOKE, "trainer.max_steps=8", "init.embedded_lm=false")
    job.wait_for(lambda: steps(stage), "stage 2's first step", timeout=180)
    job.signal("scancel", "-s", "TERM")
    job.wait_requeued(1)
    stopped = steps(stage)[-1]
    assert stopped < 8
    job.wait_done()

    out, err = job.logs()
    for name in ("stage0_projector_warmup", "stage1_image_sft", "stage2_video_sft", "stage3_text_recovery",
                 "stage4_long_context"):
        assert steps(root / name) == list(range(1, 9)), name
    second_start = out[out.index(f"job {job.id} start 2"):]
    assert "[stage0_projector_warmup] already finished" in second_start
    assert "[stage1_image_sft] already finished" in second_start
    assert f"[stage2_video_sft] resumed from {stage}/checkpoints/step_{stopped:07d} at step {stopped}" in second_start
    assert (root / "summary.json").exists()
    assert_quiet(err)
