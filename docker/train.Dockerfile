# GPU image for the training stages (curation, continued pre-training, SFT): Unsloth on PyPI's
# CUDA build of torch. Build with `./inv docker.build --image train`; `./inv train --runner
# docker` and `./inv release --runner docker` start it, with `--gpus all` on a GPU host (the
# NVIDIA container toolkit there provides the driver; where there is no GPU, the same image runs
# Unsloth's CPU path).
#
# No CUDA base image: PyPI's torch 2.13.0 for Linux x86-64 is the CUDA build, and its nvidia-*
# wheels carry the CUDA 13 runtime, so the host needs only a driver that supports CUDA 13. The
# base is the release image's `env` stage (qalb-env:<version>: system, Python, user and the pinned
# dependency set with llama.cpp), so the two images share those layers and nothing the release
# image installs is installed again; this image swaps torch for the CUDA build and adds Unsloth
# and the [train] set.
#
# Build arguments:
#   ENV_IMAGE        the release image's env stage (`./inv docker.build` passes it)
#   TORCH_INDEX_URL  where torch 2.13.0 comes from: PyPI (CUDA 13), or PyTorch's index for an
#                    older driver, e.g. https://download.pytorch.org/whl/cu128
#   TORCHVISION      the torchvision release built against torch 2.13.0 (Unsloth's metadata
#                    requires it; its CUDA wheels import fine beside the CUDA torch)
#   PIP_CERT, UID, GID   as in release.Dockerfile
#
# Constraints: constraints.txt pins the CPU-resolved set, torch==2.13.0 and triton==3.9.0. The
# CUDA torch 2.13.0 requires its own triton release, so this image installs with constraints.txt
# minus its torch and triton lines; every other version is the pinned one.
ARG ENV_IMAGE
FROM ${ENV_IMAGE}
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCHVISION=0.28.0
ARG PIP_CERT=docker/no-extra-ca.pem
ARG UID=1000
ARG GID=1000
LABEL org.opencontainers.image.title="qalb-train" \
      org.opencontainers.image.description="Qalb training stages: curation, Unsloth LoRA CPT and SFT (CUDA torch)"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180

# A compiler and Python's headers: triton (Unsloth's kernels) compiles its launchers at run time.
# (python:3.11 images carry the headers; Debian's own python3.11 needs python3.11-dev.)
# hadolint ignore=DL3008,SC2086
RUN pkgs="build-essential" \
 && inc=$(python3.11 -c 'import sysconfig; print(sysconfig.get_paths()["include"])') \
 && { [ -f "$inc/Python.h" ] || pkgs="$pkgs python3.11-dev"; } \
 && apt-get update \
 && apt-get install -y --no-install-recommends $pkgs \
 && rm -rf /var/lib/apt/lists/*

COPY ${PIP_CERT} /etc/pip-ca.pem
ENV PIP_CERT=/etc/pip-ca.pem
# the env stage's /app: its pyproject.toml and constraints.txt, later the project's files
WORKDIR /app
# The CUDA torch in place of the CPU one, then the [train] set (read from pyproject.toml, so the
# project itself is not installed: /app is on the path, as in the release image) and Unsloth
# without its metadata's dependencies (xformers is optional on CUDA; the rest is [train]).
RUN cat /etc/ssl/certs/ca-certificates.crt >> /etc/pip-ca.pem \
 && grep -v -E '^(torch|triton)==' constraints.txt > /etc/constraints-cuda.txt \
 && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["train"]))' > /etc/train-requirements.txt \
 && pip uninstall -y torch \
 && pip install --index-url "${TORCH_INDEX_URL}" -c /etc/constraints-cuda.txt "torch==2.13.0" "torchvision==${TORCHVISION}" \
 && pip install -c /etc/constraints-cuda.txt -r /etc/train-requirements.txt \
 && pip install --no-deps -c /etc/constraints-cuda.txt unsloth unsloth_zoo

# the tasks and specs, for use without a checkout (the runner mounts the checkout instead)
COPY tasks.py ./
COPY specs ./specs
COPY release ./release
COPY training ./training
USER ${UID}:${GID}
ENTRYPOINT ["invoke"]
CMD ["--list"]
