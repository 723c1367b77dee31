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
# ClientApps' own user would; the monitor's test drives Debian's chromium through its chromedriver. As root (CI) they
# are installed here; otherwise, name what to install.
if [[ ",$extras," == *,test,* ]]; then
  missing=()
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
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
# .venv/.installed records what is installed: pyproject.toml's hash and the extras. A command asking for extras already
# there (the simulation after the tests) installs nothing; new extras are added beside the others, never swapped for them.
hash=$(sha256sum pyproject.toml | cut -c1-16)
record=.venv/.installed
first=no
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  first=yes
fi
had_hash="" had_extras=""
if [ -f "$record" ]; then read -r had_hash had_extras < "$record" || true; fi
wanted=$(printf '%s\n' ${had_extras//,/ } ${extras//,/ } | sed '/^$/d' | sort -u | paste -sd, -)
if [ "$had_hash" != "$hash" ] || [ "$wanted" != "$had_extras" ]; then
  if [ "$first" = yes ]; then
    echo "fedimaging: installing into .venv (first time: about 2 minutes, 3 GB)..."
  else
    echo "fedimaging: updating .venv (${wanted:-no extras}; pyproject.toml or the extras asked for changed)..."
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --editable ".${wanted:+[$wanted]}"
  rm -f .venv/.installed-*  # the records of earlier versions of this script
  echo "$hash $wanted" > "$record"
fi
