#!/usr/bin/env bash
# Builds the CPU image loraplex:cpu (`make image`) with podman or docker, whichever runs here.
#
#   BASE_IMAGE=python:3.11-slim-bookworm scripts/build-image.sh   on a machine that can pull
#   scripts/build-image.sh                                        anywhere else: the Debian base
#                                                                 from scripts/base-image.sh
#   IMAGE=NAME (default loraplex:cpu)   LORAPLEX_CONTAINER_ENGINE=podman|docker
#
# pip inside the build uses this machine's pip settings (`pip config list`: index, extra
# indexes, find-links, certificate, constraints) as build arguments, and the local folders and
# files they name are mounted read-only at the same paths (podman only: `docker build` cannot
# mount). So the image installs exactly what scripts/setup-env.sh installs here, and no
# registry address is written into the repository. The build uses the host network: the
# container reaches the package registries the machine reaches.
#
# Layers are cached by the engine (/var/lib/containers for root podman): a rebuild after a
# source change redoes only the last layers. Stale layers of earlier builds are pruned.
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-loraplex:cpu}
DOCKERFILE=deploy/docker/Dockerfile.cpu
PYTHON=${PYTHON:-python3}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/docker/containers.conf}

ENGINE=${LORAPLEX_CONTAINER_ENGINE:-}
if [ -z "$ENGINE" ]; then
  if command -v podman >/dev/null 2>&1; then
    ENGINE=podman
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
  else
    echo "[image] neither podman nor a running docker: apt-get install podman runc" \
      "(scripts/install-services.sh does)" >&2
    exit 1
  fi
fi

BASE_IMAGE=${BASE_IMAGE:-$(scripts/base-image.sh)}

args=(--network host -f "$DOCKERFILE" -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ "$ENGINE" = podman ]; then
  # Docker's image format: podman's default (OCI) has no HEALTHCHECK and drops the
  # Dockerfile's, which docker, compose and the Helm chart's users expect in the image.
  args+=(--layers --format docker --ignorefile "$DOCKERFILE.dockerignore")
fi

# pip settings: files first (global, user, site), then environment variables, which pip
# lets override them. Only the keys the Dockerfile declares as ARGs.
declare -A pip_settings=()
while IFS= read -r line; do
  [[ "$line" =~ ^([^.]*)\.([a-z-]+)=\'(.*)\'$ ]] || continue
  scope=${BASH_REMATCH[1]} key=${BASH_REMATCH[2]} value=${BASH_REMATCH[3]}
  case "$key" in
    index-url | extra-index-url | find-links | trusted-host | cert | constraint | default-timeout) ;;
    *) continue ;;
  esac
  [ "$scope" = ":env:" ] && continue
  pip_settings[$key]=$value
done < <("$PYTHON" -m pip config list 2>/dev/null)
while IFS= read -r line; do
  [[ "$line" =~ ^:env:\.([a-z-]+)=\'(.*)\'$ ]] || continue
  case "${BASH_REMATCH[1]}" in
    index-url | extra-index-url | find-links | trusted-host | cert | constraint | default-timeout)
      pip_settings[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]} ;;
  esac
done < <("$PYTHON" -m pip config list 2>/dev/null)

# Part of every layer's cache key (build arguments are): a fixed fallback keeps the key the
# same whether or not the caller's environment sets it. Big wheels need a patient timeout.
pip_settings[default-timeout]=${pip_settings[default-timeout]:-180}

mounts=()
torch_local=""
for key in "${!pip_settings[@]}"; do
  value=${pip_settings[$key]}
  name=PIP_$(tr 'a-z-' 'A-Z_' <<<"$key")
  args+=(--build-arg "$name=$value")
  case "$key" in
    index-url | extra-index-url | find-links | cert | constraint) ;;
    *) continue ;;
  esac
  for item in $value; do
    path=${item#file://}
    [ -e "$path" ] && [[ "$path" == /* ]] || continue
    # A local index's pages link to its files relatively (../../files/x.whl): mount the
    # folder above it too.
    if [[ "$item" == file://* && "$key" == *index-url ]]; then
      path=$(dirname "${path%/}")
    fi
    mounts+=("$path")
    if [ "$key" = find-links ] && compgen -G "$path/torch-*+cpu-*.whl" >/dev/null; then
      torch_local=yes
    fi
  done
done
# The Dockerfile's default adds PyTorch's CPU index for torch==X+cpu; not wanted when a
# local wheel folder has it (and that index may not be reachable from here).
if [ -n "${TORCH_INDEX_URL+set}" ]; then
  args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
elif [ -n "$torch_local" ]; then
  args+=(--build-arg "TORCH_INDEX_URL=")
fi
for path in "${mounts[@]}"; do
  if [ "$ENGINE" = podman ]; then
    args+=(--volume "$path:$path:ro")
  else
    echo "[image] warning: docker build cannot mount $path (named by pip's settings)" >&2
  fi
done

echo "[image] $ENGINE build $IMAGE from $BASE_IMAGE" >&2
start=$SECONDS
"$ENGINE" build "${args[@]}" . >&2
echo "[image] built $IMAGE in $((SECONDS - start)) s," \
  "$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')" >&2
# Layers of earlier builds that no tag uses any more (each source change leaves some).
"$ENGINE" image prune -f --filter label=io.loraplex.image=cpu >/dev/null || true
