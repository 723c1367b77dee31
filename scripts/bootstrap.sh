#!/usr/bin/env bash
# Make the project-local virtual environment .venv and install fedimaging into it, with optional extras:
#   bash scripts/bootstrap.sh          # what a simulation needs
#   bash scripts/bootstrap.sh test     # and the test tools
#   bash scripts/bootstrap.sh gpu      # TensorFlow with CUDA (Linux, NVIDIA driver installed)
# Re-running is quick: it installs again only when pyproject.toml or the extras changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
if ! "$python" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null; then
  echo "fedimaging needs Python 3.11 or 3.12 (TensorFlow 2.21 and Flower 1.42); found: $("$python" --version 2>&1)" >&2
  exit 1
fi

extras=$(IFS=,; echo "$*")

# The deployment tests start Debian's nginx (the Fleet-only proxy) and use curl and setpriv as an outsider and as the
# ClientApps' own user would. As root (CI) they are installed here; otherwise, name what to install.
if [[ ",$extras," == *,test,* ]]; then
  missing=()
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "fedimaging: installing ${missing[*]} for the deployment tests..."
      apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
    else
      echo "fedimaging: the deployment tests need ${missing[*]}: apt-get install ${missing[*]} (as root)" >&2
      exit 1
    fi
  fi
fi
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras:-base}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if [ ! -f "$stamp" ]; then
  echo "fedimaging: installing into .venv (first time: about 2 minutes, 3 GB)..."
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --editable ".${extras:+[$extras]}"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
