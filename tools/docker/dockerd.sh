#!/usr/bin/env bash
# Start or stop a Docker daemon for the container tests on machines that have
# Debian's docker.io package but no running daemon (CI, fresh dev machines).
#
#   tools/docker/dockerd.sh start   # no-op when a daemon already answers
#   tools/docker/dockerd.sh stop    # stops only a daemon this script started
#   tools/docker/dockerd.sh status
#
# The daemon uses Docker's usual paths, so built images stay cached between
# runs on the same machine. Override with DOCKER_DATA_ROOT, DOCKER_EXEC_ROOT,
# DOCKERD_PIDFILE and DOCKERD_SOCKET. Needs root.
set -euo pipefail

DATA_ROOT="${DOCKER_DATA_ROOT:-/var/lib/docker}"
EXEC_ROOT="${DOCKER_EXEC_ROOT:-/var/run/docker}"
PIDFILE="${DOCKERD_PIDFILE:-/var/run/docker.pid}"
SOCKET="${DOCKERD_SOCKET:-/var/run/docker.sock}"
LOG="${DOCKERD_LOG:-/var/log/vllm-inference-api-dockerd.log}"
# Written only by `start`, so `stop` never ends a daemon someone else runs.
OWNED="$EXEC_ROOT.started-by-tools-docker"
START_TIMEOUT_S="${DOCKERD_START_TIMEOUT_S:-60}"

say() { printf '[dockerd] %s\n' "$*" >&2; }
answers() { DOCKER_HOST="unix://$SOCKET" docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start() {
    if answers; then
        say "a daemon already answers on $SOCKET"
        return 0
    fi
    if [[ $EUID -ne 0 ]]; then
        say "error: starting dockerd needs root (run with sudo)"
        exit 1
    fi
    if ! command -v dockerd >/dev/null; then
        say "error: dockerd not found; install it with: apt-get install -y docker.io"
        exit 1
    fi
    mkdir -p "$DATA_ROOT" "$EXEC_ROOT" "$(dirname "$LOG")"
    say "starting dockerd (data root $DATA_ROOT, log $LOG)"
    setsid dockerd --data-root "$DATA_ROOT" --exec-root "$EXEC_ROOT" \
        --pidfile "$PIDFILE" -H "unix://$SOCKET" >>"$LOG" 2>&1 </dev/null &
    echo "$!" >"$OWNED"
    local waited=0
    until answers; do
        if ! kill -0 "$(cat "$OWNED")" 2>/dev/null; then
            say "error: dockerd exited during start; last log lines:"
            tail -n 20 "$LOG" >&2
            rm -f "$OWNED"
            exit 1
        fi
        if ((waited >= START_TIMEOUT_S)); then
            say "error: dockerd did not answer within ${START_TIMEOUT_S} s; see $LOG"
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "dockerd ready on $SOCKET"
}

stop() {
    if [[ ! -f "$OWNED" ]]; then
        say "no daemon started by this script; nothing to stop"
        return 0
    fi
    local pid
    pid="$(cat "$OWNED")"
    if kill -0 "$pid" 2>/dev/null; then
        say "stopping dockerd (pid $pid)"
        kill -TERM "$pid"
        local waited=0
        while kill -0 "$pid" 2>/dev/null && ((waited < 30)); do
            sleep 1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "dockerd still running after 30 s; sending SIGKILL"
            kill -KILL "$pid"
        fi
    fi
    rm -f "$OWNED"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status)
        if answers; then say "running on $SOCKET"; else say "not answering on $SOCKET"; exit 1; fi ;;
    *)
        say "usage: $0 start|stop|status"
        exit 2 ;;
esac
