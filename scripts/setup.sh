#!/usr/bin/env bash
# One-time set-up on a fresh machine: Tesseract for OCR (Debian package, when we may install it),
# then a virtual environment with the pinned dependencies. Safe to re-run.
set -euo pipefail
PYTHON="${1:-python3}"
VENV="${2:-.venv}"

if ! command -v tesseract >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing tesseract-ocr (OCR for image-only pages)"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr tesseract-ocr-eng >/dev/null
  else
    echo "setup: tesseract not found and cannot install it here; image-only pages will be quarantined as needs_ocr" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# torch==2.13.0 (CPU build) comes from the machine's wheel store; pinned in pyproject.toml.
"$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
