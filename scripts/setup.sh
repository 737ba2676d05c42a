#!/usr/bin/env bash
# One-time set-up on a fresh machine: the Debian packages below (when we may install them), then
# a virtual environment with the pinned dependencies and the lock. Safe to re-run.
set -euo pipefail
PYTHON="${1:-python3}"
VENV="${2:-.venv}"

# Debian packages the pipeline and its tests use: Tesseract (OCR for image-only pages), promtool
# (Prometheus' rule checker, package prometheus), nginx (the search tier's front) and chromium
# (the search page's browser test), docker-compose (`config` validation of docker/; there is no
# Docker engine here). Installed when we may (root + apt).
need=()
command -v tesseract >/dev/null 2>&1 || need+=(tesseract-ocr tesseract-ocr-eng)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v pgbackrest >/dev/null 2>&1 || need+=(pgbackrest)  # PostgreSQL backups to S3 (the restore test)
# The rehearsal's (make rehearsal) private Redis and the exporters Prometheus scrapes there.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
for e in postgres redis nginx; do command -v "prometheus-$e-exporter" >/dev/null 2>&1 || need+=("prometheus-$e-exporter"); done
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${need[*]}"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "setup: missing ${need[*]} and cannot install here; image-only pages will be quarantined as needs_ocr and the tests that need them fail" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# torch==2.13.0 (CPU build) comes from the machine's wheel store; pinned in pyproject.toml.
"$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
