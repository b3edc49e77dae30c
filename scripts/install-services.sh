#!/usr/bin/env bash
# Installs the real servers the test suite starts on loopback (Debian packages):
# Prometheus (and its promtool) for the metrics and alert-rule tests; Alertmanager's
# amtool checks deploy/alertmanager/alertmanager.yml; PostgreSQL's server binaries
# (initdb, pg_ctl under /usr/lib/postgresql/<version>/bin) for the shared-state tests,
# which start their own throwaway server (tests/postgres_server.py). Podman with runc,
# debootstrap and podman-compose build and run the images (tests/integration/
# test_containers.py; `make image`, whose base comes from debootstrap where no image
# registry is reachable; deploy/docker/containers.conf holds the settings podman needs here).
# Debian's podman without its recommended packages networks through CNI, whose compose
# networks resolve service names only with the dnsname plugin (tests/integration/
# test_compose.py: the router finds `backend`, Prometheus `router`, by name).
# Idempotent and quick when already installed; needs root (CI runs as root).
set -euo pipefail

postgres_bin() {
  local initdb
  initdb=$(ls -1 /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)
  [ -n "$initdb" ] && dirname "$initdb"
}

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
postgres_bin >/dev/null || missing+=(postgresql)
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v podman-compose >/dev/null 2>&1 || missing+=(podman-compose)
[ -x /usr/lib/cni/dnsname ] || missing+=(golang-github-containernetworking-plugin-dnsname)
if [ ${#missing[@]} -eq 0 ]; then
  echo "[services] prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}'), amtool" \
    "and postgresql $("$(postgres_bin)/postgres" --version | awk '{print $3}') present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "[services] missing ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "[services] installing ${missing[*]} (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The packages' own services are not wanted: tests start their own servers on loopback.
if [[ " ${missing[*]} " == *" postgresql "* ]]; then
  # No default cluster ("main") to create, start and leave running on port 5432.
  apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null
  sed -i 's/^#\?\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
    /etc/postgresql-common/createcluster.conf
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Stop only the services of the packages installed just now (never a server that was
# already on this host, and never by process name: that would kill anyone's Prometheus).
for package in "${missing[@]}"; do
  systemctl disable --now "$package" >/dev/null 2>&1 || true
done
echo "[services] installed: $(prometheus --version 2>&1 | head -1)," \
  "$("$(postgres_bin)/postgres" --version)"
