#!/usr/bin/env bash
# Chromium from Debian's packages for the operations page's browser test (Playwright drives it
# through executable_path; `playwright install` is never used because it downloads its own build).
#   bash scripts/ensure_chromium.sh     # idempotent: does nothing when /usr/bin/chromium exists
set -euo pipefail
CHROMIUM="${WILDFIRE_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
  echo "[chromium] present: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "[chromium] $CHROMIUM is missing and this is not root: run 'sudo apt-get update && sudo apt-get install -y chromium'" >&2
  exit 1
fi
echo "[chromium] installing the Debian package (apt-get update + install chromium)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "[chromium] installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
