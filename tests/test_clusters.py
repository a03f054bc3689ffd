"""Curation on real clusters started on this machine: a Ray cluster of two nodes (head and
worker, one CPU each) and a single-node Slurm cluster (munged, slurmctld, slurmd), all bound to
127.0.0.1 and stopped by the pids the tests started. `./inv data --executor ray|slurm` must
write the same cpt.jsonl, sft.jsonl and report.json bytes as the local executor, and fail in one
line when the cluster cannot be reached or a task fails."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, demo_release
from release import pipeline

INVOKE = str(Path(sys.executable).with_name("invoke"))
OUTPUTS = ("cpt.jsonl", "sft.jsonl", "report.json")


def _digests(s) -> dict[str, str]:
    folder = pipeline.folder(s, "data")
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in OUTPUTS}


@pytest.fixture(scope="module")
def local_data(tmp_path_factory, tiny_model):
    """The demo curated by the local executor: what every cluster must reproduce."""
    from release import spec

    s = spec.load(demo_release(tmp_path_factory.mktemp("curate-local"), tiny_model))
    assert pipeline.run_one(s, "data", progress=False).built
    return s


def _release(folder: Path, tiny_model: Path, text: str | None = None):
    from release import spec

    return spec.load(demo_release(folder, tiny_model, text))


def _data(s, *options: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([INVOKE, "data", "--spec", str(s.path), *options], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


# --- Slurm ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    import slurm as cluster

    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")):
        pytest.skip("needs root and Debian's slurmctld, slurmd, slurm-client and munge (./inv installs them as root)")
    c = cluster.start(str(tmp_path_factory.mktemp("slurm")))
    try:
        yield c
    finally:
        cluster.stop(c["pids"], env=c["env"])
        if c["munge_dir"]:
            shutil.rmtree(c["munge_dir"], ignore_errors=True)
    assert not cluster._cluster_orphans(c["conf"])


@pytest.mark.slow  # about a minute with its cluster: the default suite keeps within its 20 minutes
def test_curation_on_slurm_gives_the_local_bytes(local_data, slurm, tmp_path, tiny_model):
    """`./inv data --executor slurm --partition debug`: every job of the plan is a Slurm job
    array, each after the one before; the stage waits for them and writes the local executor's
    bytes."""
    s = _release(tmp_path, tiny_model)
    done = _data(s, "--executor", "slurm", "--partition", "debug", env=slurm["env"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _digests(s) == _digests(local_data)
    jobs = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True,
                          env={**os.environ, **slurm["env"]}).stdout
    names = re.findall(r"JobName=curate-(\w+) .*?JobState=(\w+)", jobs)
    assert {n for n, _ in names} >= {"clean", "exact", "minhash", "buckets", "verify", "cluster", "keep", "assemble"}
    assert {state for _, state in names} == {"COMPLETED"}, names
    m = json.loads((pipeline.folder(s, "data") / "manifest.json").read_text())
    assert m["figures"]["executor"] == "slurm"


@pytest.mark.slow
def test_slurm_failures_are_one_line_each(slurm, tmp_path, tiny_model):
    """A task that fails (bad input, refused) stops the stage naming the task and its log, and
    cancels the jobs after it; a controller that does not answer and a partition that does not
    exist are refused before anything is submitted."""
    s = _release(tmp_path / "bad", tiny_model)  # the demo refuses bad input (data.on_bad_data)
    corpus = tmp_path / "bad" / "specs" / "demo" / "urdu.jsonl"
    corpus.write_bytes(corpus.read_bytes() + b'{"text": \n')
    failed = _data(s, "--executor", "slurm", "--partition", "debug", env=slurm["env"])
    line = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(line) == 1, failed.stderr
    assert re.fullmatch(r"error: data: task 0 of job 'clean' did not complete on Slurm partition debug; its log: "
                        r"\S+/logs/clean/logs/task_00000\.log; fix what it says and run the same command again "
                        r"\(finished tasks are kept\)", line[0]), line[0]
    log = Path(line[0].split("its log: ")[1].split(";")[0])
    assert "not valid JSON" in log.read_text(encoding="utf-8")
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env={**os.environ, **slurm["env"]})
    assert queue.stdout.strip() == ""  # the dependent jobs were cancelled, not left pending

    ok = _release(tmp_path / "ok", tiny_model)
    wrong = _data(ok, "--executor", "slurm", "--partition", "gpu", env=slurm["env"])
    assert wrong.returncode == 2 and wrong.stderr.strip() == ("error: --partition gpu: no such Slurm partition "
                                                              "(there are: debug)"), wrong.stderr
    conf = tmp_path / "elsewhere.conf"
    text = Path(slurm["conf"]).read_text()
    conf.write_text(re.sub(r"SlurmctldPort=\d+", f"SlurmctldPort={_closed_port()}", text))
    down = _data(ok, "--executor", "slurm", "--partition", "debug", env={"SLURM_CONF": str(conf)})
    assert down.returncode == 2 and down.stderr.startswith(
        "error: --executor slurm: the Slurm controller does not answer (Slurmctld(primary) at "), down.stderr
    assert len(down.stderr.strip().splitlines()) == 1 and not pipeline.folder(ok, "data").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Ray --------------------------------------------------------------------------------------


def _on_ray(tmp_path: Path, commands: list[list[str]]) -> dict:
    """``commands`` run beside a two-node Ray cluster in a network namespace of their own
    (tests/raycluster.py); what each did, and on which nodes datatrove's tasks ran."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip: the Ray cluster runs in a network namespace of its own")
    pytest.importorskip("ray")
    out, cmds = tmp_path / "ray.json", tmp_path / "commands.json"
    cmds.write_text(json.dumps(commands), encoding="utf-8")
    subprocess.run(["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
                    str(ROOT / "tests" / "raycluster.py"), str(out), str(cmds)], check=True, timeout=900)
    return json.loads(out.read_text(encoding="utf-8"))


def _stalled(run: dict, folder: Path) -> str:
    tasks = sorted(folder.rglob("logs/task_*.log"), key=lambda f: f.stat().st_mtime)[-3:]
    return (f"`./inv data` did not end within {run['seconds']} s on the Ray cluster; the cluster: "
            f"{run['stalled']['state']}\nits processes (pid ppid state wchan command):\n"
            f"{run['stalled']['processes']}\n{run['stalled']['ray_logs']}\nthe newest task logs:\n"
            + "\n".join(f"--- {f}\n{f.read_text(errors='replace')[-1500:]}" for f in tasks)
            + f"\nthe command's threads (SIGABRT):\n{run['stderr']}")


def test_curation_on_a_two_node_ray_cluster_gives_the_local_bytes(local_data, tmp_path, tiny_model):
    """`./inv data --executor ray --address HOST:PORT` on a Ray cluster of two nodes (one CPU
    each): datatrove's tasks run on both nodes, the outputs are the local executor's bytes, and
    the cluster stops with nothing left. A task that fails (bad input, refused) stops the stage in
    one line naming the task and its log, instead of datatrove's logged warning."""
    s = _release(tmp_path / "ok", tiny_model)
    bad = _release(tmp_path / "bad", tiny_model)
    corpus = tmp_path / "bad" / "specs" / "demo" / "urdu.jsonl"
    corpus.write_bytes(corpus.read_bytes() + b'{"text": \n')
    ran = _on_ray(tmp_path, [[INVOKE, "data", "--spec", str(x.path), "--executor", "ray", "--address", "{address}"]
                             for x in (s, bad)])
    for run in ran["runs"]:
        assert not run["stalled"], _stalled(run, tmp_path)
    ok, failed = ran["runs"]
    assert ok["rc"] == 0, ok["stdout"][-3000:] + ok["stderr"][-3000:]
    assert _digests(s) == _digests(local_data)
    assert sorted(ok["task_nodes"]) == sorted(ran["nodes"])  # tasks ran on the head and on the worker
    assert ok["pools"] == ["spawn"]  # a task's pool spawns its children; none is a fork of a Ray worker
    m = json.loads((pipeline.folder(s, "data") / "manifest.json").read_text())
    assert m["figures"]["executor"] == "ray"
    line = failed["stderr"].strip().splitlines()
    assert failed["rc"] == 2 and len(line) == 1, failed["stderr"]
    assert re.fullmatch(rf"error: data: task 0 of job 'clean' did not complete on the Ray cluster at "
                        rf"{re.escape(ran['address'])}; its log: \S+/logs/clean/logs/task_00000\.log; fix what it "
                        r"says and run the same command again \(finished tasks are kept\)", line[0]), line[0]
    assert "not valid JSON" in Path(line[0].split("its log: ")[1].split(";")[0]).read_text(encoding="utf-8")
    assert ran["left"] == []


def test_an_unreachable_ray_cluster_is_one_line(tmp_path, tiny_model):
    s = _release(tmp_path, tiny_model)
    port = _closed_port()
    done = _data(s, "--executor", "ray", "--address", f"127.0.0.1:{port}")
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: --address 127.0.0.1:{port}: no Ray cluster answers there (Connection refused); start one with "
        "`ray start --head`, or give the address it printed"), done.stderr
    missing = _data(s, "--executor", "ray")
    assert missing.returncode == 2 and missing.stderr.startswith("error: --executor ray: give the cluster's head with "
                                                                 "--address HOST:PORT"), missing.stderr
