#!/usr/bin/env bash
# Build the image, tag it with the release tag and with the pinned vLLM
# version, and push both tags to a registry.
#
#   ./build_and_push.sh [options] <registry-user> <tag>
#
#   ./build_and_push.sh alice 0.1.0              # docker.io/alice/vllm-inference-api:0.1.0
#                                                # and :0.1.0-vllm0.32.0
#   ./build_and_push.sh ghcr.io/alice 0.1.0      # another registry: prefix the user with it
#   ./build_and_push.sh --cpu alice 0.1.0        # on vLLM's CPU image: :0.1.0-cpu, :0.1.0-vllm0.32.0-cpu
#   ./build_and_push.sh --dry-run alice 0.1.0    # print the commands, run nothing
#   ./build_and_push.sh --bake Qwen/Qwen2-VL-2B-Instruct --hf-token-file ~/.cache/huggingface/token alice 0.1.0
#                                                # the model baked in: :0.1.0-qwen2-vl-2b-instruct, ...
#
# Options:
#   --dry-run          print the docker commands instead of running them
#   --cpu              build on vLLM's CPU image (BASE_IMAGE_CPU below)
#   --bake MODEL       bake this Hub model into the image (the Dockerfile's `baked` target);
#                      the tags get the model's name as a suffix
#   --bake-revision R  branch, tag or commit of the baked model (default: main)
#   --hf-token-file F  file holding a Hub token for a gated or private model to bake; passed
#                      as a BuildKit secret, so it lands in no layer and no image history
#   --name NAME        repository name (default: vllm-inference-api)
#   --platform P       target platform (default: linux/amd64, what RunPod runs)
#   --no-push          build and tag only
#   -h, --help         this text
#
# Environment: BASE_IMAGE_CPU (the base for --cpu), HF_ENDPOINT (the Hub to bake
# from, e.g. a mirror), DOCKER_BUILD_FLAGS (more `docker build` flags, e.g.
# "--network host --progress plain").
#
# The vLLM version comes from the Dockerfile's `ARG BASE_IMAGE`, so the tag
# always names the engine the image carries.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DOCKERFILE="$ROOT/Dockerfile"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { printf 'build_and_push: error: %s\n' "$*" >&2; exit 1; }

dry_run=0
cpu=0
push=1
name=vllm-inference-api
platform=linux/amd64
bake=""
bake_revision=""
token_file=""
args=()
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --cpu) cpu=1 ;;
        --no-push) push=0 ;;
        --name) name="${2:?--name needs a value}"; shift ;;
        --platform) platform="${2:?--platform needs a value}"; shift ;;
        --bake) bake="${2:?--bake needs a model id}"; shift ;;
        --bake-revision) bake_revision="${2:?--bake-revision needs a value}"; shift ;;
        --hf-token-file) token_file="${2:?--hf-token-file needs a file}"; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) args+=("$1") ;;
    esac
    shift
done
((${#args[@]} == 2)) || die "expected <registry-user> <tag>, e.g. ./build_and_push.sh alice 0.1.0 (see --help)"
user="${args[0]}"
tag="${args[1]}"
[[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "'$tag' is not a valid image tag"

# The pinned engine: ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0 -> 0.32.0
base_image="$(sed -n 's/^ARG BASE_IMAGE=//p' "$DOCKERFILE")"
vllm_version="${base_image##*:v}"
[[ "$vllm_version" =~ ^[0-9]+\.[0-9]+\.[0-9]+ ]] || die "cannot read the vLLM version from 'ARG BASE_IMAGE=' in $DOCKERFILE"

suffix=""
build_args=()
if ((cpu)); then
    suffix="-cpu"
    build_args=(--build-arg "BASE_IMAGE=${BASE_IMAGE_CPU:-vllm/vllm-openai-cpu:v${vllm_version}-x86_64}")
fi
if [[ -n "$bake" ]]; then
    [[ "$bake" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
        || die "--bake '$bake' is not a Hub model id like org/name"
    # Qwen/Qwen2-VL-2B-Instruct -> qwen2-vl-2b-instruct
    model_tag="$(printf '%s' "${bake#*/}" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9._-' '-')"
    suffix="-${model_tag:0:60}$suffix"
    build_args+=(--target baked --build-arg "BAKE_MODEL=$bake" --label "vllm-inference-api.model=$bake")
    [[ -z "$bake_revision" ]] || build_args+=(--build-arg "BAKE_REVISION=$bake_revision")
    [[ -z "${HF_ENDPOINT:-}" ]] || build_args+=(--build-arg "HF_ENDPOINT=$HF_ENDPOINT")
    if [[ -n "$token_file" ]]; then
        [[ -r "$token_file" ]] || die "--hf-token-file $token_file cannot be read"
        build_args+=(--secret "id=hf_token,src=$token_file")
    fi
elif [[ -n "$bake_revision$token_file" ]]; then
    die "--bake-revision and --hf-token-file need --bake MODEL"
fi
repo="$user/$name"
tags=("$repo:$tag$suffix" "$repo:$tag-vllm$vllm_version$suffix")
for t in "${tags[@]}"; do
    ((${#t} - ${#repo} - 1 <= 128)) || die "the tag of $t is longer than 128 characters: use a shorter <tag>"
done

# docker.io unless the first part of the user names a registry host.
registry=docker.io
if [[ "$user" == */* && "${user%%/*}" =~ [.:] ]]; then
    registry="${user%%/*}"
fi

run() {
    if ((dry_run)); then
        local line
        printf -v line '%q ' "$@"
        printf '%s\n' "${line% }"
    else
        "$@"
    fi
}

logged_in() {
    local config="${DOCKER_CONFIG:-$HOME/.docker}/config.json" key store
    key="$registry"
    [[ "$registry" == docker.io ]] && key="https://index.docker.io/v1/"
    [[ -f "$config" ]] || return 1
    store="$(sed -n 's/.*"credsStore"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$config" | head -n 1)"
    if [[ -n "$store" ]] && command -v "docker-credential-$store" >/dev/null; then
        "docker-credential-$store" list 2>/dev/null | grep -qF "\"$key\""
    else
        grep -qF "\"$key\"" "$config"
    fi
}

if ((!dry_run)); then
    command -v docker >/dev/null || die "docker not found: install Docker (https://docs.docker.com/engine/install/)"
    docker info >/dev/null 2>&1 || die "the Docker daemon does not answer: start Docker, or check DOCKER_HOST and your permissions"
    if ((push)) && ! logged_in; then
        login="docker login"
        [[ "$registry" == docker.io ]] || login+=" $registry"
        die "not logged in to $registry: run '$login' first (or use --no-push)"
    fi
fi

revision="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
read -r -a extra_flags <<<"${DOCKER_BUILD_FLAGS:-}"
export DOCKER_BUILDKIT=1
run docker build "$ROOT" \
    --file "$DOCKERFILE" \
    --platform "$platform" \
    "${build_args[@]}" \
    "${extra_flags[@]}" \
    --label "org.opencontainers.image.title=$name" \
    --label "org.opencontainers.image.version=$tag" \
    --label "org.opencontainers.image.revision=$revision" \
    --label "vllm.version=$vllm_version" \
    --tag "${tags[0]}"
run docker tag "${tags[0]}" "${tags[1]}"
if ((push)); then
    for t in "${tags[@]}"; do
        run docker push "$t"
    done
fi
if ((!dry_run)); then
    printf 'build_and_push: %s %s\n' "$( ((push)) && echo pushed || echo built)" "${tags[*]}"
fi
