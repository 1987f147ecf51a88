#!/usr/bin/env bash
# Build `fedllm-test-base`: a small Debian bookworm image that stands in for the NeMo container in
# tests and on machines where no registry is reachable. It is NOT a production base.
#   bash scripts/build-test-base.sh            (skips work when the image already exists)
#   FORCE=1 bash scripts/build-test-base.sh    (rebuild)
# What it holds: Debian's python3 + pip, CPU torch (from pip's local wheel folder / PyPI), and the
# build host's CA bundle, so that pip behind an intercepting HTTPS proxy works in test builds.
# That CA lives only in this test base; docker/Dockerfile never adds one, so the production path
# (BASE_IMAGE=nvcr.io/nvidia/nemo:...) carries the base image's own trust store only.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${TEST_BASE_IMAGE:-fedllm-test-base}"
TORCH_SPEC="${TORCH:-torch==2.13.0}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
HOST_CA="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
log() { echo "[test-base] $*" >&2; }

if [[ -z "${FORCE:-}" ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE exists (FORCE=1 to rebuild)"
  exit 0
fi

work=$(mktemp -d /tmp/fedllm-test-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"

log "debootstrap --variant=minbase bookworm (about 30 s)"
debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates bookworm "$rootfs" "$MIRROR" \
  >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
# After the packages (ca-certificates regenerates the bundle when installed): the build host's trust
# store, which includes the intercepting proxy's CA where there is one.
cp "$HOST_CA" "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

log "docker import"
tar -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1' \
  --change 'CMD ["/bin/bash"]' - "$IMAGE-os" >/dev/null

# CPU torch plays the part of the NeMo container's CUDA torch. The wheel comes from pip's local
# wheel folder when there is one (pip download finds it there first), else from PyPI.
ctx="$work/ctx"
mkdir -p "$ctx/wheels"
log "pip download $TORCH_SPEC"
python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.11 -d "$ctx/wheels" "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" >&2 || true
ls "$ctx"/wheels/torch-*.whl >/dev/null
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM $IMAGE-os
COPY wheels/ /tmp/wheels/
RUN python3 -m pip install --no-cache-dir /tmp/wheels/torch-*.whl && rm -rf /tmp/wheels
DOCKERFILE
log "installing torch into $IMAGE"
docker build -q --network host -t "$IMAGE" "$ctx" >/dev/null
docker rmi "$IMAGE-os" >/dev/null 2>&1 || true
log "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
