# One image that serves any vLLM-supported Hugging Face model, text or
# vision-language, behind an OpenAI-compatible API with health, info and
# metrics endpoints (scripts/start.sh -> app/lifecycle/supervisor.py).
#
# GPU (default):  docker build -t vllm-inference-api .
# CPU engine:     docker build --build-arg BASE_IMAGE=vllm/vllm-openai-cpu:v0.32.0-x86_64 -t vllm-inference-api:cpu .
# Baked model:    docker build --target baked --build-arg BAKE_MODEL=Qwen/Qwen2-VL-2B-Instruct \
#                     --secret id=hf_token,src=$HOME/.cache/huggingface/token -t vllm-inference-api:qwen2-vl .
#                 (./build_and_push.sh --bake Qwen/Qwen2-VL-2B-Instruct --hf-token-file FILE USER TAG)
# Needs BuildKit (the default builder since Docker 23; DOCKER_BUILDKIT=1 before).
#
# The base image carries vLLM and the engine's whole Python environment; its
# vLLM version must match the flags app/lifecycle/engine_args.py writes.
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0

FROM ${BASE_IMAGE} AS app

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# tini as PID 1 forwards SIGTERM to start.sh (which execs the supervisor) and
# reaps zombies; curl serves the HEALTHCHECK. Both images of vLLM are
# Ubuntu-based; their apt versions move with the base, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini curl \
    && rm -rf /var/lib/apt/lists/*

# The wrapper runs in the engine's own Python environment: the supervisor
# starts the engine with its own interpreter (`python -m vllm...`), and the
# wrapper shares fastapi, aiohttp, pydantic and huggingface_hub with vLLM.
# So that the wrapper's pins cannot break vLLM, the installed vLLM is part of
# the same resolution: pip keeps every version vLLM requires, or fails the
# build here with the conflict, instead of the engine failing at run time.
# PIP_BREAK_SYSTEM_PACKAGES: vLLM's GPU image installs into the system Python.
RUN --mount=type=bind,source=requirements.txt,target=/tmp/requirements.txt \
    vllm_version="$(python3 -c 'import importlib.metadata as m; print(m.version("vllm"))')" \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --disable-pip-version-check \
        -r /tmp/requirements.txt "vllm==${vllm_version}"

WORKDIR /app
COPY scripts/ /app/scripts/
COPY app/ /app/app/
RUN chmod 0755 /app/scripts/*.sh \
    && python3 -c "import app.main"

# Defaults; every setting is documented in app/config.py and the README.
ENV PORT=8000 \
    HF_HOME=/root/.cache/huggingface \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

EXPOSE 8000

# Healthy only when /ping answers 200 (ready); 204 means still initializing.
# The start period covers a long download and load: the supervisor itself
# fails the start after ENGINE_STARTUP_TIMEOUT_S.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30m --retries=3 \
    CMD ["sh", "-c", "[ \"$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:${PORT}/ping)\" = 200 ]"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "/app/scripts/start.sh"]
CMD []


# --- Optional: a model baked into the image ----------------------------------
# docker build --target baked --build-arg BAKE_MODEL=org/name [--build-arg BAKE_REVISION=REV] \
#     [--secret id=hf_token,src=FILE]      (or: ./build_and_push.sh --bake org/name ...)
# The same preflight and file choice as a start-up download (app/lifecycle/bake.py).
# The token is a BuildKit secret, mounted for this one step: it is in no layer,
# no build argument and no environment variable. The image then serves
# /opt/model under the name BAKE_MODEL, offline: no Hub request at start.
# HF_ENDPOINT: another Hub (a mirror; the tests' local double).
FROM app AS baked
ARG BAKE_MODEL
ARG BAKE_REVISION=main
ARG HF_ENDPOINT
RUN --mount=type=secret,id=hf_token,required=false \
    if [ -z "${BAKE_MODEL}" ]; then \
        echo "Set --build-arg BAKE_MODEL=org/name to bake a model (or build the default target)." >&2; exit 1; \
    fi \
    && if [ -z "${HF_ENDPOINT}" ]; then unset HF_ENDPOINT; fi \
    && HF_HOME=/tmp/hf-build HF_HUB_DISABLE_TELEMETRY=1 \
       python3 -m app.lifecycle.bake "${BAKE_MODEL}" "${BAKE_REVISION}" /opt/model \
    && rm -rf /tmp/hf-build
ENV MODEL_NAME=/opt/model \
    SERVED_MODEL_NAME=${BAKE_MODEL} \
    HF_HUB_OFFLINE=1


# --- Default target: the image without a model (downloaded at start) ---------
FROM app AS runtime
