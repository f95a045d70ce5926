#!/usr/bin/env bash
# Debian packages the test suite and the benchmark use: PostgreSQL (conversation
# store), nginx (benchmark baseline), Prometheus' promtool (config checks),
# docker.io and debootstrap (container smoke test). Idempotent; needs root.
set -euo pipefail

packages=(postgresql nginx prometheus docker.io debootstrap tini)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "[setup_system] Debian packages present"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "[setup_system] missing packages: ${missing[*]}; run as root or install them: apt-get install ${missing[*]}" >&2
    exit 1
fi
echo "[setup_system] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packages' own services are not used: tests start their own instances.
for service in postgresql nginx prometheus docker; do
    (service "$service" stop >/dev/null 2>&1 || true)
done
