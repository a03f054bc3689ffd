"""A Ray cluster of two nodes on this machine (head and worker, one CPU each), for the tests:

    unshare --net -- sh -c 'ip link set lo up && exec "$0" "$@"' python tests/raycluster.py OUT.json CMDS.json

starts the cluster, runs each command of CMDS.json (argv lists; ``{address}`` becomes the head's
HOST:PORT) while sampling which node's session runs datatrove's tasks (``ray::RankWorker``
processes), stops the cluster by the pids it started, and writes what happened to OUT.json.

Ray advertises the host's routable address even when told 127.0.0.1, and its servers listen on
every interface; run in a network namespace of its own (``unshare --net``, root), the only
interface is the loopback, so nothing the test starts can be reached from outside.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
PROBE_S = 60.0  # one probe driver's ray.init and question
COMMAND_S = 300.0  # one `./inv data` on the cluster: the demo's curation takes about 25 s


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _node_flags(ports: list[int]) -> list[str]:
    nm, om, agent_http, agent_grpc, renv, metrics = ports
    return ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--memory=2000000000",
            "--object-store-memory=100000000", f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={renv}", f"--metrics-export-port={metrics}",
            "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats", "--block"]


def start(temp_dir: str, timeout: float = 120.0) -> tuple[list[subprocess.Popen], str]:
    """Head and one worker node, each ``ray start --block`` in its own session (its pid is the
    session's id, which holds the node's daemons and workers); returns once both are alive."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": os.path.join(temp_dir, "tmp")}
    os.makedirs(env["TMPDIR"], exist_ok=True)
    gcs, *head = free_ports(7)
    address = f"127.0.0.1:{gcs}"
    procs = []

    def node(args: list[str], log: str) -> None:
        procs.append(subprocess.Popen([RAY, "start", *args], env=env, start_new_session=True,
                                      stdin=subprocess.DEVNULL, stdout=open(os.path.join(temp_dir, log), "wb"),
                                      stderr=subprocess.STDOUT))

    node(["--head", f"--port={gcs}", "--include-dashboard=false", f"--temp-dir={temp_dir}", *_node_flags(head)],
         "head.out")
    deadline = time.monotonic() + timeout
    try:
        while not _open(gcs):
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the head did not start: {Path(temp_dir, 'head.out').read_text()[-2000:]}")
            time.sleep(0.2)
        node([f"--address={address}", f"--temp-dir={temp_dir}", *_node_flags(free_ports(6))], "worker.out")
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        while True:
            said = _probe(probe, address, env)
            if said == "2":
                return procs, address
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"the cluster did not come up: {said[-2000:]}\n{logs(temp_dir)}")
            time.sleep(0.5)
    except BaseException:
        stop(procs)
        raise


def _probe(code: str, address: str, env: dict, seconds: float = PROBE_S) -> str:
    """What a short-lived driver prints (its last line), or why it said nothing. Bounded: a
    driver's ``ray.init`` can wait minutes for a node that never registers."""
    try:
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, env=env,
                             timeout=seconds)
    except subprocess.TimeoutExpired:
        return f"(no answer within {seconds:.0f} s)"
    lines = out.stdout.strip().splitlines()
    return lines[-1] if out.returncode == 0 and lines else out.stderr.strip()[-2000:]


STATE = """
import json, sys, ray
from ray.util import placement_group_table
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps({"nodes": [{"alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()],
                  "available": ray.available_resources(),
                  "placement_groups": sorted(g["state"] for g in placement_group_table().values())}))
"""


def logs(temp_dir: str, lines: int = 15) -> str:
    """The last lines of each node's raylet and the head's GCS log: where a node says why it
    stopped scheduling."""
    out = []
    for f in sorted(Path(temp_dir).glob("session_*/logs/*")):
        if f.name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err") and f.stat().st_size:
            out.append(f"--- {f.parent.parent.name}/{f.name}\n" + "\n".join(
                f.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


def processes(procs: list[subprocess.Popen]) -> str:
    """Each process of the nodes' sessions: pid, parent, state, what the kernel has it wait in
    (wchan) and its command line; a task's child stuck on a lock shows as S in futex_wait."""
    out = []
    for p in procs:
        for pid in sorted(_group(p.pid)):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                wchan = Path(f"/proc/{pid}/wchan").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out.append(f"{pid} {fields[1]} {fields[0]} {wchan or '-'} {cmd[:120]}")
    return "\n".join(out)


def _group(sid: int) -> list[int]:
    """The live processes of session ``sid`` (a node's ``ray start`` and everything under it: Ray
    puts its workers in process groups of their own, not sessions)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(d))
    return out


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> list[int]:
    """SIGTERM each node's ``ray start`` (worker first), which stops its own daemons; SIGKILL its
    session's leftovers. Returns the processes still alive afterwards (none)."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(_group(p.pid) for p in procs):
        time.sleep(0.05)
    for p in procs:
        for pid in _group(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(0.2)
    return [pid for p in procs for pid in _group(p.pid)]


def _task_nodes(procs: list[subprocess.Popen], seen: set[int], done: threading.Event,
                pools: set[str] | None = None) -> None:
    """Which nodes (by the session of their ``ray start``) run a datatrove task; ``pools``: how
    the task's pool started its children ("spawn": a fresh interpreter, "fork": a copy of the
    Ray worker, which keeps its ``ray::`` name)."""
    groups = {p.pid for p in procs}
    pools = set() if pools is None else pools
    workers: set[str] = set()
    while not done.is_set():
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) not in groups:
                continue
            if cmd.startswith(b"ray::RankWorker"):
                seen.add(int(fields[3]))
                if fields[1] in workers:  # a child of a RankWorker that kept its name: forked
                    pools.add("fork")
                workers.add(d)
            elif b"multiprocess.spawn" in cmd:
                pools.add("spawn")
        done.wait(0.05)


def main(out: str, commands: str) -> None:
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 108 bytes
    t = time.monotonic()
    try:
        procs, address = start(temp_dir)
        retried = None
    except RuntimeError as e:  # the test's own cluster, not the stage under test: one fresh start
        retried = str(e)[-4000:]
        shutil.rmtree(temp_dir, ignore_errors=True)
        temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
        procs, address = start(temp_dir)
    result: dict = {"start_s": round(time.monotonic() - t, 1), "start_retried": retried, "runs": [],
                    "address": address, "nodes": [p.pid for p in procs]}
    try:
        for argv in json.loads(Path(commands).read_text()):
            seen: set[int] = set()
            pools: set[str] = set()
            done = threading.Event()
            watch = threading.Thread(target=_task_nodes, args=(procs, seen, done, pools), daemon=True)
            watch.start()
            t = time.monotonic()
            # PYTHONFAULTHANDLER: a command stopped with SIGABRT after COMMAND_S prints every
            # thread's stack, which says where it waited
            run = subprocess.Popen([a.replace("{address}", address) for a in argv], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True,
                                   env={**os.environ, "PYTHONFAULTHANDLER": "1"})
            stalled = None
            try:
                stdout, stderr = run.communicate(timeout=COMMAND_S)
            except subprocess.TimeoutExpired:
                stalled = {"state": _probe(STATE, address, {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}),
                           "ray_logs": logs(temp_dir), "processes": processes(procs)}
                os.kill(run.pid, signal.SIGABRT)
                try:
                    stdout, stderr = run.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(run.pid, signal.SIGKILL)
                    stdout, stderr = run.communicate()
            if run.poll() is not None:
                try:
                    os.killpg(run.pid, signal.SIGKILL)  # what the command left in its session
                except ProcessLookupError:
                    pass
            done.set()
            watch.join()
            result["runs"].append({"rc": run.returncode, "stdout": stdout[-4000:],
                                   "stderr": stderr[-(20000 if stalled else 4000):], "stalled": stalled,
                                   "seconds": round(time.monotonic() - t, 1), "task_nodes": sorted(seen),
                                   "pools": sorted(pools)})
            if stalled:
                break
    finally:
        t = time.monotonic()
        result["left"] = stop(procs)
        result["stop_s"] = round(time.monotonic() - t, 1)
        shutil.rmtree(temp_dir, ignore_errors=True)
        Path(out).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
