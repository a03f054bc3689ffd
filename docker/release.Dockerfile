# CPU image for the release stages: merge, GGUF conversion and quantization, verification,
# cards and publishing. Build with `./inv docker.build --image release` (the "Containers"
# section of README.md); stages run in it with `--runner docker`.
#
# Stages: `build` (compilers, the virtual environment), `env` (the runtime: system, user and
# environment, no project code; tagged qalb-env:<version>, the train image's base, so both
# images share its layers) and the final image (env plus the project files).
#
# Build arguments:
#   BASE_IMAGE       Debian bookworm with Python 3.11 and venv (python:3.11-slim-bookworm, or the
#                    local debootstrap image of docker/podman-setup.sh)
#   TORCH_INDEX_URL  where the CPU build of torch comes from (PyTorch's CPU index)
#   WHEELHOUSE       a folder in the build context with pre-built wheels pip may use first (e.g.
#                    llama-cpp-python, whose sdist compiles llama.cpp for 10-25 minutes); the
#                    default is an empty folder that .dockerignore keeps
#   PIP_CERT         a CA bundle in the build context for HTTPS through an intercepting proxy
#   UID, GID         the image user's ids (the runner starts containers as the caller anyway)
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# --- build: a virtual environment with the pinned dependency set --------------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELHOUSE=docker/wheelhouse
ARG PIP_CERT=docker/no-extra-ca.pem
# llama.cpp for any x86-64 CPU, not just the build machine's (the default is -march=native)
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_FIND_LINKS=/wheelhouse \
    PIP_DEFAULT_TIMEOUT=180 \
    CMAKE_ARGS=${CMAKE_ARGS} \
    PATH=/opt/venv/bin:${PATH}

# a compiler for sdists (llama-cpp-python) and cmake for llama.cpp's tools; not in the final image
# (apt packages are not version-pinned: the pinned base image fixes the release, and exact
# Debian/Ubuntu versions disappear from the mirrors with each point release)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ca-certificates cmake \
 && rm -rf /var/lib/apt/lists/*

COPY ${PIP_CERT} /etc/pip-ca.pem
COPY ${WHEELHOUSE} /wheelhouse
ENV PIP_CERT=/etc/pip-ca.pem

# pip's CA: the system bundle, plus the one passed in (empty by default)
RUN cat /etc/ssl/certs/ca-certificates.crt >> /etc/pip-ca.pem \
 && python3.11 -m venv /opt/venv

WORKDIR /src
COPY constraints.txt ./
# torch first, the CPU build, so that nothing below can choose a CUDA build (as ./inv does)
RUN pip install --index-url "${TORCH_INDEX_URL}" --no-deps -c constraints.txt "torch==2.13.0"

# The dependencies and the project's metadata, in a layer that only pyproject.toml and
# constraints.txt change (README.md, which pyproject names, is a placeholder here). The code is
# not installed: a .pth file puts /app, where the final stage copies it, on the path, so code
# changes rebuild only the small last layers. (The runner mounts the checkout as the working
# directory, whose code then comes first.)
COPY pyproject.toml ./
RUN : > README.md \
 && pip install -c constraints.txt . \
 && pip check \
 && echo /app > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/qalb-release.pth"

# llama.cpp's llama-imatrix and llama-quantize into /opt/venv/bin, built from the same
# llama-cpp-python sdist against its installed libraries, as ./inv does (release/llamatools.py)
COPY release/__init__.py release/errors.py release/llamatools.py /tmp/llamatools/release/
RUN PYTHONPATH=/tmp/llamatools python -m release.llamatools \
 && rm -rf /tmp/llamatools

# --- env: the runtime without the project's code (the train image starts from it) -------------
FROM ${BASE_IMAGE} AS env
ARG UID=1000
ARG GID=1000

# libgomp1: llama.cpp's OpenMP runtime
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid "${GID}" qalb \
 && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /bin/bash qalb \
 && chmod 0777 /home/qalb

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY pyproject.toml constraints.txt ./

# The runner starts containers as the caller's uid:gid, which need not be this user's: HOME is
# writable by any uid (caches of triton, torch, the tokenizer kit), HF_HOME is overridden by the
# runner with the mounted host cache.
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/home/qalb \
    HF_HOME=/home/qalb/.cache/huggingface \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8

# --- final: env, the project files, a non-root user ----------------------------------------------
FROM env
ARG UID=1000
ARG GID=1000
LABEL org.opencontainers.image.title="qalb-release" \
      org.opencontainers.image.description="Qalb release toolchain: merge, GGUF, verification, publishing (CPU)"
# the tasks and specs, for use without a checkout (the runner mounts the checkout instead)
COPY tasks.py ./
COPY specs ./specs
COPY release ./release
COPY training ./training
USER ${UID}:${GID}
ENTRYPOINT ["invoke"]
CMD ["--list"]
