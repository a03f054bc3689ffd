"""Docker commands for the images in ``docker/`` and the ``--runner docker`` path of stage tasks.

The command builders are pure functions returning argv lists (tested as such); ``dispatch`` and
``build`` run them. A container runs one stage task with ``--runner local`` inside it:

- the checkout is mounted at its own path and is the working directory, so relative paths and
  the spec's paths mean the same inside and out, and the image only supplies the environment;
  the spec's build folder (if it lies outside the checkout) and the Hugging Face cache are
  mounted read-write at their own paths too;
- the container runs as the caller's uid:gid, so what it writes belongs to the caller;
- secrets are passed by name (``-e HF_TOKEN``): docker copies the value from its own
  environment, so no value is ever on a command line, in a log or in an error message;
- training stages get ``--gpus all`` on a host with an NVIDIA GPU (nvidia-smi lists one).
"""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from release import children, lock
from release.artifacts import Traits, toolchain
from release.errors import DockerError

IMAGES = ("release", "train")
RUNNERS = ("docker", "local")
# Variables passed into containers by name only. The first are secrets; the rest are settings
# that the stages read and that should mean the same inside (OMP_NUM_THREADS: a host's share of
# the cores for a multi-host launch, which torchrun leaves as it finds it).
SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "QALB_SIGNING_KEY_PASSWORD", "SIGSTORE_ID_TOKEN")
PASSED = SECRETS + ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER", "CUDA_VISIBLE_DEVICES",
                    "OMP_NUM_THREADS")
# (image, uses a GPU): what a task runs in. The stages declare theirs (``TRAITS.image``,
# ``TRAITS.gpu``) and the callers pass them; everything else runs in the release image.
Image = tuple[str, bool]
RELEASE_IMAGE: Image = (Traits().image, Traits().gpu)  # a stage's default traits
# Options of stage tasks that name files or folders: they must be visible in the container.
PATH_OPTIONS = ("spec", "base", "adapter", "out", "model", "check")
# Folder inside the build context where `build` stages the wheelhouse and the CA bundle
# (.dockerignore lets it through; the rest of build/ stays out of the context).
STAGING = Path("build/.cache/docker")


# --- pure command builders --------------------------------------------------------------------


def image_tag(image: str, version: str | None = None) -> str:
    """``qalb-<image>:<package version>``: the tag `docker.build` writes and the runner runs
    (``env``: the release image's runtime stage, the train image's base)."""
    if image not in IMAGES + ("env",):
        raise DockerError(f"--image {image}: expected one of {', '.join(IMAGES)}")
    return f"qalb-{image}:{version or importlib.metadata.version(toolchain())}"


def dockerfile(image: str) -> Path:
    return Path("docker") / f"{image}.Dockerfile"


def build_command(dockerfile: str | Path, tag: str, context: str | Path = ".",
                  build_args: Mapping[str, str] | None = None, docker: str = "docker",
                  target: str | None = None) -> list[str]:
    """``docker build -f FILE -t TAG [--target T] --build-arg K=V ... CONTEXT`` (build args sorted)."""
    cmd = [docker, "build", "-f", str(dockerfile), "-t", tag] + (["--target", target] if target else [])
    for key, value in sorted((build_args or {}).items()):
        if key in SECRETS:
            raise DockerError(f"--build-arg {key}: secrets never go into an image")
        cmd += ["--build-arg", f"{key}={value}"]
    return cmd + [str(context)]


def run_command(task_argv: Sequence[str], tag: str, *, workdir: str | Path,
                mounts: Sequence[str | Path], user: tuple[int, int], gpus: bool = False,
                env_names: Sequence[str] = PASSED, env: Mapping[str, str] | None = None,
                docker: str = "docker", host_network: bool = False, name: str | None = None) -> list[str]:
    """``docker run --rm`` of one task with ``--runner local`` inside (``--name NAME`` instead of
    ``--rm`` when given: the caller removes the container; see ``dispatch``).

    ``mounts`` are host folders mounted read-write at the same path; ``env_names`` are passed by
    name (the value stays in docker's environment); ``env`` holds non-secret values such as
    paths and refuses secret names. ``host_network``: training across hosts (torchrun's
    rendezvous and the collectives use the host's addresses), with the host's process ids too:
    torchrun tells the nodes apart by host name and pid, which two containers of one machine
    would otherwise share (their torchruns can have the same pid in their own namespaces)."""
    cmd = [docker, "run"] + (["--name", name] if name else ["--rm"])
    if gpus:
        cmd += ["--gpus", "all", "--ipc", "host"]
    if host_network:
        cmd += ["--network", "host", "--pid", "host"]
    cmd += ["--user", f"{user[0]}:{user[1]}"]
    for folder in mounts:
        cmd += ["-v", f"{folder}:{folder}"]
    for name in env_names:
        cmd += ["-e", name]
    for name, value in sorted((env or {}).items()):
        if name in SECRETS:
            raise DockerError(f"{name}: secrets are passed by name only, never with a value")
        cmd += ["-e", f"{name}={value}"]
    cmd += ["-w", str(workdir), tag]
    return cmd + list(task_argv) + ["--runner", "local"]


def task_argv(task: str, options: Mapping[str, object]) -> list[str]:
    """The invoke command line of ``task`` with these keyword options (invoke's own spelling:
    ``from_`` is ``--from``, ``_`` is ``-``, True is a bare flag, lists repeat the option)."""
    argv = [task]
    for name, value in options.items():
        flag = "--" + name.rstrip("_").replace("_", "-")
        if name == "runner" or value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def shown(cmd: Sequence[str]) -> str:
    """The command as printed before it runs: it holds secret names only, never values."""
    return shlex.join(cmd)


# --- host facts -------------------------------------------------------------------------------


def gpu_present() -> bool:
    """An NVIDIA GPU that ``nvidia-smi -L`` lists."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def default_runner(image: Image) -> str:
    """``docker`` for what runs in the train image (curation, training) on a GPU host, ``local``
    otherwise."""
    return "docker" if image[0] == "train" and gpu_present() else "local"


def hf_folders() -> dict[str, Path]:
    """The Hugging Face cache folders to mount: ``HF_HOME``, and ``HF_HUB_CACHE`` if outside it."""
    from huggingface_hub import constants

    home = Path(constants.HF_HOME).resolve()
    out = {"HF_HOME": home}
    hub = Path(constants.HF_HUB_CACHE).resolve()
    if not hub.is_relative_to(home):
        out["HF_HUB_CACHE"] = hub
    return out


def _inside(path: Path, folders: Sequence[Path]) -> bool:
    return any(path == f or path.is_relative_to(f) for f in folders)


def plan(task: str, options: Mapping[str, object], root: Path, *, image: Image = RELEASE_IMAGE,
         build_dir: Path | None = None, tag: str | None = None, container: str | None = None) -> list[str]:
    """The ``docker run`` command for ``task`` in ``image``: mounts, user and GPU derived from
    the image, the checkout ``root`` and the spec's ``build_dir``."""
    root = root.resolve()
    image, gpus = image
    hf = hf_folders()
    mounts = [root]
    if build_dir is not None and not _inside(build_dir.resolve(), mounts):
        mounts.append(build_dir.resolve())
    mounts += [p for p in hf.values() if not _inside(p, mounts)]
    for name in PATH_OPTIONS:
        values = options.get(name)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is None:
                continue
            path = Path(str(value)).resolve()
            if not _inside(path, mounts):
                raise DockerError(f"--{name} {value}: outside the checkout {root}, so not visible in the "
                                  f"container; move it into the checkout or use --runner local")
    cwd = Path.cwd().resolve()
    env = {k: str(v) for k, v in hf.items()}
    if os.environ.get(lock.ENV):  # the container writes under this process's lock (release/lock.py)
        env[lock.ENV] = os.environ[lock.ENV]
    key = os.environ.get("QALB_SIGNING_KEY")  # release/signing.py: a path (or "sigstore"), visible inside too
    if key:
        if Path(key).is_absolute() or os.sep in key:
            path = Path(key).expanduser().resolve()
            if not _inside(path.parent, mounts):
                mounts.append(path.parent)
            key = str(path)
        env["QALB_SIGNING_KEY"] = key
    return run_command(task_argv(task, options), tag or image_tag(image),
                       workdir=cwd if _inside(cwd, [root]) else root, mounts=mounts,
                       user=(os.getuid(), os.getgid()), gpus=gpus and gpu_present(),
                       env=env, host_network=int(options.get("nodes") or 1) > 1,
                       name=container)


# --- running ----------------------------------------------------------------------------------


def _docker() -> str:
    exe = shutil.which("docker")
    if exe is None:
        raise DockerError("docker: command not found; install Docker (or run docker/podman-setup.sh "
                          "for Podman) or use --runner local")
    return "docker"


def image_exists(tag: str) -> bool:
    out = subprocess.run([_docker(), "image", "inspect", tag], capture_output=True, text=True)
    return out.returncode == 0


def dispatch(task: str, runner: str | None, options: Mapping[str, object], root: Path,
             *, image: Image = RELEASE_IMAGE, build_dir: Path | None = None) -> bool:
    """Run ``task`` in ``image`` when the runner is ``docker`` (default: `default_runner`) and
    return True; return False when it should run here."""
    runner = runner or default_runner(image)
    if runner not in RUNNERS:
        raise DockerError(f"--runner {runner}: expected one of {', '.join(RUNNERS)}")
    if runner == "local":
        return False
    tag = image_tag(image[0])
    # A named container, removed here, rather than --rm: with --rm the docker CLI waits for the
    # container's removal, and Podman before 4.6 (Debian 12 has 4.3) answers that wait with exit
    # status 0 whatever the stage's (containers/podman#18889), so failures would pass unseen.
    name = f"qalb-{task}-{os.getpid()}-{time.time_ns() % 10**9}"
    cmd = plan(task, options, root, image=image, build_dir=build_dir, tag=tag, container=name)
    if not image_exists(tag):
        raise DockerError(f"image {tag} not found: build it with `./inv docker.build --image {image[0]}`")
    for folder in hf_folders().values():  # or docker creates them owned by root
        folder.mkdir(parents=True, exist_ok=True)
    print(f"docker runner: {shown(cmd)}", file=sys.stderr, flush=True)
    try:
        rc = children.run(cmd).returncode
    finally:  # an interrupt too: the container is stopped and removed
        subprocess.run([_docker(), "rm", "-f", name], capture_output=True)
    if rc != 0:
        raise DockerError(f"{task} in container {tag} failed with exit status {rc} (its errors are above)")
    return True


def _stage(src: Path, dest: Path) -> None:
    """Copy ``src`` (a file, or a folder's files) to ``dest`` inside the build context."""
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        dest.mkdir()
        for f in sorted(src.iterdir()):
            if f.is_file():
                try:
                    os.link(f, dest / f.name)
                except OSError:
                    shutil.copy2(f, dest / f.name)
    else:
        shutil.copy2(src, dest)


def build_args(image: str, root: Path, *, base_image: str | None = None, wheelhouse: Path | None = None,
               ca_bundle: Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Build arguments for ``image``; stages the wheelhouse and CA bundle into the context.

    UID/GID are the caller's (1000 for root, which an image user cannot have). The train image's
    base is the release image's env stage of the same version (``ENV_IMAGE``)."""
    args: dict[str, str] = {}
    if image == "train":
        if base_image or wheelhouse:
            raise DockerError("--base-image/--wheelhouse: the train image starts from the release image's env "
                              "stage; pass them when building the release image")
        args["ENV_IMAGE"] = image_tag("env")
    if base_image:
        args["BASE_IMAGE"] = base_image
    uid, gid = os.getuid(), os.getgid()
    args["UID"], args["GID"] = (str(uid), str(gid)) if uid and gid else ("1000", "1000")
    for arg, src, name in (("WHEELHOUSE", wheelhouse, "wheelhouse"), ("PIP_CERT", ca_bundle, "ca.pem")):
        if src is None:
            continue
        src = Path(src)
        if not src.exists() or (arg == "WHEELHOUSE") != src.is_dir():
            kind = "folder of wheels" if arg == "WHEELHOUSE" else "CA bundle file"
            raise DockerError(f"{src}: not found or not a {kind}")
        _stage(src.resolve(), root / STAGING / image / name)
        args[arg] = (STAGING / image / name).as_posix()
    args.update(extra or {})
    return args


def build_commands(image: str, root: Path, *, tag: str | None = None, **kwargs) -> list[list[str]]:
    """The ``docker build`` commands for ``image``: the release image's env stage (tagged, the
    train image's base) and then the image itself; the train image alone."""
    args = build_args(image, root, **kwargs)
    cmds = [build_command(dockerfile(image), tag or image_tag(image), ".", args, docker=_docker())]
    if image == "release":
        cmds.insert(0, build_command(dockerfile(image), image_tag("env"), ".", args, docker=_docker(), target="env"))
    return cmds


def build(image: str, root: Path, *, tag: str | None = None, **kwargs) -> dict[str, object]:
    """``docker build`` of ``image`` from the checkout; returns tag, size and seconds."""
    tag = tag or image_tag(image)
    if image == "train" and not image_exists(image_tag("env")):
        raise DockerError(f"image {image_tag('env')} not found: the train image starts from the release image's "
                          "env stage; build that first with `./inv docker.build --image release`")
    t0 = time.monotonic()
    for cmd in build_commands(image, root, tag=tag, **kwargs):
        print(f"docker build: {shown(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd, cwd=root).returncode
        if rc != 0:
            raise DockerError(f"docker build of {cmd[cmd.index('-t') + 1]} failed with exit status {rc} after "
                              f"{time.monotonic() - t0:.1f} s (output above)")
    seconds = round(time.monotonic() - t0, 1)
    size = subprocess.run([_docker(), "image", "inspect", "--format", "{{.Size}}", tag],
                          capture_output=True, text=True).stdout.strip()
    return {"image": image, "tag": tag, "bytes": int(size) if size.isdigit() else None, "seconds": seconds}
