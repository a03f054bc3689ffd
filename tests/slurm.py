"""A single-node Slurm cluster for the tests: munged, slurmctld and slurmd started from one folder
on 127.0.0.1, stopped by the pids started here (and the job steps of this cluster, found by its
SLURM_CONF).

    c = start(folder)   # -> dict(pids, env={"SLURM_CONF": ...}, conf, base_dir, munge_dir)
    subprocess.run(["sbatch", ...], env={**os.environ, **c["env"]})
    stop(c["pids"], env=c["env"])

Needs Debian's slurmctld, slurmd, slurm-client and munge (./inv installs them when run as root)
and root. Nothing under /etc is read or written: clients find the configuration through
SLURM_CONF.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time

CONF_TEMPLATE = """\
ClusterName={cluster}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
{auth_lines}
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=100
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
DependencyParameters=kill_invalid_depend
ReturnToService=2
SlurmdParameters=config_overrides
MessageTimeout={message_timeout}
KillWait=2
MinJobAge=300
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return f"--- {path}\n" + "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _wait_for(pred, timeout: float, what: str, procs: list, log_files: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                tails = "".join(_tail(f) for f in log_files)
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode} while waiting for {what}\n{tails}")
        if pred():
            return
        time.sleep(0.2)
    tails = "".join(_tail(f) for f in log_files)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{tails}")


def start(
    base_dir: str | None = None,
    auth: str = "munge",  # "munge": a private munged on a private socket; "none": no authentication
    partition: str = "debug",
    cpus: int | None = None,
    mem_mb: int | None = None,
    message_timeout: int = 3,  # clients fail after ~(MessageTimeout-1)s when slurmctld is down
    timeout: float = 30.0,
) -> dict:
    base = os.path.abspath(base_dir or tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    result: dict = {"munge_dir": None}
    for d in ("state", "spool", "log", "run"):
        # wipe state from an earlier run in the same dir (else: "fatal: CLUSTER NAME MISMATCH")
        shutil.rmtree(os.path.join(base, d), ignore_errors=True)
        os.makedirs(os.path.join(base, d))
    cpus = cpus or len(os.sched_getaffinity(0))
    mem_mb = mem_mb or max(2048, _mem_mb() // 2)
    conf = os.path.join(base, "slurm.conf")
    env = {"SLURM_CONF": conf}
    penv = {**os.environ, **env}
    procs: list[subprocess.Popen] = []
    logs = [os.path.join(base, "log", n) for n in ("munged.out", "slurmctld.out", "slurmd.out")]

    def spawn(args, out):
        with open(os.path.join(base, "log", out), "wb") as fh:
            p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                 env=penv, start_new_session=True)  # own process group
        procs.append(p)
        return p

    try:
        if auth == "munge":
            # munged demands that *every* ancestor of its socket is world-executable (mkdtemp and
            # /tmp/pytest-of-root are 0700) and AF_UNIX paths are <108 chars -> own short dir in /tmp
            mdir = result["munge_dir"] = tempfile.mkdtemp(prefix="munge-", dir="/tmp")
            os.chmod(mdir, 0o755)
            sock = os.path.join(mdir, "munge.sock")
            key = os.path.join(mdir, "munge.key")
            with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(secrets.token_bytes(128))
            spawn(["munged", "-F", f"--key-file={key}", f"--socket={sock}",
                   f"--pid-file={mdir}/munged.pid", f"--seed-file={mdir}/munged.seed",
                   f"--log-file={base}/log/munged.log"], "munged.out")
            _wait_for(lambda: os.path.exists(sock), timeout, "munged socket", procs, logs)
            auth_lines = f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={sock}"
        elif auth == "none":
            auth_lines = "AuthType=auth/none\nCredType=cred/none"
        else:
            raise ValueError(auth)

        with open(conf, "w") as f:
            f.write(CONF_TEMPLATE.format(
                cluster="c" + secrets.token_hex(3), ctld_port=_free_port(), slurmd_port=_free_port(),
                auth_lines=auth_lines, base=base, message_timeout=message_timeout,
                cpus=cpus, mem_mb=mem_mb, partition=partition))

        # -D: foreground; -c: clear any previous state (fresh cluster every time)
        spawn(["slurmctld", "-D", "-c", "-f", conf], "slurmctld.out")
        spawn(["slurmd", "-D", "-N", "localhost", "-f", conf], "slurmd.out")

        def node_idle():
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=penv, capture_output=True, text=True)
            return r.returncode == 0 and r.stdout.strip() == "idle"

        logs += [os.path.join(base, "log", n) for n in ("slurmctld.log", "slurmd.log")]
        _wait_for(node_idle, timeout, "node idle in sinfo", procs, logs)
    except BaseException:
        stop([p.pid for p in procs], env=env)
        raise
    result.update(pids=[p.pid for p in procs], env=env, conf=conf, base_dir=base)
    return result


def _children(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                out += kids
                todo += kids
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cluster_orphans(conf: str) -> list[int]:
    """slurmstepd + job processes of *this* cluster. slurmstepd double-forks and setsid()s, so it is
    re-parented to pid 1 and is neither our descendant nor in our process group; it (and every job
    process) inherits SLURM_CONF=<our conf> from slurmd/sbatch, which identifies it."""
    me, out = os.getpid(), []
    needle = f"SLURM_CONF={conf}".encode()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                envb = f.read().split(b"\0")
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if needle in envb and (cmd.startswith(b"slurmstepd") or any(x.startswith(b"SLURM_JOB_ID=") for x in envb)):
            out.append(int(d))
    return out


def stop(pids: list[int], env: dict | None = None, timeout: float = 5.0) -> None:
    """scancel + wait for jobs to drain, then SIGTERM -> SIGKILL the daemons we started, their
    descendants/process groups, and the re-parented slurmstepd/job processes of this cluster."""
    conf = (env or {}).get("SLURM_CONF")
    if conf and os.path.exists(conf):  # (a missing SLURM_CONF makes clients retry for 60 s)
        cenv = {**os.environ, **env}
        try:
            subprocess.run(["scancel", "--full", "-u", "root"], env=cenv, capture_output=True, timeout=timeout)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:  # until nothing is pending/running/completing
                r = subprocess.run(["squeue", "-h", "-o", "%i"], env=cenv, capture_output=True, timeout=timeout)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.2)
        except (OSError, subprocess.TimeoutExpired):
            pass
    targets = set(pids)
    for p in pids:
        targets.update(_children(p))
    if conf:
        targets.update(_cluster_orphans(conf))
    for sig in (signal.SIGTERM, signal.SIGKILL):  # slurmstepd ignores SIGTERM -> SIGKILL needed
        for p in list(targets):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        for pg in pids:  # each daemon is its own process-group leader
            try:
                os.killpg(pg, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 2)
        while time.monotonic() < deadline and any(_alive(p) for p in targets):
            time.sleep(0.1)
        if not any(_alive(p) for p in targets):
            break
    for p in pids:  # reap our direct children (orphaned stepds are reaped by pid 1)
        try:
            os.waitpid(p, 0)
        except ChildProcessError:
            pass

