#!/usr/bin/env bash
# Installs the real servers the test suite starts on loopback (Debian packages):
# Prometheus (and its promtool) for the metrics and alert-rule tests; Alertmanager's
# amtool checks deploy/alertmanager/alertmanager.yml.
# Idempotent and quick when already installed; needs root (CI runs as root).
set -euo pipefail

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
if [ ${#missing[@]} -eq 0 ]; then
  echo "[services] prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}') and amtool present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "[services] missing ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "[services] installing ${missing[*]} (Debian packages)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The package's own service is not wanted: tests start their own server on loopback.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
systemctl disable --now prometheus prometheus-alertmanager >/dev/null 2>&1 || true
pkill -x prometheus >/dev/null 2>&1 || true
echo "[services] installed: $(prometheus --version 2>&1 | head -1)"
