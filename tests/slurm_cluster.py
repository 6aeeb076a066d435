"""A throw-away single-node Slurm cluster (munge + slurmctld + slurmd) for tests, as root.

slurm.conf is generated from this host's name at run time; the daemons are stopped by PID.
Settings follow shared/reference/slurm_local_cluster.md: linuxproc process tracking (cgroups
are not available), cred_expire=5 and sched_interval=1 so a requeued job restarts in seconds.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def ensure_packages() -> str | None:
    """Install the Debian packages if missing; returns a reason string when that is impossible."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch")) and Path("/usr/sbin/munged").exists():
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return f"could not install {' '.join(PACKAGES)}: {proc.stderr.strip().splitlines()[-1:]}"
    return None


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.pids: list[int] = []

    def write_conf(self) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 2
        r = self.root
        self.conf.write_text(f"""ClusterName=d2v2test
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1
MinJobAge=300
KillWait=10
NodeName={self.host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> None:
        self.write_conf()
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        time.sleep(0.5)
        self.pids += [int(p) for p in subprocess.run(["pgrep", "-u", "munge", "munged"], capture_output=True,
                                                      text=True).stdout.split()]
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf)], check=True, env=self.env)
        for name in ("slurmctld.pid", "slurmd.pid"):
            for _ in range(50):
                if (self.root / name).exists() and (self.root / name).read_text().strip():
                    break
                time.sleep(0.1)
            self.pids.append(int((self.root / name).read_text()))
        deadline = time.time() + 30
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the local Slurm node did not become idle (sinfo: {state!r})")

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(1)

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True, **kw)

    def submit(self, script: str, *options: str, env: dict | None = None, cwd: Path | None = None) -> int:
        proc = self.run("sbatch", "--parsable", *options, script, env=env or {}, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        out = self.run("scontrol", "show", "job", str(job_id)).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: int, states: tuple[str, ...], timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {info.get('JobState')} {info.get('Reason')}")
