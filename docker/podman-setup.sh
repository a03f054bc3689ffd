#!/usr/bin/env bash
# Serve the Docker API with Podman on a machine without Docker or an image registry, and make a
# local Debian bookworm + Python 3.11 base image for docker/release.Dockerfile.
#
#   eval "$(docker/podman-setup.sh)"      # prints the exports: DOCKER_HOST, DOCKER_BUILDKIT=0, ...
#   docker/podman-setup.sh --wheelhouse   # also fill build/.cache/wheelhouse (see below)
#   docker/podman-setup.sh --stop         # stop the API service this script started
#
# Idempotent: installs what is missing (root, Debian: podman runc debootstrap curl, and the docker CLI
# from docker.io when no `docker` is on PATH), makes the base image once (debootstrap, ~2 min;
# the root filesystem tarball is kept in build/.cache/podman/ and re-imported from there), and
# starts `podman system service` once. Diagnostics go to stderr; stdout is only the exports.
#
# Facts of the machines this was made on: Debian's podman needs `runc` (crun fails on their
# cgroup setup) and ulimits no higher than nofile=20000, nproc=32768, both set in a
# containers.conf of our own (CONTAINERS_CONF); the docker CLI's legacy builder works against
# podman's socket, BuildKit does not.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE=${QALB_PODMAN_CACHE:-$PWD/build/.cache/podman}
BASE_IMAGE=${QALB_BASE_IMAGE:-localhost/qalb-base:bookworm-py311}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SOCK=$CACHE/podman.sock
CONF=$CACHE/containers.conf
ROOTFS_TAR=$CACHE/bookworm-py311-rootfs.tar
mkdir -p "$CACHE"
export CONTAINERS_CONF=$CONF

log() { echo "podman-setup: $*" >&2; }

if [ "${1:-}" = "--stop" ]; then
  if [ -f "$CACHE/service.pid" ] && kill -0 "$(cat "$CACHE/service.pid")" 2>/dev/null; then
    kill "$(cat "$CACHE/service.pid")" && log "stopped the API service"
  fi
  rm -f "$CACHE/service.pid"
  exit 0
fi

# 1. packages
need=()
for cmd in podman runc debootstrap curl; do command -v "$cmd" >/dev/null || need+=("$cmd"); done
command -v docker >/dev/null || need+=(docker.io)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "missing ${need[*]}: install them (Debian: apt-get install podman runc debootstrap docker.io)"
    exit 2
  fi
  log "installing ${need[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 2. podman's settings: runc, and ulimits the host allows
cat >"$CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
EOF

# 3. the base image: Debian bookworm minbase with Python 3.11 (venv) and the CA bundle
if ! podman image exists "$BASE_IMAGE"; then
  if [ ! -s "$ROOTFS_TAR" ]; then
    rootfs=$CACHE/rootfs
    rm -rf "$rootfs"
    log "debootstrap bookworm into $rootfs (about 2 minutes)"
    debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-distutils,ca-certificates \
      bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { log "debootstrap failed: see $CACHE/debootstrap.log"; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$ROOTFS_TAR.partial" . && mv "$ROOTFS_TAR.partial" "$ROOTFS_TAR"
    rm -rf "$rootfs"
  fi
  log "importing $ROOTFS_TAR as $BASE_IMAGE"
  podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
    "$ROOTFS_TAR" "$BASE_IMAGE" >/dev/null
fi

# 4. the Docker API on a unix socket
if ! curl -fsS --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1; then
  rm -f "$SOCK"
  log "starting podman system service on $SOCK"
  nohup podman system service --time=0 "unix://$SOCK" >"$CACHE/service.log" 2>&1 &
  echo $! >"$CACHE/service.pid"
  for _ in $(seq 50); do
    curl -fsS --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1 && break
    sleep 0.2
  done
  curl -fsS --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1 \
    || { log "the service did not come up: see $CACHE/service.log"; exit 1; }
fi

# 5. optional: a wheelhouse for `./inv docker.build --wheelhouse build/.cache/wheelhouse`, for
#    when PyTorch's CPU index is out of reach and llama.cpp should not be compiled again: the CPU
#    torch of constraints.txt from pip's configured sources, and llama-cpp-python from pip's wheel
#    cache (built on this machine, so for this CPU) or compiled now (10-25 minutes).
if [ "${1:-}" = "--wheelhouse" ]; then
  wh=$PWD/build/.cache/wheelhouse
  pip=(.venv/bin/python -m pip --disable-pip-version-check)
  mkdir -p "$wh"
  torch_pin=$(grep -E '^torch==' constraints.txt)
  llama_pin=$(grep -E '^llama_cpp_python==' constraints.txt)
  ls "$wh"/torch-"${torch_pin#torch==}"+cpu-*.whl >/dev/null 2>&1 \
    || "${pip[@]}" download -q --no-deps -d "$wh" "$torch_pin+cpu" >&2
  if ! ls "$wh"/llama_cpp_python-"${llama_pin#*==}"-*.whl >/dev/null 2>&1; then
    cached=$("${pip[@]}" cache list llama_cpp_python --format abspath 2>/dev/null | grep -F -- "-${llama_pin#*==}-" | head -n1 || true)
    if [ -n "$cached" ]; then cp "$cached" "$wh/"; else "${pip[@]}" wheel -q --no-deps -w "$wh" "$llama_pin" >&2; fi
  fi
  log "wheelhouse: $(ls "$wh" | tr '\n' ' ')"
fi

echo "export CONTAINERS_CONF=$CONF"
echo "export DOCKER_HOST=unix://$SOCK"
echo "export DOCKER_BUILDKIT=0"
echo "export QALB_BASE_IMAGE=$BASE_IMAGE"
