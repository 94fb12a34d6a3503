"""A CPU Slurm cluster for tests on this one machine: Debian's munge + slurmctld + one slurmd per
node (22.05), started by hand (no systemd) under a temporary directory, reached through
`SLURM_CONF`. The daemons run in the foreground as our children and are stopped by their pids.

Two nodes by default, both this machine: one named as the host, one `localhost` (a second name
that resolves here, so torchrun's rendezvous reaches whichever is the job's first node), each
its own slurmd (`slurmd -N`) with its own port, spool directory and log.

    cluster = SlurmCluster.start(root)      # raises ClusterUnavailable when it cannot
    subprocess.run(["sbatch", ...], env=cluster.env)
    cluster.stop()
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
PROGRAMS = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue"]
# Every client call is bounded: srun/scontrol against a daemon that is not there wait a long time.
CALL_TIMEOUT_S = 30


class ClusterUnavailable(RuntimeError):
    """The packages cannot be installed or the daemons did not come up (the reason says which)."""


def ensure_installed() -> None:
    """Install the Debian packages when a program is missing (root with apt-get only)."""
    if all(shutil.which(p) for p in PROGRAMS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable(f"Slurm is not installed and this is not root with apt-get to install "
                                 f"{' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # a stale package index: refresh it once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    missing = [p for p in PROGRAMS if not shutil.which(p)]
    if result.returncode != 0 or missing:
        raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed (exit {result.returncode}; "
                                 f"missing {missing}): {result.stderr.strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str, logs: list[Path] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {p.name}:\n{p.read_text()[-1500:]}" for p in logs if p.exists())
            raise ClusterUnavailable(f"timed out after {timeout:.0f} s waiting for {what}{tails}")
        time.sleep(0.2)


@dataclass
class SlurmCluster:
    root: Path
    host: str
    env: dict
    nodes: list[str] = field(default_factory=list)  # node names, the host first
    daemons: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def start(cls, root: Path, env: dict | None = None, nodes: int = 2) -> SlurmCluster:
        """The cluster up and idle; `env` (default: this process's) is what daemons and clients get.
        `nodes`: 1 or 2 (fewer when this host is itself called localhost)."""
        ensure_installed()
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # munged runs as `munge` and must reach its own directory below
        host = socket.gethostname().split(".")[0]
        names = list(dict.fromkeys([host, "localhost"]))[:nodes]
        conf = root / "slurm.conf"
        cluster = cls(root, host, {**(os.environ if env is None else env), "SLURM_CONF": str(conf)}, names)
        try:
            cluster._start_munge()
            conf.write_text(cluster._slurm_conf())
            cluster._spawn(["slurmctld", "-D", "-c", "-f", str(conf)], root / "slurmctld.stdout")
            _wait(lambda: cluster.call("scontrol", "ping").returncode == 0, 30, "slurmctld to answer",
                  [root / "slurmctld.log", root / "slurmctld.stdout"])
            for name in names:
                (root / "spool" / name).mkdir(parents=True, exist_ok=True)
                cluster._spawn(["slurmd", "-D", "-N", name, "-f", str(conf)], root / f"slurmd-{name}.stdout")
            _wait(cluster.nodes_idle, 30, f"nodes {','.join(names)} to become idle",
                  [*(root / f"slurmd-{n}.{ext}" for n in names for ext in ("log", "stdout")), root / "slurmctld.log"])
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _spawn(self, cmd: list[str], stdout: Path, user: str | None = None) -> None:
        as_user = {"user": user, "group": user, "extra_groups": []} if user else {}
        with stdout.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                                    **as_user)
        self.daemons.append(proc)
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ClusterUnavailable(f"{cmd[0]} exited with {proc.returncode}: "
                                     f"{stdout.read_text()[-1500:]}")

    def _start_munge(self) -> None:
        """munged as `munge`, with its key, socket, pid, seed and log in a directory it owns."""
        munge = pwd.getpwnam("munge")
        home = self.root / "munge"
        home.mkdir(mode=0o700, exist_ok=True)
        key = home / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        for path in (home, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self.socket = home / "munge.socket"
        self._spawn(["munged", "--foreground", "--force", f"--socket={self.socket}", f"--key-file={key}",
                     f"--pid-file={home / 'munged.pid'}", f"--seed-file={home / 'munged.seed'}",
                     f"--log-file={home / 'munged.log'}"], self.root / "munged.stdout", user="munge")
        _wait(self.socket.exists, 10, "munged's socket", [self.root / "munged.stdout"])
        # Clients (root) reach the socket through the directory: let them in, keep the key private.
        home.chmod(0o711)

    def _slurm_conf(self) -> str:
        r = self.root
        for sub in ("state", "spool"):
            (r / sub).mkdir(exist_ok=True)
        return "\n".join([
            "ClusterName=hvltest", f"SlurmctldHost={self.host}", "SlurmUser=root",
            f"SlurmctldPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.socket}",
            # %n: each slurmd its own (the node's name).
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "JobRequeue=1", "ReturnToService=2", "MpiDefault=none",
            "SchedulerType=sched/backfill", "KillWait=30", "MinJobAge=600",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            *(f"NodeName={name} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={os.cpu_count()} RealMemory=1000 "
              "State=UNKNOWN" for name in self.nodes),
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def call(self, *cmd: str, timeout: float = CALL_TIMEOUT_S) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]} timed out after {timeout} s")

    def nodes_idle(self) -> bool:
        """Every node idle."""
        out = self.call("sinfo", "-h", "-N", "-o", "%T").stdout.split()
        return out == ["idle"] * len(self.nodes)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, Reason, ...)."""
        out = self.call("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def stop(self) -> None:
        """Cancel what still runs, then end the daemons (newest first) by their pids."""
        if any(d.poll() is None for d in self.daemons[1:]):
            self.call("scancel", "--full", "--user", "root", timeout=10)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.call("squeue", "-h", "-t", "R,CG", timeout=5).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.daemons.clear()
