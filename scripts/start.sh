#!/usr/bin/env bash
# Container entrypoint: wires the environment to the Python supervisor.
#
# All logic (settings validation, preflight, download, engine and wrapper
# processes, signals) lives in app/lifecycle/supervisor.py, which replaces this
# shell so that signals from the init process reach it directly.
set -euo pipefail

APP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${APP_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
# huggingface_hub otherwise makes a telemetry call to the Hub from every process.
export HF_HUB_DISABLE_TELEMETRY="${HF_HUB_DISABLE_TELEMETRY:-1}"
PYTHON="${PYTHON:-python3}"

exec "${PYTHON}" -m app.lifecycle.supervisor "$@"
