#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium for the segment-report browser test (tests/evaluation) when it is not
# there yet. Needs root (CI runs as root on a fresh Debian machine); prints the browser's path on success.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; exit 0; fi
done
if [ "$(id -u)" != "0" ]; then
  echo "chromium is not installed and this is not root: run 'apt-get install -y chromium' as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >&2
command -v chromium
