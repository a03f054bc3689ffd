"""The faults a release meets, each run on the demo through the commands a user types: a second
writer on the same build folder, a disk that fills mid-stage, state left damaged by hand or by a
dead run, and a Hub that fails mid-push. Interrupts (Ctrl-C, SIGTERM, SIGKILL in every stage)
are in tests/test_pipeline.py, whose kill test stops each stage in turn.

Every case ends the same way: the user saw one line, nothing built was lost or changed, and the
same command finished the job with artifacts byte-identical to an uninterrupted run's."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import linked_copy, release_cmd
from release import lock, pipeline, publish
from release.artifacts import MANIFEST, check_outputs, read_manifest, sha256_file
from release.spec import load

# Files whose content records how long things took; everything else must be byte-identical.
TIMED = {"verify/verification.json", "cpt/train.log", "sft/train.log", "data/report.json"}


def artifacts(build: Path, stages: list[str] | None = None) -> dict[str, str]:
    """sha256 of every file the stages' manifests list (all stages but publish by default)."""
    out = {}
    for d in sorted(p for p in build.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.name == "publish" or (stages is not None and d.name not in stages):
            continue
        m = read_manifest(d)
        assert m is not None, d
        out.update({f"{d.name}/{e.path}": e.sha256 for e in m.outputs})
    return out


def same_as(reference: Path, build: Path, stages: list[str] | None = None) -> None:
    """Every artifact of ``build`` is on disk with the bytes of ``reference``'s."""
    a, b = artifacts(reference, stages), artifacts(build, stages)
    assert set(a) == set(b)
    assert sorted(k for k in a if a[k] != b[k] and k not in TIMED) == []
    for stage in {k.split("/")[0] for k in b}:
        assert check_outputs(build / stage, read_manifest(build / stage), deep=True) == [], stage


def run(spec: Path, task: str = "release", *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*release_cmd(spec, task), *args], cwd=spec.parent, capture_output=True, text=True,
                          timeout=timeout)


def start(spec: Path, task: str = "release", *args: str, log: Path | None = None) -> subprocess.Popen:
    """The task in the background; its stderr goes to ``log`` when given (read while it runs)."""
    err = open(log, "w") if log else subprocess.PIPE  # the child holds it open
    return subprocess.Popen([*release_cmd(spec, task), *args], cwd=spec.parent, stdout=subprocess.PIPE,
                            stderr=err, text=True, start_new_session=True)


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


# --- one writer per build folder ----------------------------------------------------------------


def test_a_second_writer_is_refused_at_once_naming_the_holder_and_wait_waits(demo_built, tmp_path):
    """Two `./inv release` on one build folder, as two terminals or two CI jobs would start them."""
    spec = linked_copy(demo_built.path, tmp_path / "two")
    build = load(spec).build_dir
    shutil.rmtree(build / "cards")  # the first run has something to build
    first = start(spec)
    deadline = time.monotonic() + 120
    while (h := lock.holder(build)) is None or h.pid != first.pid:
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # hold it there: the lock is held for as long as we need
    try:
        before = sorted(str(p.relative_to(build)) for p in build.rglob("*"))
        t0 = time.monotonic()
        second = run(spec)
        refused_in = time.monotonic() - t0
        assert second.returncode == 2, second.stderr[-2000:]
        assert errors(second.stderr) == [
            f"error: {build}: another run is writing this build folder (pid {first.pid} on {h.host} since "
            f"{h.since}: {h.command}); wait for it to finish, or run the same command with --wait"]
        assert "inv" in h.command and "release" in h.command and "--spec" in h.command
        assert "Traceback" not in second.stderr
        assert sorted(str(p.relative_to(build)) for p in build.rglob("*")) == before  # it wrote nothing
        log = tmp_path / "waiter.log"
        waiter = start(spec, "release", "--wait", log=log)
        deadline = time.monotonic() + 120
        while "waiting for" not in log.read_text():
            assert waiter.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert f"another run is writing it (pid {first.pid} on" in " ".join(log.read_text().split())
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    out, _ = waiter.communicate(timeout=600)
    assert waiter.returncode == 0, log.read_text()[-3000:]
    assert "│ built" not in out  # the first run had built everything
    same_as(demo_built.build_dir, build)
    print(f"second writer refused in {refused_in:.1f} s (the task's start included)")
    # a writer killed by SIGKILL leaves no lock behind: the next run goes ahead at once
    killed = start(spec)
    while (h := lock.holder(build)) is None or h.pid != killed.pid:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    again = run(spec)
    assert again.returncode == 0 and "another run" not in again.stderr, again.stderr[-2000:]


def test_the_holders_children_write_under_its_lock_and_a_training_runs_launchers_share_it(tmp_path):
    """The docker runner's containers and torchrun's workers inherit the right to write
    (QALB_BUILD_LOCK); the launchers of one multi-host run (same stage and rendezvous) join the
    first; any other writer is refused."""
    build = tmp_path / "build"
    code = ("import sys; from pathlib import Path; from release import lock\n"
            "with lock.hold(Path(sys.argv[1]), group=sys.argv[2] or None) as h: print('held' if h else 'joined')")

    def other(group: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, str(build), group], capture_output=True, text=True)

    with lock.hold(build, group="cpt@127.0.0.1:29500") as me:
        assert me is not None and os.environ[lock.ENV] == str(build.resolve())
        assert other().stdout.strip() == "joined"  # a child: the env names this folder
        env = {k: v for k, v in os.environ.items() if k != lock.ENV}
        for group, expect in (("cpt@127.0.0.1:29500", "joined"), ("cpt@127.0.0.1:29501", None), ("", None)):
            r = subprocess.run([sys.executable, "-c", code, str(build), group], capture_output=True, text=True,
                               env=env)
            if expect:
                assert r.stdout.strip() == expect, r.stderr
            else:
                assert "another run is writing this build folder" in r.stderr and r.returncode != 0
        # a joined launcher's own errors stay its own (not taken for a lock that failed)
        raising = code.replace("print('held' if h else 'joined')", "raise FileNotFoundError('its own')")
        r = subprocess.run([sys.executable, "-c", raising, str(build), "cpt@127.0.0.1:29500"], capture_output=True,
                           text=True, env=env)
        assert "FileNotFoundError: its own" in r.stderr and "BuildLocked" not in r.stderr, r.stderr
    assert lock.ENV not in os.environ and lock.holder(build) is None
    with pytest.raises(FileNotFoundError, match="its own"), lock.hold(build):
        raise FileNotFoundError("its own")
    assert lock.holder(build) is None


# --- a full disk --------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(where: Path, size: int):
    """A tmpfs of ``size`` bytes mounted at ``where`` (tests run as root), unmounted after."""
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _fill(disk: Path, when: Path, done: threading.Event) -> None:
    """A second writer: once ``when`` holds a file, fill ``disk`` to the last byte."""
    deadline = time.monotonic() + 300
    while not (when.is_dir() and any(p.is_file() for p in when.rglob("*"))):
        if time.monotonic() > deadline or done.is_set():
            return
        time.sleep(0.01)
    block = b"\0" * (64 << 10)
    with open(disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:  # until ENOSPC; then it stops, as a writer that failed would
            f.write(block)
    done.set()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_disk_filled_mid_stage_is_one_line_frees_the_stage_and_the_same_command_resumes(demo_built, tmp_path):
    ref = demo_built.build_dir
    kept = ["base", "data", "cpt", "sft", "merge"]  # what the gguf stage reads, and earlier stages
    size = sum(_du(ref / s) for s in kept) + 3 * _du(ref / "gguf") + (64 << 20)
    with small_disk(tmp_path / "disk", size) as disk:
        shutil.copytree(demo_built.path.parent, disk / "rel", ignore=shutil.ignore_patterns("build"))
        for s in kept:  # copy2 keeps the mtimes: nothing looks edited since built
            shutil.copytree(ref / s, disk / "rel" / "build" / ref.name / s)
        spec = disk / "rel" / demo_built.path.name
        build = load(spec).build_dir
        filled = threading.Event()
        filler = threading.Thread(target=_fill, args=(disk, build / ".gguf.partial", filled), daemon=True)
        filler.start()
        full = run(spec, "gguf")
        filler.join(5)
        assert filled.is_set(), "the second writer never saw the stage start"
        assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-2000:]
        assert "Traceback" not in full.stderr
        (line,) = errors(full.stderr)
        assert line.startswith(f"error: gguf: the disk filled while writing {build / '.gguf.partial'} (")
        assert line.endswith("free now that the unfinished stage is removed; earlier stages are kept); free space "
                             "and run the same command to resume")
        assert not (build / ".gguf.partial").exists() and not (build / "gguf").exists()
        # the unfinished stage's space came back: only the earlier stages' files are left in the build
        assert _du(build) == sum(_du(ref / s) for s in kept)
        same_as(ref, build, kept)  # earlier stages untouched
        (disk / "filler").unlink()
        again = run(spec, "gguf")
        assert again.returncode == 0, again.stderr[-3000:]
        same_as(ref, build, [*kept, "gguf"])


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_quantizer_that_fills_the_disk_is_a_full_disk_after_its_file_is_removed(demo_built, tmp_path):
    """llama.cpp's quantizer reports a full disk only by its exit status, and its unfinished file
    is removed at once, freeing the space it took: the failure still counts as a full disk (an
    ENOSPC cause, taken while the disk was full), so the stage says so in its one line."""
    from release import gguf
    from release.artifacts import disk_full
    from release.errors import GGUFError

    src = demo_built.build_dir / "gguf" / demo_built.gguf_file_name("F16")
    with small_disk(tmp_path / "disk", 40 << 20) as disk:  # the demo's Q4_K_M is 54 MB
        with pytest.raises(GGUFError) as e:
            gguf.quantize(src, disk / "out.gguf", "Q4_K_M")
        assert not [p for p in disk.iterdir()], "the unfinished file stays"
        assert shutil.disk_usage(disk).free > 16 << 20  # its space came back ...
        assert disk_full(e.value, disk)  # ... and the failure is still a full disk


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_outside_a_stage_is_one_line_too(tmp_path):
    """A task writing outside the stages' partial folders (here the Modelfiles into --out) on a
    full disk: one line, exit 2, no half-written file."""
    with small_disk(tmp_path / "disk", 256 << 10) as disk:
        with open(disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        out = disk / "modelfiles"
        done = subprocess.run([*release_cmd(Path("specs/qalb.toml").resolve(), "modelfiles"), "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        (line,) = errors(done.stderr)
        assert line.startswith("error: the disk is full") and line.endswith("run the same command to resume "
                                                                                     "(finished stages are kept)")
        assert not [p for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0 or ".tmp-" in p.name]


def test_a_full_disk_is_named_whatever_the_writer_says(tmp_path):
    """ENOSPC from Python, a library's own words for it, or a tool's exit status on a full disk."""
    from release.artifacts import disk_full
    from release.errors import GGUFError

    assert disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                  "\"No space left on device\" })"), tmp_path)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise GGUFError("llama-quantize failed") from e
    except GGUFError as e:
        assert disk_full(e, tmp_path)
    assert not disk_full(GGUFError("llama-quantize failed (exit 1)"), tmp_path)  # plenty of space here
    assert not disk_full(KeyboardInterrupt(), tmp_path)


# --- stale or damaged state ---------------------------------------------------------------------


def test_stale_and_damaged_state_is_rebuilt_in_one_run(demo_built, tmp_path):
    """A dead run's partial folder, a truncated manifest, an output deleted by hand and one changed
    by hand at the same size: one `./inv release` rebuilds exactly those stages."""
    spec = linked_copy(demo_built.path, tmp_path / "stale")
    build = load(spec).build_dir
    (build / ".merge.partial").mkdir()
    (build / ".merge.partial" / "half.safetensors").write_bytes(b"\0" * 1000)  # a dead run's
    manifest = build / "modelfiles" / MANIFEST
    text = manifest.read_text()
    manifest.unlink()  # hard-linked to the shared build's: never write through the link
    manifest.write_text(text[: len(text) // 2])  # truncated
    card = next((build / "cards").rglob("README.md"))
    card.unlink()  # deleted by hand
    target = next((build / "bnb4").rglob("*.safetensors"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.unlink()  # break the hard link: the shared build stays intact
    target.write_bytes(bytes(data))  # changed by hand, same size
    done = run(spec)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = demo_built.build_dir
    rebuilt = {n for n in pipeline.NAMES if n != "publish"
               and (build / n / MANIFEST).read_bytes() != (ref / n / MANIFEST).read_bytes()}
    assert rebuilt == {"bnb4", "modelfiles", "cards"}, rebuilt
    assert not (build / ".merge.partial").exists()
    assert f"note: removed {build / '.merge.partial'}, left unfinished by a run that ended" in done.stderr
    same_as(demo_built.build_dir, build)
    # a same-size change that also put the old mtime back: only --check (which hashes everything) sees it
    target = next((build / "modelfiles").glob("*.Modelfile"))
    before, st = target.read_bytes(), target.stat()
    target.unlink()
    target.write_bytes(before.replace(b"PARAMETER", b"PARAMETRE", 1))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    s = load(spec)
    assert not pipeline.run(s, only="modelfiles", progress=False)[0].ran
    assert pipeline.run(s, only="modelfiles", check=True, progress=False)[0].ran
    assert target.read_bytes() == before


def test_a_damaged_trainer_checkpoint_is_skipped_for_the_one_before(tmp_path):
    """What the trainer callback marks complete is what resume trusts: a checkpoint whose file
    changed since (truncated, or bytes flipped) is passed over, and the log says why."""
    from training import stages

    trainer = tmp_path / "trainer"
    for step in (2, 4, 6):
        folder = trainer / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(os.urandom(4096))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in folder.iterdir()}
        (folder / stages.COMPLETE).write_text(json.dumps(files))
    (trainer / "checkpoint-8").mkdir()  # cut short by a kill: no mark
    lines: list[str] = []
    assert stages._last_checkpoint(trainer, lines.append).name == "checkpoint-6"
    with open(trainer / "checkpoint-6" / "adapter_model.safetensors", "r+b") as f:
        f.truncate(100)
    p = trainer / "checkpoint-4" / "adapter_model.safetensors"
    data = bytearray(p.read_bytes())
    data[0] ^= 1
    p.write_bytes(bytes(data))
    assert stages._last_checkpoint(trainer, lines.append).name == "checkpoint-2"
    assert lines == ["checkpoint-6 is damaged (adapter_model.safetensors changed since it was saved); not resuming "
                     "from it", "checkpoint-4 is damaged (adapter_model.safetensors changed since it was saved); "
                     "not resuming from it"]


# --- the Hub failing mid-push -------------------------------------------------------------------

TOKEN = "hf_local"


def push(spec: Path, url: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`./inv publish --push --unsigned` against the local Hub at ``url``; requests time out after 2 s
    (signed pushes: tests/test_signing.py)."""
    env = dict(os.environ, HF_ENDPOINT=url, HF_TOKEN=TOKEN, HF_HUB_DOWNLOAD_TIMEOUT="2")
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([*release_cmd(spec, "publish"), "--push", "--unsigned"], cwd=spec.parent,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def online(monkeypatch):
    """The client in this process may reach the local Hub (the suite runs offline otherwise)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def repos(spec) -> list[str]:
    """The release's repos, in the order a push sends them."""
    return list(publish.repos(spec).values())  # the variants', then the adapters' (hub.publish_adapters)


def weight_oid(spec, key: str) -> str:
    """sha256 (the LFS oid) of variant ``key``'s largest weight file."""
    folder = pipeline.variant_dir(spec, key)
    files = [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".gguf")]
    return sha256_file(max(files, key=lambda p: p.stat().st_size))


def remote(spec, url: str) -> dict[str, dict]:
    """What the Hub shows of each repo: its files with their LFS oids, and its tags."""
    from huggingface_hub import HfApi, RepoFile
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(endpoint=url, token=TOKEN)
    out = {}
    for repo in repos(spec):
        try:
            files = {f.path: (f.lfs.sha256 if f.lfs else f.blob_id)
                     for f in api.list_repo_tree(repo, recursive=True) if isinstance(f, RepoFile)}
            tags = [t.name for t in api.list_repo_refs(repo).tags]
        except RepositoryNotFoundError:
            files, tags = {}, []
        out[repo] = {"files": files, "tags": tags}
    return out


def planned(spec) -> dict[str, set[str]]:
    """Each repo's planned file paths (publish/plan.json), .gitattributes included as the Hub adds it."""
    plan = json.loads((spec.build_dir / "publish" / "plan.json").read_text())
    return {repo: {*r["files"], ".gitattributes"} for repo, r in plan["repos"].items()}


@pytest.mark.slow
def test_a_hub_that_dies_mid_upload_leaves_whole_commits_no_tag_and_the_rerun_completes(demo_built, tmp_path,
                                                                                        online):
    """The server goes away in the middle of the second repo's largest file. The user sees one
    line; the first repo holds its whole commit, the others nothing of the release, no repo the
    tag. The same command against the Hub back up sends only what it lacks and tags every repo."""
    from release.localhub import HubServer

    spec_path = linked_copy(demo_built.path, tmp_path / "rel")
    spec = load(spec_path)
    second = list(spec.variants)[1]
    oid = weight_oid(spec, second)
    root = tmp_path / "hub"
    hub = HubServer(root, tokens=(TOKEN,)).start()
    port = hub.httpd.server_address[1]
    hub.faults[oid] = {"after": 1 << 16}  # the upload stalls there, and the server is stopped under it

    def kill_when_stalled():
        if hub.stalled.wait(300):
            hub.stop()

    killer = threading.Thread(target=kill_when_stalled, daemon=True)
    killer.start()
    try:
        failed = push(spec_path, hub.url)
    finally:
        hub.release_stalls()
        killer.join(30)
    assert hub.stalled.is_set()
    assert failed.returncode == 2, failed.stdout[-2000:] + failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    (line,) = errors(failed.stderr)
    repo2 = spec.variants[second].repo
    assert line.startswith(f"error: {repo2}: uploading "), line
    assert f"(http://127.0.0.1:{port})" in line and "run the same command again to resume" in line, line
    assert TOKEN not in failed.stdout + failed.stderr

    with HubServer(root, tokens=(TOKEN,), port=port) as back:
        state, want = remote(spec, back.url), planned(spec)
        first = repos(spec)[0]
        assert set(state[first]["files"]) == want[first]  # a whole commit
        for repo in repos(spec)[1:]:
            assert set(state[repo]["files"]) <= {".gitattributes"}, repo  # nothing of the release
        assert all(not s["tags"] for s in state.values())  # the tag on none
        plan = json.loads((spec.build_dir / "publish" / "plan.json").read_text())["repos"]
        held = {(r, f["sha256"]) for r, p in plan.items() for f in p["files"].values()
                if back.store.lfs_size(r, f["sha256"]) is not None}  # LFS objects are kept per repo
        assert any(r == repo2 for r, _ in held)  # the second repo's files sent before the fault stay
        again = push(spec_path, back.url)
        assert again.returncode == 0, again.stderr[-3000:]
        state = remote(spec, back.url)
        assert {r: set(s["files"]) for r, s in state.items()} == want
        assert all(s["tags"] == [spec.hub.revision_tag] for s in state.values())
        # what the rerun sent is exactly the LFS objects each repo lacked: nothing the Hub held
        lfs = {(r, f["sha256"]): f["size"] for r, p in plan.items() for f in p["files"].values()
               if back.store.lfs_size(r, f["sha256"]) is not None}
        resent = back.stats["lfs_bytes"]
        assert resent == sum(size for key, size in lfs.items() if key not in held)
    # sent twice: only what the server had read of the file it died in (a basic LFS transfer restarts)
    cut = hub.stats["lfs_uploads"][oid]
    assert hub.stats["lfs_bytes"] + resent == sum(lfs.values()) + cut
    total = sum(f["size"] for p in plan.values() for f in p["files"].values())
    print(f"re-sent {cut:,} of the release's {total:,} bytes ({cut / total:.4%}); the first push sent "
          f"{hub.stats['lfs_bytes']:,}, the rerun {resent:,}")


# The rest of the Hub's faults, each against a fresh local Hub: (fault, whether huggingface_hub's
# or the push's retries carry the push through it, the operation named when they do not).
HUB_FAULTS = {
    "500 on every commit of the second repo": (dict(route="commit", nth=2, times=99, status=500), False,
                                               "committing"),
    "503 once on the LFS batch": (dict(route="lfs_batch", nth=2, status=503), True, None),
    "429 with Retry-After on the preupload": (dict(route="preupload", nth=1, status=429, retry_after=1), True, None),
    "connection reset mid-upload": (dict(route="lfs_put", nth=2, drop_after=1000), True, None),
    "connection reset on every upload of the second repo": (dict(route="lfs_put", nth=3, times=99, drop_after=1000),
                                                            False, "uploading"),
    # the commit lands while the client has given up on its answer: the retry sees it landed
    "a commit answered slower than the timeout": (dict(route="commit", nth=1, delay=4), True, None),
    "a server slower than the timeout on every LFS batch": (dict(route="lfs_batch", nth=1, times=99, delay=3),
                                                            False, "uploading"),
    "503 on every tag": (dict(route="create_tag", nth=1, times=99, status=503), False, "tagging"),
}


# one runs in the default suite; the lasting faults wait out huggingface_hub's backoff (23 s) first
DEFAULT_HUB_FAULT = "503 once on the LFS batch"


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == DEFAULT_HUB_FAULT else pytest.mark.slow)
                                  for n in HUB_FAULTS])
def test_hub_faults(demo_built, tmp_path, online, name):
    """Each fault: a transient one is retried and the push completes; a lasting one ends in one
    line naming the endpoint, the repo and the operation, leaves whole commits only and no repo
    tagged unless every repo is committed, and the same command completes the release."""
    from release.localhub import Fault, HubServer

    fault, carried, what = HUB_FAULTS[name]
    spec_path = linked_copy(demo_built.path, tmp_path / "rel")
    spec = load(spec_path)
    with HubServer(tmp_path / "hub", tokens=(TOKEN,)) as hub:
        hub.inject(Fault(**fault))
        first = push(spec_path, hub.url)
        assert hub.stats["faults"], "the fault never played"
        assert "Traceback" not in first.stderr and TOKEN not in first.stdout + first.stderr
        want = planned(spec)
        state = remote(spec, hub.url)
        for repo, s in state.items():  # whole commits only
            assert set(s["files"]) in (want[repo], set(), {".gitattributes"}), (repo, s["files"])
        if carried:
            assert first.returncode == 0, first.stderr[-3000:]
        else:
            assert first.returncode == 2, first.stderr[-3000:]
            (line,) = errors(first.stderr)
            assert f" ({hub.url}): " in line and f": {what}" in line and "run the same command again" in line, line
            assert line.split(":")[1].strip() in repos(spec), line  # "error: <repo>: <what> ..."
            committed = all(set(s["files"]) == want[r] for r, s in state.items())
            assert committed or not any(s["tags"] for s in state.values())  # no tag on a half-published release
            hub.clear_faults()
            again = push(spec_path, hub.url)
            assert again.returncode == 0, again.stderr[-3000:]
        state = remote(spec, hub.url)
        assert {r: set(s["files"]) for r, s in state.items()} == want
        assert all(s["tags"] == [spec.hub.revision_tag] for s in state.values())


# --- interrupts inside a child process ----------------------------------------------------------


def _child_running(pid: int, names: tuple[str, ...]) -> bool:
    import psutil

    try:
        return any(any(n in " ".join(c.cmdline()) for n in names) for c in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return False


INSIDE = {  # task and options, the child's command line to wait for, the stage
    "llama.cpp's tools": (("gguf", "--force"), ("llama-imatrix", "llama-quantize", "import llama_cpp"), "gguf"),
    "torchrun": (("cpt", "--force", "--processes", "2"), ("training.worker",), "cpt"),
}


@pytest.mark.slow  # the kill test stops gguf with SIGTERM in the default suite
@pytest.mark.parametrize("where", list(INSIDE))
def test_sigterm_while_a_child_runs_stops_it_and_the_rerun_resumes(demo_built, tmp_path, where):
    """SIGTERM to the task's own process (not its group, as `kill PID` or a CI cancel sends it)
    while llama.cpp's quantizer or torchrun's workers run: one line, exit 143, no process left,
    and the same command then gives the uninterrupted run's bytes."""
    from test_pipeline import _survivors

    (task, *options), names, stage = INSIDE[where]
    spec = linked_copy(demo_built.path, tmp_path / "rel")
    build = load(spec).build_dir
    proc = start(spec, task, *options)
    deadline = time.monotonic() + 300
    while not _child_running(proc.pid, names):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == f"interrupted in stage {stage}; run the same command to resume", err[-2000:]
    assert "Traceback" not in err
    deadline = time.monotonic() + 10
    while _survivors(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _survivors(proc.pid) == []
    assert not (build / f".{stage}.partial").exists()
    again = run(spec, task, *[o for o in options if o != "--force"])
    assert again.returncode == 0, again.stderr[-3000:]
    if where != "torchrun":  # two processes train to other bytes than the demo's one (same losses, 5e-4)
        same_as(demo_built.build_dir, build, [stage])
