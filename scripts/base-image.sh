#!/usr/bin/env bash
# Makes the Debian bookworm base image the Dockerfiles build on where no image registry is
# reachable (so `FROM python:3.11-slim-bookworm` cannot be pulled): debootstrap installs a
# minimal Debian with python3 (3.11, as in the official image), venv and pip from Debian's
# own packages, and podman (or docker) imports that tree as an image.
#
#   scripts/base-image.sh [NAME]     builds image NAME (default localhost/loraplex-base:bookworm)
#                                    when missing or stale, then prints NAME
#   DEBIAN_MIRROR=URL                Debian mirror (default: this machine's apt source)
#
# A few minutes the first time; then the image is found by a label naming the suite and
# packages, so changing either rebuilds it and nothing else does. Needs root (debootstrap).
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${1:-localhost/loraplex-base:bookworm}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/docker/containers.conf}
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,ca-certificates
KEY="$SUITE:$PACKAGES"

if command -v podman >/dev/null 2>&1; then
  ENGINE=podman
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  ENGINE=docker
else
  echo "[base-image] neither podman nor a running docker found" >&2
  exit 1
fi

have=$("$ENGINE" image inspect --format '{{ index .Labels "loraplex.base-key" }}' "$IMAGE" 2>/dev/null || true)
if [ "$have" = "$KEY" ]; then
  echo "$IMAGE"
  exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "[base-image] debootstrap missing: apt-get install debootstrap (or scripts/install-services.sh)" >&2
  exit 1
fi
if [ -z "${DEBIAN_MIRROR:-}" ]; then
  # The machine's own Debian source (deb822 or one-line format), never a hard-coded one.
  DEBIAN_MIRROR=$(grep -hoE '^(URIs: |deb )\S+/debian/?( |$)' \
    /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | head -1 | awk '{print $2}' || true)
  DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
fi

root=$(mktemp -d /var/tmp/loraplex-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "[base-image] debootstrap $SUITE from $DEBIAN_MIRROR (a few minutes)" >&2
start=$SECONDS
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$DEBIAN_MIRROR" >&2
# Package caches and lists are not wanted in the image; the Dockerfile's apt-get update
# fetches fresh lists.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
tar -C "$root" --numeric-owner -c . | "$ENGINE" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change "LABEL loraplex.base-key=$KEY" \
  --change 'CMD ["/bin/bash"]' \
  - "$IMAGE" >&2
echo "[base-image] $IMAGE built in $((SECONDS - start)) s" >&2
echo "$IMAGE"
