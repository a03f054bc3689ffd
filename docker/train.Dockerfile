# GPU image for the training stages (curation, continued pre-training, SFT) with Unsloth on a
# CUDA build of torch. Build with `./inv docker.build --image train`; `./inv train --runner
# docker` starts it with `--gpus all` (needs the NVIDIA container toolkit on the host).
#
# Build arguments:
#   BASE_IMAGE       an NVIDIA CUDA 12.x Ubuntu 22.04 image (its python3.11 comes from universe)
#   TORCH_INDEX_URL  PyTorch's index for the CUDA build matching BASE_IMAGE (cu128 for 12.8)
#   TORCHVISION      the torchvision release built against torch 2.13.0 (Unsloth's metadata
#                    requires it; the CUDA wheels import fine beside the CUDA torch)
#   WHEELHOUSE, PIP_CERT, UID, GID   as in release.Dockerfile
#
# Constraints: constraints.txt pins the CPU-resolved set, torch==2.13.0 and triton==3.9.0. A
# CUDA torch 2.13.0 (2.13.0+cu128) satisfies the torch pin but requires its own triton release,
# so this image installs with constraints.txt minus its torch and triton lines; every other
# version is the pinned one.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCHVISION=0.28.0
ARG WHEELHOUSE=docker/wheelhouse
ARG PIP_CERT=docker/no-extra-ca.pem
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF"
ARG UID=1000
ARG GID=1000
LABEL org.opencontainers.image.title="qalb-train" \
      org.opencontainers.image.description="Qalb training stages: Unsloth LoRA CPT and SFT on CUDA"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_FIND_LINKS=/wheelhouse \
    PIP_DEFAULT_TIMEOUT=180 \
    CMAKE_ARGS=${CMAKE_ARGS} \
    PATH=/opt/venv/bin:${PATH}

# Python 3.11 with headers and a compiler: triton (Unsloth's kernels) compiles its launchers at
# run time, and llama-cpp-python's sdist compiles llama.cpp at build time.
# (apt packages are not version-pinned: the pinned base image fixes the release, and exact
# Debian/Ubuntu versions disappear from the mirrors with each point release)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv python3.11-dev build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid "${GID}" qalb \
 && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /bin/bash qalb \
 && chmod 0777 /home/qalb

COPY ${PIP_CERT} /etc/pip-ca.pem
COPY ${WHEELHOUSE} /wheelhouse
ENV PIP_CERT=/etc/pip-ca.pem
RUN cat /etc/ssl/certs/ca-certificates.crt >> /etc/pip-ca.pem \
 && python3.11 -m venv /opt/venv

WORKDIR /app
COPY constraints.txt ./
# the CUDA torch first, from PyTorch's index; then the pins without torch and triton
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0" "torchvision==${TORCHVISION}" \
 && grep -v -E '^(torch|triton)==' constraints.txt > /etc/constraints-cuda.txt

# The dependencies, Unsloth and the project's metadata, in a layer that only pyproject.toml and
# constraints.txt change (README.md is a placeholder); the code is found through a .pth file
# (see release.Dockerfile). Unsloth is installed without its metadata's dependencies: xformers is
# optional on CUDA and the rest is the [train] extra (`pip check` would report xformers).
COPY pyproject.toml ./
RUN : > README.md \
 && pip install -c /etc/constraints-cuda.txt ".[train]" \
 && pip install --no-deps -c /etc/constraints-cuda.txt unsloth unsloth_zoo \
 && echo /app > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/qalb-release.pth"

COPY tasks.py ./
COPY specs ./specs
COPY release ./release
COPY training ./training
ENV HOME=/home/qalb \
    HF_HOME=/home/qalb/.cache/huggingface \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8
USER ${UID}:${GID}
ENTRYPOINT ["invoke"]
CMD ["--list"]
